"""img/benchmarks.png, rendered from the JSON document alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.bare_compute import COMPUTE_STEPS
from bench.report_markdown import find_row
from bench.variants import VARIANTS


def render_plot(doc: dict[str, Any], path: Path) -> None:
    """Timesteps/s against sessions, a line per variant; a panel per model and chunk size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, chunks = doc["models"], doc["grid"]["chunks"]
    fig, axes = plt.subplots(
        len(models), len(chunks), figsize=(5 * len(chunks), 3.8 * len(models)), squeeze=False
    )
    for ax_row, model in zip(axes, models, strict=True):
        for ax, chunk in zip(ax_row, chunks, strict=True):
            _plot_panel(ax, doc, model, chunk)
    fig.suptitle(f"lstm-stream StreamSteps on {doc['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_panel(ax: Any, doc: dict[str, Any], model: dict[str, Any], chunk: int) -> None:
    for variant in VARIANTS:
        points = [
            (row["sessions"], row["timesteps_per_s"])
            for s in doc["grid"]["sessions"]
            if (row := find_row(doc["rows"], model["key"], variant, s, chunk))
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=variant)
    if chunk == COMPUTE_STEPS:
        bare = model["bare_compute"]["timesteps_per_s"]
        ax.axhline(bare, color="grey", linestyle="--", label="bare model, 64 × 32 forward")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(doc["grid"]["sessions"], [str(s) for s in doc["grid"]["sessions"]])
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("timesteps/s")
    ax.set_title(f"{model['key']} (hidden {model['hidden_size']}), {chunk}-step messages")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
