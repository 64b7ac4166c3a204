"""The report a run leaves in its out-dir: benchmarks.json (every row and the machine), and
benchmarks.md and img/benchmarks.png rendered from that JSON alone (plus, when `make
bench-batches` left one there, batches.json's section)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.report_markdown import render_markdown
from bench.report_plot import render_plot


def write_outputs(doc: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks.json").write_text(json.dumps(doc, indent=2) + "\n")
    render_outputs(doc, out_dir)


def render_outputs(doc: dict[str, Any], out_dir: Path) -> None:
    from bench.batches import render as render_batches

    render_plot(doc, out_dir / "img" / "benchmarks.png")
    text = render_markdown(doc)
    batches = out_dir / "batches.json"
    if batches.exists():
        text = text.rstrip("\n") + "\n\n" + render_batches(json.loads(batches.read_text()), "##")
    (out_dir / "benchmarks.md").write_text(text)
