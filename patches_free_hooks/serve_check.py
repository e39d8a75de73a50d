"""``vllm-helix serve MODEL ... --check [PLATFORM]``: every start-up rule of a serve command, no engine started.

A user checks a plan on a laptop before renting a cluster. The command line goes
through vLLM's own ``vllm serve`` argument parser and ``EngineArgs``, then through
the same start-up checks a real start runs (:func:`engine_config.check_helix_connector`,
:func:`engine_config.apply_helix`: layout against the model's config, attention backend,
settings Helix cannot honour, workers against cores), for this machine or for a named
platform (``cpu``, ``cpu:64``, ``cuda:9.0``), whose rules the checks read through
:func:`engine_config.checking_for`. One line, exit 0 or 2. The model's config must be
readable here (a local directory, or a hub name the cache already holds); the weights
are not loaded.

Run as ``python -m patches_free_hooks.serve_check [PLATFORM] -- serve MODEL ARGS...``
(what ``vllm-helix serve --check`` execs).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from vllm_helix.config import HelixConfigError
from vllm_helix.serving_rules import Platform

from patches_free_hooks import engine_config
from patches_free_hooks.compat import HelixStartupError, internal


def serve_engine_args(argv: Sequence[str]) -> Any:
    """``EngineArgs`` of ``vllm <argv>`` (``argv[0] == "serve"``), through vLLM's own serve parser; its
    ``headless`` flag (a serve option, not an engine one) is kept on it."""
    parser = internal("vllm.utils.argparse_utils:FlexibleArgumentParser")(prog="vllm")
    internal("vllm.entrypoints.cli.serve:ServeSubcommand")().subparser_init(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    engine_args = internal("vllm.engine.arg_utils:EngineArgs.from_cli_args")(args)
    engine_args.headless = args.headless
    return engine_args


def check(argv: Sequence[str], target: Platform | None) -> str:
    """Run the start-up checks of ``vllm <argv>`` (``argv[0] == "serve"``); the one-line verdict, or raise."""
    engine_args = serve_engine_args(argv)
    where = target.describe() if target is not None else "this machine"
    with engine_config.checking_for(target):
        engine_config.check_helix_connector(engine_args)
        try:
            helix = engine_config.apply_helix(engine_args, headless=engine_args.headless)
        except OSError as err:
            raise HelixStartupError(f"model {engine_args.model!r} cannot be read: {err}".splitlines()[0]) from None
    if helix is None:
        return f"ok: plain vLLM (no Helix layout) for {engine_args.model} on {where}"
    return (f"ok: Helix {helix.to_cli()} for {engine_args.model} on {where}: tensor_parallel_size="
            f"{engine_args.tensor_parallel_size}, decode_context_parallel_size="
            f"{engine_args.decode_context_parallel_size}")


def main(argv: Sequence[str] | None = None) -> int:
    items = list(sys.argv[1:] if argv is None else argv)
    split = items.index("--")
    platform, serve_argv = items[:split], items[split + 1:]
    try:
        from patches_free_hooks import plugin

        plugin.register()  # the hooks a real start installs (MoE grid, connector), in this process
        target = Platform.parse(platform[0]) if platform else None
        print(check(serve_argv, target), flush=True)
    except HelixConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
