"""lstm-model: create, import, train and evaluate model directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lstm_model.checkpoint import BUNDLED_MODEL_DIR, ModelLoadError, load_model, save_model
from lstm_model.config import ConfigError, LSTMConfig
from lstm_model.model import SequenceModel


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _labels(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def init_model(
    input_size: int = 4,
    hidden_size: int = 16,
    num_layers: int = 1,
    output_size: int = 2,
    seed: int = 0,
    kind: str = "regression",
    labels: tuple[str, ...] = (),
    name: str = "random",
) -> SequenceModel:
    """A randomly initialised model (PyTorch's default LSTM init), reproducible from `seed`."""
    config = LSTMConfig(
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        output_size=output_size,
        output_kind=kind,
        labels=labels,
        name=name,
        extra={"seed": seed},
    )
    torch.manual_seed(seed)
    return SequenceModel(config).eval()


def _refuse_to_overwrite(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.force or not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: expected a directory to write, found a file")
    if any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty (--force overwrites it)")


def _cmd_init(args: argparse.Namespace) -> int:
    _refuse_to_overwrite(args)
    model = init_model(
        args.input_size,
        args.hidden_size,
        args.num_layers,
        args.output_size,
        args.seed,
        args.kind,
        args.labels or (),
        args.name,
    )
    save_model(model, args.out)
    print(
        f"wrote {args.out}: {model.config.name} input={args.input_size} "
        f"hidden={args.hidden_size} layers={args.num_layers} output={args.output_size}"
    )
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from lstm_model.importer import import_state_dict, read_state_dict

    _refuse_to_overwrite(args)
    state = read_state_dict(Path(args.checkpoint))
    model = import_state_dict(
        state,
        args.lstm_prefix,
        args.head_prefix,
        args.kind,
        args.labels or (),
        args.mean or (),
        args.std or (),
        args.name or Path(args.checkpoint).stem,
        source=args.checkpoint,
    )
    save_model(model, args.out)
    c = model.config
    print(
        f"wrote {args.out}: {c.name} input={c.input_size} hidden={c.hidden_size} "
        f"layers={c.num_layers} output={c.output_size} kind={c.output_kind}"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lstm_model.evaluate import evaluate, format_accuracy_table
    from lstm_model.recordings import BUNDLED_RECORDINGS, load_recordings

    loaded = load_model(args.model_dir)
    recordings = load_recordings(args.recordings or BUNDLED_RECORDINGS)
    accuracy = evaluate(loaded.model, recordings)
    print(
        f"{loaded.model.config.name} v{loaded.model.config.version} on "
        f"{len(recordings.labels)} held-out recordings ({recordings.source})"
    )
    print(format_accuracy_table(accuracy, len(recordings.labels)))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from lstm_model.evaluate import format_accuracy_table
    from lstm_model.train import TrainSettings, train_bundled

    settings = TrainSettings(epochs=args.epochs, seed=args.seed, threads=args.threads)
    accuracy = train_bundled(Path(args.out), settings)
    print(f"wrote {args.out}")
    print(format_accuracy_table(accuracy, 40))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstm-model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a randomly initialised model directory")
    p.add_argument("--input-size", type=int, required=True)
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--output-size", type=int, required=True)
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=["regression", "classification"], default="regression")
    p.add_argument("--labels", type=_labels, help="comma-separated class labels")
    p.add_argument("--name", default="random")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(run=_cmd_init)

    p = sub.add_parser(
        "import", help="convert an nn.LSTM + nn.Linear state dict (.pt/.safetensors)"
    )
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--lstm-prefix", default="lstm.")
    p.add_argument("--head-prefix", default="fc.")
    p.add_argument("--kind", choices=["regression", "classification"], default="regression")
    p.add_argument("--labels", type=_labels)
    p.add_argument("--mean", type=_floats, help="per-feature input mean, comma-separated")
    p.add_argument("--std", type=_floats, help="per-feature input std, comma-separated")
    p.add_argument("--name")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(run=_cmd_import)

    p = sub.add_parser("eval", help="held-out accuracy after 10/25/50/100 timesteps")
    p.add_argument("model_dir", nargs="?", default=str(BUNDLED_MODEL_DIR))
    p.add_argument("--recordings", help="labelled recordings (.safetensors); default: bundled")
    p.set_defaults(run=_cmd_eval)

    p = sub.add_parser("train", help="train the bundled model on BasicMotions (needs [train])")
    p.add_argument("--out", default=str(BUNDLED_MODEL_DIR))
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(run=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ModelLoadError, ConfigError) as exc:
        print(f"lstm-model: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
