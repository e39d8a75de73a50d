#!/usr/bin/env bash
# README command 2: set up (first run only) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The 25 slowest tests close the output: where the suite's time goes, on every CI run.
exec .venv/bin/python -m pytest -q --durations=25 "$@"
