"""Labelled recordings (sequences and one label each), stored as safetensors: the bundled model's
held-out set ships this way so the demo and the tests stream real data without the training extra.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lstm_model.checkpoint import BUNDLED_MODEL_DIR

BUNDLED_RECORDINGS = BUNDLED_MODEL_DIR / "heldout.safetensors"


@dataclass(frozen=True)
class Recordings:
    inputs: torch.Tensor  # (N, T, input_size) float32, raw (unnormalised) features
    labels: torch.Tensor  # (N,) int64, indices into label_names
    label_names: tuple[str, ...]
    source: str = ""

    def save(self, path: Path | str) -> None:
        metadata = {"label_names": json.dumps(list(self.label_names)), "source": self.source}
        save_file(
            {"inputs": self.inputs.contiguous(), "labels": self.labels.contiguous()},
            str(path),
            metadata=metadata,
        )


def load_recordings(path: Path | str = BUNDLED_RECORDINGS) -> Recordings:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        return Recordings(
            inputs=f.get_tensor("inputs"),
            labels=f.get_tensor("labels"),
            label_names=tuple(json.loads(metadata.get("label_names", "[]"))),
            source=metadata.get("source", ""),
        )
