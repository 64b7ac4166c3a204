"""Builders for what the tests need; every argument has a default."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from lstm_model.checkpoint import save_model
from lstm_model.cli import init_model
from lstm_model.model import SequenceModel


def make_model(
    input_size: int = 4,
    hidden_size: int = 16,
    num_layers: int = 2,
    output_size: int = 3,
    seed: int = 0,
    kind: str = "regression",
    normalised: bool = False,
) -> SequenceModel:
    model = init_model(input_size, hidden_size, num_layers, output_size, seed, kind)
    if normalised:
        generator = torch.Generator().manual_seed(seed + 1)
        mean = torch.randn(input_size, generator=generator)
        std = torch.rand(input_size, generator=generator) + 0.5
        config = model.config.__class__(
            **{**model.config.to_dict(), "input_mean": mean.tolist(), "input_std": std.tolist()}
        )
        normalised_model = SequenceModel(config)
        normalised_model.load_state_dict(model.state_dict())
        model = normalised_model.eval()
    return model


def make_model_dir(path: Path, **model_args) -> Path:
    return save_model(make_model(**model_args), path)


def make_inputs(batch: int = 2, steps: int = 7, input_size: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, steps, input_size, generator=generator)  # (B, T, I)


def console_script(name: str) -> str:
    """Path of an installed console script: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e ."
    return found
