#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: install what is
# missing, check the import layers (lint-imports), build the guest image if
# it is not cached, run pytest.
# pytest's exit status 5 (no tests collected) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh || exit 1
# The layer contracts in pyproject.toml ([tool.importlinter]), from the repository root.
.venv/bin/lint-imports --no-logo || exit 1
.venv/bin/kata-py image build >/dev/null || exit 1
.venv/bin/python -m pytest -q tests "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "ci/test.sh: no tests were collected" >&2
  exit 1
fi
exit "$status"
