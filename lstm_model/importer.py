"""Import a user's plain PyTorch checkpoint: an nn.LSTM or nn.GRU (batch_first) and an
nn.Linear head.

Sizes are read off the tensors, and the cell too (an LSTM stacks 4 gate blocks of hidden_size
rows, a GRU 3), so a user needs to say only where the two modules live in the state dict (their
key prefixes; by default the first of lstm., gru., rnn. that holds any) and, for a classifier,
the labels.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lstm_model.checkpoint import ModelLoadError, check_tensors
from lstm_model.config import CELLS, GATES, LSTMConfig
from lstm_model.model import SequenceModel

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # torch colours its refusal


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
        raise ModelLoadError(f"{path}: cannot read checkpoint: {exc}") from None
    except Exception as exc:  # weights_only refusal of pickled objects comes in several types
        raise ModelLoadError(
            f"{path}: expected a plain state dict of tensors (torch.save(model.state_dict())), "
            f"got {_refused_object(exc)}, which torch.load(weights_only=True) will not unpickle"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a dict of tensor name -> tensor")
    return state


def _refused_object(exc: Exception) -> str:
    """What torch's multi-line weights_only refusal names, on one line."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if found:
        return f"a pickled {found.group(1)}"
    plain = ANSI_ESCAPE.sub("", str(exc))
    lines = [line.strip() for line in plain.splitlines() if line.strip()]
    return f"a pickled object ({lines[-1] if lines else type(exc).__name__})"


def _keys(state: dict[str, torch.Tensor]) -> str:
    names = sorted(state)
    shown = ", ".join(names[:12])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > 12 else shown


DEFAULT_PREFIXES = ("lstm.", "gru.", "rnn.")


def _layer_count(rnn: dict[str, torch.Tensor], source: str, where: str) -> int:
    if any(k.endswith("_reverse") for k in rnn):
        raise ModelLoadError(f"{source}: bidirectional RNNs cannot stream; expected one direction")
    if any(k.startswith("weight_hr") for k in rnn):
        raise ModelLoadError(f"{source}: LSTMs with proj_size are not supported")
    layers = sorted(int(m.group(1)) for k in rnn if (m := re.fullmatch(r"weight_ih_l(\d+)", k)))
    if not layers or layers != list(range(len(layers))) or "weight_hh_l0" not in rnn:
        raise ModelLoadError(
            f"{source}: expected LSTM or GRU tensors weight_ih_l0, weight_hh_l0, ... under "
            f"{where}, found {sorted(rnn)}"
        )
    return len(layers)


def _cell_of(rnn: dict[str, torch.Tensor], named: str | None, source: str) -> str:
    """The cell whose gate rows the tensors hold (4 x hidden: LSTM, 3 x hidden: GRU), which
    must be the one `named`, if any."""
    rows, hidden = int(rnn["weight_ih_l0"].shape[0]), int(rnn["weight_hh_l0"].shape[1])
    found = next((cell for cell in CELLS if rows == GATES[cell] * hidden), None)
    if found is None:
        raise ModelLoadError(
            f"{source}: expected an nn.LSTM (4 x hidden = {4 * hidden} gate rows) or an nn.GRU "
            f"(3 x hidden = {3 * hidden}), found weight_ih_l0 with {rows} rows for hidden {hidden}"
        )
    if named is not None and named != found:
        raise ModelLoadError(
            f"{source}: --cell {named} expects {GATES[named]} x hidden = "
            f"{GATES[named] * hidden} gate rows, found {rows}: the tensors are an "
            f"nn.{found.upper()}"
        )
    return found


def _rnn_prefix(state: dict[str, torch.Tensor]) -> str:
    """The first default prefix that holds any tensor (lstm. when none does)."""
    return next(
        (p for p in DEFAULT_PREFIXES if any(k.startswith(p) for k in state)), DEFAULT_PREFIXES[0]
    )


def import_state_dict(
    state: dict[str, torch.Tensor],
    rnn_prefix: str | None = None,
    head_prefix: str = "fc.",
    kind: str = "regression",
    labels: tuple[str, ...] = (),
    mean: tuple[float, ...] = (),
    std: tuple[float, ...] = (),
    name: str = "imported",
    source: str = "checkpoint",
    version: str = "1",
    cell: str | None = None,
) -> SequenceModel:
    """The model the state dict holds; `cell` (lstm or gru) is read off the tensors when None,
    and checked against them otherwise."""
    prefix = rnn_prefix if rnn_prefix is not None else _rnn_prefix(state)
    rnn = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    head = {k[len(head_prefix) :]: v for k, v in state.items() if k.startswith(head_prefix)}
    if "weight" not in head:
        raise ModelLoadError(
            f"{source}: expected a head weight {head_prefix}weight (set --head-prefix); the "
            f"checkpoint's keys are {_keys(state)}"
        )
    if not rnn:
        raise ModelLoadError(
            f"{source}: expected LSTM or GRU tensors under the prefix {prefix!r} (set "
            f"--rnn-prefix); the checkpoint's keys are {_keys(state)}"
        )
    num_layers = _layer_count(rnn, source, f"the prefix {prefix!r}")
    cell = _cell_of(rnn, cell, source)
    hidden = rnn["weight_hh_l0"].shape[1]
    config = LSTMConfig(
        input_size=int(rnn["weight_ih_l0"].shape[1]),
        hidden_size=int(hidden),
        num_layers=num_layers,
        output_size=int(head["weight"].shape[0]),
        output_kind=kind,
        labels=labels,
        input_mean=mean,
        input_std=std,
        name=name,
        version=version,
        cell=cell,
    )
    tensors = {f"{cell}.{k}": v.float() for k, v in rnn.items()}
    tensors |= {f"head.{k}": v.float() for k, v in head.items()}
    for k in range(num_layers):  # nn.LSTM/GRU(bias=False), nn.Linear(bias=False): zero biases
        for bias in (f"{cell}.bias_ih_l{k}", f"{cell}.bias_hh_l{k}"):
            tensors.setdefault(bias, torch.zeros(GATES[cell] * config.hidden_size))
    tensors.setdefault("head.bias", torch.zeros(config.output_size))
    check_tensors(config, tensors, source)
    model = SequenceModel(config)
    model.load_state_dict(tensors)
    return model.eval()
