"""The report a run leaves in its out-dir: benchmarks.json (every row and the machine), and
benchmarks.md and img/benchmarks.png rendered from that JSON alone."""

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
    render_plot(doc, out_dir / "img" / "benchmarks.png")
    (out_dir / "benchmarks.md").write_text(render_markdown(doc))
