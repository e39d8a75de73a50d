"""A benchmark's results files written together and re-rendered from the JSON (vllm_helix/harness/results_page.py)."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_helix.harness.results_page import render_page, stamped, write_page


def test_a_page_is_written_with_its_stamped_json_and_rerendered_from_it(tmp_path: Path) -> None:
    figures: list[Path] = []
    payload = stamped({"rows": [1, 2]}, machine={"cpu": "X", "amx": False, "cores": 2, "commit": "abc1234"})
    assert payload["date"] and payload["machine"]["commit"] == "abc1234" and payload["rows"] == [1, 2]
    text = write_page(tmp_path / "results", "bench", payload, lambda p: f"# {len(p['rows'])} rows\n",
                      lambda p, path: figures.append(path))
    assert text == "# 2 rows\n" and (tmp_path / "results" / "bench.md").read_text() == text
    assert json.loads((tmp_path / "results" / "bench.json").read_text()) == payload
    assert figures == [tmp_path / "results" / "bench.png"]
    (tmp_path / "results" / "bench.md").write_text("stale")
    assert render_page(tmp_path / "results", "bench", lambda p: f"# {p['rows'][-1]}\n") == "# 2\n"
    assert (tmp_path / "results" / "bench.md").read_text() == "# 2\n"  # the page follows the JSON
