"""The model directory: config.json + model.safetensors. Never pickle.

Loading checks the directory the way a server must before it takes traffic: every tensor present,
of the shape and dtype the config implies, and finite; any failure names the file and the tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from lstm_model.config import GATES, ConfigError, LSTMConfig
from lstm_model.model import SequenceModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BUNDLED_MODEL_DIR = Path(__file__).parent / "bundled"


class ModelLoadError(Exception):
    """A model directory that cannot be served; the message names what is wrong."""


@dataclass(frozen=True)
class LoadedModel:
    model: SequenceModel
    fingerprint: str  # sha256 over config.json's content and every tensor's bytes
    path: Path


def expected_shapes(config: LSTMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds, with its shape."""
    rows = GATES[config.cell] * config.hidden_size  # the gate blocks, stacked
    cell = config.cell
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(config.num_layers):
        layer_in = config.input_size if k == 0 else config.hidden_size
        shapes[f"{cell}.weight_ih_l{k}"] = (rows, layer_in)
        shapes[f"{cell}.weight_hh_l{k}"] = (rows, config.hidden_size)
        shapes[f"{cell}.bias_ih_l{k}"] = (rows,)
        shapes[f"{cell}.bias_hh_l{k}"] = (rows,)
    shapes["head.weight"] = (config.output_size, config.hidden_size)
    shapes["head.bias"] = (config.output_size,)
    return shapes


def fingerprint(config: LSTMConfig, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(config.to_json().encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def save_model(model: SequenceModel, out_dir: Path | str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    (out / CONFIG_FILE).write_text(model.config.to_json())
    # write_bytes: created as any file is (the umask decides), where save_file made it 0600.
    (out / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "lstm-stream/1"}))
    return out


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file (a model directory holds {WEIGHTS_FILE})")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from None


def check_tensors(config: LSTMConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise ModelLoadError naming the first tensor that does not fit the config."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ModelLoadError(f"{source}: missing tensors {missing}")
    if unexpected:
        raise ModelLoadError(f"{source}: unexpected tensors {unexpected}")
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {list(tensor.shape)}, expected {list(shape)} "
                f"(input_size={config.input_size}, hidden_size={config.hidden_size}, "
                f"output_size={config.output_size})"
            )
        if tensor.dtype != torch.float32:
            raise ModelLoadError(
                f"{source}: tensor {name} has dtype {tensor.dtype}, expected float32"
            )
        if not torch.isfinite(tensor).all():
            raise ModelLoadError(f"{source}: tensor {name} holds NaN or infinite values")


def load_model(
    model_dir: Path | str = BUNDLED_MODEL_DIR,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load and check a model directory; the model comes back in eval mode on `device`."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        config = LSTMConfig.load(path / CONFIG_FILE)
    except ConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    weights_path = path / WEIGHTS_FILE
    tensors = _read_tensors(weights_path)
    check_tensors(config, tensors, str(weights_path))
    model = SequenceModel(config)
    model.load_state_dict(tensors)
    model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model=model, fingerprint=fingerprint(config, tensors), path=path)
