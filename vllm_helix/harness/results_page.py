"""A benchmark's results files: one JSON payload stamped with its date, machine and commit, the page
rendered from it, and an optional figure, written together.

Every script under ``benchmarks/`` writes through :func:`write_page`, and re-renders a page from its
committed JSON through :func:`render_page` (a page's text is a function of its JSON, so a change of
wording never needs a re-run).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Callable

from vllm_helix.harness.machine import describe_machine

Markdown = Callable[[dict[str, Any]], str]
Figure = Callable[[dict[str, Any], Path], None]


def stamped(payload: dict[str, Any], machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """``payload`` with today's ``date`` and the ``machine`` record (this one's, with its commit)."""
    return {"date": datetime.date.today().isoformat(), "machine": machine or describe_machine(), **payload}


def write_page(directory: Path, name: str, payload: dict[str, Any], markdown: Markdown,
               figure: Figure | None = None) -> str:
    """Write ``name``.json, ``name``.md (and ``name``.png) under ``directory``; returns the page's text."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    return render_page(directory, name, markdown, figure, payload)


def render_page(directory: Path, name: str, markdown: Markdown, figure: Figure | None = None,
                payload: dict[str, Any] | None = None) -> str:
    """(Re)write ``name``.md (and its figure) from ``payload``, by default the committed ``name``.json."""
    payload = payload if payload is not None else json.loads((directory / f"{name}.json").read_text())
    text = markdown(payload)
    (directory / f"{name}.md").write_text(text)
    if figure is not None:
        figure(payload, directory / f"{name}.png")
    return text
