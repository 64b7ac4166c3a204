"""Training of the bundled model: BasicMotions (UEA archive, shipped inside the aeon package),
6 channels of smartwatch accelerometer and gyroscope, 4 activities, 100 steps at 10 Hz.

The model classifies the activity at every timestep, so the loss is averaged over all steps:
a streaming client gets a usable answer early and a better one as the recording goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lstm_model.checkpoint import save_model
from lstm_model.config import LSTMConfig
from lstm_model.evaluate import evaluate, format_accuracy_table
from lstm_model.model import SequenceModel
from lstm_model.recordings import Recordings

DATASET = "BasicMotions"
SOURCE = "UEA multivariate archive, BasicMotions, as bundled in the aeon package"


@dataclass(frozen=True)
class TrainSettings:
    hidden_size: int = 48
    num_layers: int = 2
    epochs: int = 300
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 2


def load_basic_motions(split: str) -> Recordings:
    """The train or test split as (N, T, 6) float32 recordings. Needs the `train` extra (aeon)."""
    try:
        from aeon.datasets import load_basic_motions as aeon_load
    except ImportError as exc:
        raise SystemExit(
            "training needs the dataset package: pip install -e '.[train]' (aeon)"
        ) from exc
    x, y = aeon_load(split=split)  # x (N, channels, T), y (N,) strings
    label_names = tuple(sorted(set(y.tolist())))
    labels = torch.tensor([label_names.index(v) for v in y.tolist()])
    inputs = torch.as_tensor(x, dtype=torch.float32).transpose(1, 2).contiguous()  # (N, T, 6)
    return Recordings(inputs, labels, label_names, source=f"{SOURCE}, {split} split")


def train(settings: TrainSettings, train_set: Recordings) -> SequenceModel:
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    flat = train_set.inputs.reshape(-1, train_set.inputs.shape[-1])  # (N*T, I)
    config = LSTMConfig(
        input_size=train_set.inputs.shape[-1],
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        output_size=len(train_set.label_names),
        output_kind="classification",
        labels=train_set.label_names,
        input_mean=tuple(flat.mean(0).tolist()),
        input_std=tuple(flat.std(0).clamp_min(1e-6).tolist()),
        name="basic-motions",
        version="1",
        description="Activity (standing, walking, running, badminton) from a smartwatch, "
        "classified at every 10 Hz timestep.",
        extra={"dataset": DATASET, "train_settings": settings.__dict__},
    )
    model = SequenceModel(config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    steps = train_set.inputs.shape[1]
    targets = train_set.labels[:, None].expand(-1, steps)  # (N, T)
    for _ in range(settings.epochs):
        logits, _ = model.logits(train_set.inputs)  # (N, T, classes)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


def write_model_card(
    out: Path,
    settings: TrainSettings,
    accuracy: dict[int, float],
    heldout: Recordings,
    train_size: int,
    seconds: float,
) -> None:
    table = format_accuracy_table(accuracy, len(heldout.labels))
    (
        out / "MODEL_CARD.md"
    ).write_text(f"""# basic-motions: activity from a smartwatch, at every timestep

Streams 6 features per timestep (accelerometer x, y, z and gyroscope x, y, z from a smartwatch,
sampled at 10 Hz) and outputs, at every timestep, the probability of each of four activities:
{", ".join(heldout.label_names)}. The bundled default model of lstm-stream.

## Data
- Origin: the BasicMotions data set of the UEA multivariate time-series classification archive
  (four people wearing a smartwatch, each activity recorded for 10 seconds), read from the copy
  that the `aeon` package bundles; nothing is downloaded.
- Split: the archive's own split, {train_size} recordings to train on and {len(heldout.labels)}
  held out (10 per activity), 100 timesteps each. Held-out recordings ship beside the model as
  `heldout.safetensors` (inputs `(N, 100, 6)` float32, raw units; labels `(N,)`).
- Normalisation: per-feature mean and std of the training split, stored in config.json and
  applied inside the model; send raw sensor values.

## Model and training
- {settings.num_layers}-layer LSTM, hidden size {settings.hidden_size}, linear head + softmax.
- Loss: cross-entropy at every timestep, averaged. AdamW, learning rate
  {settings.learning_rate}, weight decay {settings.weight_decay}, {settings.epochs} full-batch
  epochs, gradient norm clipped at 1, seed {settings.seed}, {settings.threads} CPU threads.
- Reproduce: `pip install -e '.[train]' && lstm-model train --out lstm_model/bundled`
  ({seconds:.0f} s on the 2-core CPU machine it was trained on).

## Held-out accuracy
Accuracy of the most probable activity after the model has seen t timesteps
(`lstm-model eval` prints this table):

{table}

## Limits
Four people, four activities, 80 recordings in all: a demonstration model, not a product one.
Accuracy after very few timesteps is low because the model has seen little motion yet.
""")


def train_bundled(out: Path, settings: TrainSettings = TrainSettings()) -> dict[int, float]:
    started = time.perf_counter()
    train_set = load_basic_motions("train")
    heldout = load_basic_motions("test")
    if heldout.label_names != train_set.label_names:
        raise RuntimeError(f"label sets differ: {train_set.label_names} vs {heldout.label_names}")
    model = train(settings, train_set)
    seconds = time.perf_counter() - started
    accuracy = evaluate(model, heldout)
    save_model(model, out)
    heldout.save(out / "heldout.safetensors")
    write_model_card(out, settings, accuracy, heldout, len(train_set.labels), seconds)
    return accuracy
