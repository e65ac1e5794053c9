#!/usr/bin/env bash
# The benchmark suite, from the repository root: bash bench/run.sh [options]
# (python -m bench --help lists them). Writes bench/results/latest.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m bench "$@"
