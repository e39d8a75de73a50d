"""`vllm-helix` command line: one verb per module.

Each verb lives in its own module exposing ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``; this file only wires them together, so adding a verb never
touches another verb's code. Verb modules import heavy dependencies (transformers,
matplotlib, vLLM) inside ``run`` so that ``vllm-helix --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from typing import Sequence

# verb -> module implementing it
VERBS: dict[str, str] = {
    "demo": "vllm_helix.commands.demo",
    "attention-demo": "vllm_helix.commands.attention_demo",
    "plan": "vllm_helix.planner.command",
    "calibrate": "vllm_helix.commands.calibrate",
    "make-tiny-model": "vllm_helix.commands.make_tiny_model",
    "serve": "vllm_helix.commands.serve",
    "build-kernel": "vllm_helix.commands.build_kernel",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-helix",
        description="Helix Parallelism for vLLM: exact KV-parallel attention with TP/EP FFN.",
    )
    parser.add_argument("--version", action="version",
                        version=f"vllm-helix {importlib.metadata.version('vllm-helix')}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        verb_parser = sub.add_parser(verb, help=module.HELP, description=module.HELP,
                                     epilog=getattr(module, "EPILOG", None),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_run=module.run, _help=verb_parser.format_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
