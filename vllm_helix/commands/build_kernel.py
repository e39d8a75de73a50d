"""`vllm-helix build-kernel`: compile the C++ per-shard decode kernel for this machine.

The README's set-up (``scripts/setup.sh``) runs it once; served workers then only
load the build from torch's extension cache. Prints the build log with ``--verbose``
and fails loudly, so a machine without a compiler is found at set-up, not in a worker.
"""

from __future__ import annotations

import argparse

HELP = "compile the C++ per-shard decode kernel (Helix attention on CPU) for this machine"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vllm_helix.attention.cpu_native import build, compile_flags

    module = build(verbose=args.verbose)
    print(f"Helix C++ decode kernel ready: {Path(module.__file__).name} ({' '.join(compile_flags())})")
    return 0
