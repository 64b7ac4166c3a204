"""lstm-model: create, import, publish, train and evaluate model directories, of LSTM or GRU
models (init --cell gru; import reads the cell off the checkpoint)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lstm_model.checkpoint import BUNDLED_MODEL_DIR, ModelLoadError, load_model, save_model
from lstm_model.config import CELLS, ConfigError, LSTMConfig
from lstm_model.model import SequenceModel
from lstm_model.native import CAPABILITY_FLAGS, NativeBuildError
from lstm_model.repository import PublishError, identity_from_path, publish


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
    version: str = "1",
    cell: str = "lstm",
) -> SequenceModel:
    """A randomly initialised model (PyTorch's default LSTM or GRU init), reproducible from
    `seed`."""
    config = LSTMConfig(
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        output_size=output_size,
        output_kind=kind,
        labels=labels,
        name=name,
        version=version,
        extra={"seed": seed},
        cell=cell,
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


def _identity(args: argparse.Namespace, default_name: str) -> tuple[str, str]:
    """(name, version) for the config: --out REPO/NAME/VERSION names them unless --name does."""
    from_path = None if args.name else identity_from_path(Path(args.out))
    name, version = from_path or (args.name or default_name, "1")
    return name, args.version or version


def _cmd_init(args: argparse.Namespace) -> int:
    _refuse_to_overwrite(args)
    name, version = _identity(args, "random")
    model = init_model(
        args.input_size,
        args.hidden_size,
        args.num_layers,
        args.output_size,
        args.seed,
        args.kind,
        args.labels or (),
        name,
        version,
        args.cell,
    )
    save_model(model, args.out)
    print(
        f"wrote {args.out}: {name} v{version} cell={args.cell} input={args.input_size} "
        f"hidden={args.hidden_size} layers={args.num_layers} output={args.output_size}"
    )
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from lstm_model.importer import import_state_dict, read_state_dict

    _refuse_to_overwrite(args)
    name, version = _identity(args, Path(args.checkpoint).stem)
    state = read_state_dict(Path(args.checkpoint))
    model = import_state_dict(
        state,
        args.rnn_prefix,
        args.head_prefix,
        args.kind,
        args.labels or (),
        args.mean or (),
        args.std or (),
        name,
        source=args.checkpoint,
        version=version,
        cell=args.cell,
    )
    save_model(model, args.out)
    c = model.config
    print(
        f"wrote {args.out}: {c.name} v{c.version} cell={c.cell} input={c.input_size} "
        f"hidden={c.hidden_size} layers={c.num_layers} output={c.output_size} kind={c.output_kind}"
    )
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    path, version = publish(Path(args.model_dir), Path(args.repository), args.name or "")
    print(f"published {args.model_dir} as {path.parent.name} v{version}: {path}")
    return 0


def _cmd_build_kernels(args: argparse.Namespace) -> int:
    from lstm_model import native

    wanted = {"host": [native.host_capability()], "all": list(CAPABILITY_FLAGS)}
    directory = Path(args.dir) if args.dir else None
    for capability in wanted.get(args.capability, [args.capability]):
        print(f"{capability}: {native.build(capability, directory)}")
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


def _identity_arguments(p: argparse.ArgumentParser, default_name: str) -> None:
    p.add_argument(
        "--name",
        help=f"model name in config.json (default: NAME when --out is REPO/NAME/VERSION, "
        f"else {default_name})",
    )
    p.add_argument(
        "--version",
        help="version in config.json (default: VERSION when --out is REPO/NAME/VERSION and "
        "--name is not given, else 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstm-model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "init", help="write a randomly initialised model directory (an LSTM, or --cell gru)"
    )
    p.add_argument("--input-size", type=int, required=True)
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--output-size", type=int, required=True)
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=["regression", "classification"], default="regression")
    p.add_argument("--labels", type=_labels, help="comma-separated class labels")
    p.add_argument("--cell", choices=CELLS, default="lstm", help="the recurrent cell")
    _identity_arguments(p, "random")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(run=_cmd_init)

    p = sub.add_parser(
        "import", help="convert an nn.LSTM or nn.GRU + nn.Linear state dict (.pt/.safetensors)"
    )
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--rnn-prefix",
        "--lstm-prefix",
        dest="rnn_prefix",
        help="key prefix of the nn.LSTM / nn.GRU (default: the first of lstm., gru., rnn. found)",
    )
    p.add_argument(
        "--cell",
        choices=CELLS,
        help="lstm or gru (default: read off the gate rows: 4 x hidden an LSTM, 3 x hidden a GRU)",
    )
    p.add_argument("--head-prefix", default="fc.")
    p.add_argument("--kind", choices=["regression", "classification"], default="regression")
    p.add_argument("--labels", type=_labels)
    p.add_argument("--mean", type=_floats, help="per-feature input mean, comma-separated")
    p.add_argument("--std", type=_floats, help="per-feature input std, comma-separated")
    _identity_arguments(p, "the checkpoint's file name")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(run=_cmd_import)

    p = sub.add_parser(
        "publish", help="add a model directory to a repository as its next version, atomically"
    )
    p.add_argument("model_dir", help="model directory to copy (config.json + model.safetensors)")
    p.add_argument("--repository", required=True, help="repository: REPO/NAME/VERSION/")
    p.add_argument("--name", help="model name in the repository (default: the config's name)")
    p.set_defaults(run=_cmd_publish)

    p = sub.add_parser("eval", help="held-out accuracy after 10/25/50/100 timesteps")
    p.add_argument("model_dir", nargs="?", default=str(BUNDLED_MODEL_DIR))
    p.add_argument("--recordings", help="labelled recordings (.safetensors); default: bundled")
    p.set_defaults(run=_cmd_eval)

    p = sub.add_parser(
        "build-kernels",
        help="compile the native GRU kernel now (servers otherwise build it on first use)",
        description="Compile the C++ GRU layer loop against the installed torch into the kernel "
        "directory, where lstm-serve looks for it. Needs a C++ compiler; an image without one "
        "ships them prebuilt with --capability all.",
    )
    p.add_argument(
        "--capability",
        choices=["host", "all", *CAPABILITY_FLAGS],
        default="host",
        help="ATen CPU capability to build for (default: this machine's)",
    )
    p.add_argument(
        "--dir", help="kernel directory (default: $LSTM_STREAM_KERNEL_DIR, else ~/.cache/...)"
    )
    p.set_defaults(run=_cmd_build_kernels)

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
    except (ModelLoadError, ConfigError, PublishError, NativeBuildError) as exc:
        print(f"lstm-model: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
