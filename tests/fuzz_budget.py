"""How many generated cases the property tests run.

CI runs a small fixed budget per property, so the three fuzz modules together stay
well under a minute. A long run sets KATA_PY_FUZZ_EXAMPLES, e.g.

    KATA_PY_FUZZ_EXAMPLES=100000 .venv/bin/pytest -q tests/unit/test_fuzz_*.py

and every property then runs that many cases (hypothesis counts them; the run prints
them with --hypothesis-show-statistics).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

ENV = "KATA_PY_FUZZ_EXAMPLES"


def budget(default: int) -> int:
    value = os.environ.get(ENV, "")
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{ENV}={value!r}: expected a number of cases") from None
    if n < 1:
        raise ValueError(f"{ENV}={value!r}: expected at least 1")
    return n


def fuzz(default: int = 200, **kw) -> settings:
    """Settings for one property: `default` cases unless the environment asks for more."""
    long_run = bool(os.environ.get(ENV))
    return settings(
        max_examples=budget(default),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
        # CI: the same cases every run, so a failure there is never a coin toss.
        derandomize=not long_run,
        database=None if not long_run else settings.default.database,
        **kw,
    )
