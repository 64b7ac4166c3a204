"""The model's configuration: every size and setting a checkpoint needs, saved as config.json."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTPUT_KINDS = ("regression", "classification")
# The recurrent cells a model may use, and the state each keeps per session: tensors of shape
# (num_layers, hidden_size), by name, in the order the cell takes them.
STATE_NAMES = {"lstm": ("h", "c"), "gru": ("h",)}
CELLS = tuple(STATE_NAMES)
GATES = {"lstm": 4, "gru": 3}  # gate blocks stacked in the cell's weight rows


class ConfigError(ValueError):
    """A config.json that cannot describe a model; the message says what is wrong."""


@dataclass(frozen=True)
class LSTMConfig:
    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int
    output_kind: str = "regression"
    labels: tuple[str, ...] = ()
    input_mean: tuple[float, ...] = ()  # empty: no normalisation
    input_std: tuple[float, ...] = ()
    name: str = "lstm"
    version: str = "1"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (training settings)
    cell: str = "lstm"  # "lstm" or "gru"; config.json files from before GRUs have none: lstm

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "input_mean", tuple(float(v) for v in self.input_mean))
        object.__setattr__(self, "input_std", tuple(float(v) for v in self.input_std))
        self._validate()

    def _validate(self) -> None:
        for name in ("input_size", "hidden_size", "num_layers", "output_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.cell not in CELLS:
            raise ConfigError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ConfigError(
                f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}"
            )
        if self.labels and len(self.labels) != self.output_size:
            raise ConfigError(
                f"labels: expected {self.output_size} (output_size), got {len(self.labels)}"
            )
        if self.output_kind == "regression" and self.labels:
            raise ConfigError("labels are only meaningful for output_kind 'classification'")
        if bool(self.input_mean) != bool(self.input_std):
            raise ConfigError("input_mean and input_std must be given together")
        for name in ("input_mean", "input_std"):
            values = getattr(self, name)
            if values and len(values) != self.input_size:
                raise ConfigError(
                    f"{name}: expected {self.input_size} values (input_size), got {len(values)}"
                )
            if any(not math.isfinite(v) for v in values):
                raise ConfigError(f"{name} holds a NaN or infinite value")
        if any(v <= 0 for v in self.input_std):
            raise ConfigError("input_std values must all be > 0")

    @property
    def is_classification(self) -> bool:
        return self.output_kind == "classification"

    @property
    def state_names(self) -> tuple[str, ...]:
        """The recurrent state a session keeps: these tensors, (num_layers, hidden_size) each."""
        return STATE_NAMES[self.cell]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["labels"] = list(self.labels)
        data["input_mean"] = list(self.input_mean)
        data["input_std"] = list(self.input_std)
        if self.cell == "lstm":  # as before GRUs: an LSTM's config, and fingerprint, unchanged
            del data["cell"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> LSTMConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"expected a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = {
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        unknown = sorted(set(data) - set(fields))
        missing = sorted(required - set(data))
        if unknown:
            raise ConfigError(f"unknown keys {unknown}; expected keys among {sorted(fields)}")
        if missing:
            raise ConfigError(f"missing required keys {missing}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def load(cls, path: Path) -> LSTMConfig:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
