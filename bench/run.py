"""The benchmark harness (issue 7): lstm-serve as shipped, with durable sessions (a Redis state
store), without cross-session batching, and a bare gRPC echo, measured in one run by the same
load generator, plus the model's own compute rate.

    python -m bench.run                 # the full grid, into docs/
    python -m bench.run --quick         # a small grid (the smoke test's)
    python -m bench.run --render-only   # re-render docs/benchmarks.md and the plot from the JSON

It writes <out-dir>/benchmarks.json (every row and the machine), <out-dir>/benchmarks.md and
<out-dir>/img/benchmarks.png. The markdown and the plot are rendered from the JSON alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.measure import Grid, run_grid
from bench.report import render_outputs, write_outputs
from bench.variants import MODELS, VARIANTS


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _names(choices: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v for v in text.split(",") if v)
        unknown = set(names) - set(choices)
        if unknown:
            raise argparse.ArgumentTypeError(f"expected some of {','.join(choices)}, got {text!r}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="sessions 1,4; 0.5 s; init256 only")
    parser.add_argument("--duration", type=float, default=None, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per cell")
    parser.add_argument("--sessions", type=_ints, default=None, help="default 1,16,64,256")
    parser.add_argument("--chunks", type=_ints, default=None, help="default 1,32")
    parser.add_argument("--models", type=_names(MODELS), default=None, help="init256,bundled")
    parser.add_argument("--variants", type=_names(VARIANTS), default=VARIANTS)
    parser.add_argument("--device", default="auto", help="lstm-serve --device (default auto)")
    parser.add_argument(
        "--retries", type=int, default=None, help="reruns of a disturbed cell (default 1)"
    )
    parser.add_argument(
        "--quiet-budget",
        type=float,
        default=None,
        help="most seconds spent waiting for other processes to go quiet (default 300)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    parser.add_argument("--render-only", action="store_true", help="re-render from the JSON")
    return parser


def grid_from_args(args: argparse.Namespace) -> Grid:
    """--quick sets the smoke test's defaults; explicit flags still win."""
    quick = args.quick
    return Grid(
        sessions=args.sessions or ((1, 4) if quick else (1, 16, 64, 256)),
        chunks=args.chunks or (1, 32),
        models=args.models or (("init256",) if quick else MODELS),
        variants=args.variants,
        duration_s=args.duration or (0.5 if quick else 5.0),
        warmup_s=args.warmup if args.warmup is not None else (0.2 if quick else 1.0),
        device=args.device,
        engine_repeats=20 if quick else 200,
        retries=args.retries if args.retries is not None else (0 if quick else 1),
        quiet_budget_s=args.quiet_budget
        if args.quiet_budget is not None
        else (0 if quick else 300),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render_only:
        render_outputs(json.loads((args.out_dir / "benchmarks.json").read_text()), args.out_dir)
    else:
        started = time.monotonic()
        write_outputs(run_grid(grid_from_args(args)), args.out_dir)
        print(f"done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(f"wrote {args.out_dir / 'benchmarks.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
