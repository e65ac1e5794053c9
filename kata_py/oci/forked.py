"""A sandbox owner or exec relay started by fork from the CLI, which has
already imported nearly everything they run, instead of a new interpreter
that imports it all again: from `run` starting to the owner running, 66 ms
became 15 ms (medians of 5 on the 2-core TCG host).

The child is what `subprocess.Popen([python, -m, module, ...])` would have
started, minus the interpreter start: a session of its own, the caller's
`preexec_fn` (the cgroup placement), no fd but stdio and the ones passed,
default signal dispositions, and a command line that says what it is (ps,
the tests and `kata-py` itself find owners by it). It runs
`module.main(args)` and exits with its status, without running the CLI's
exit handlers or finalizers.

A process with threads is never forked (a thread's locks would stay held
in the child forever): there, and with KATA_PY_FORK=off, the module is
started in a new interpreter as before.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import threading
import traceback

from .. import hostsys
from ..hostsys import ForkedChild


def fork_wanted() -> bool:
    return hostsys.fork_enabled() and threading.active_count() == 1


def start(argv: list[str], pass_fds: tuple[int, ...], preexec_fn=None) -> subprocess.Popen | ForkedChild:
    """Start `argv` (`python -m MODULE ARGS...`): forked when that is safe,
    else a new interpreter, as subprocess.Popen(start_new_session=True)."""
    if not fork_wanted() or argv[1:2] != ["-m"]:
        return subprocess.Popen(argv, pass_fds=pass_fds, start_new_session=True, preexec_fn=preexec_fn)
    pid = hostsys.fork_helper()
    if pid:
        return ForkedChild(pid)
    _run_child(argv, set(pass_fds), preexec_fn)   # never returns


def _run_child(argv: list[str], keep: set[int], preexec_fn) -> None:
    status = 1
    try:
        os.setsid()
        if preexec_fn is not None:
            preexec_fn()
        hostsys.settle_forked_child(inherited=keep)     # as Popen's pass_fds leaves them
        _title(argv)
        # The CLI's log handlers are the CLI's: the module sets up its own.
        hostsys.keep_alive_in_child(*logging.root.handlers)
        logging.root.handlers.clear()
        module = argv[2]
        sys.argv = [module, *argv[3:]]
        importlib.import_module(module).main(argv[3:])
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _title(argv: list[str]) -> None:
    """The command line a new interpreter would have shown."""
    from setproctitle import setproctitle

    setproctitle(" ".join(argv))
