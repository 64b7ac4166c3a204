"""Per-timestep accuracy of a classifier on labelled recordings: after t steps, how often does
the most probable class equal the recording's label?"""

from __future__ import annotations

import torch

from lstm_model.model import SequenceModel
from lstm_model.recordings import Recordings

CHECKPOINT_STEPS = (10, 25, 50, 100)


def accuracy_by_step(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """outputs (N, T, classes), labels (N,) -> accuracy after each step (T,)."""
    predicted = outputs.argmax(dim=-1)  # (N, T)
    return (predicted == labels[:, None]).float().mean(dim=0)  # (T,)


@torch.inference_mode()
def evaluate(
    model: SequenceModel, recordings: Recordings, steps: tuple[int, ...] = CHECKPOINT_STEPS
) -> dict[int, float]:
    if not model.config.is_classification:
        raise ValueError(
            f"model {model.config.name!r} is a regression model: no accuracy to report"
        )
    outputs, _ = model(recordings.inputs.to(model.head.weight))
    by_step = accuracy_by_step(outputs, recordings.labels.to(outputs.device))
    return {t: float(by_step[t - 1]) for t in steps if t <= by_step.shape[0]}


def format_accuracy_table(accuracy: dict[int, float], count: int) -> str:
    lines = ["| timesteps seen | held-out accuracy |", "| ---: | ---: |"]
    lines += [f"| {t} | {acc:.1%} ({round(acc * count)}/{count}) |" for t, acc in accuracy.items()]
    return "\n".join(lines)
