#!/usr/bin/env bash
# README command 1: set up (first run only) and run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vllm-helix demo "$@"
