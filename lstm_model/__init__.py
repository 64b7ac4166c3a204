"""The network alone: configuration, model, reference cell and checkpoints. No gRPC here."""

from lstm_model.checkpoint import (
    BUNDLED_MODEL_DIR,
    LoadedModel,
    ModelLoadError,
    load_model,
    save_model,
)
from lstm_model.config import ConfigError, LSTMConfig
from lstm_model.model import SequenceModel, State

__all__ = [
    "BUNDLED_MODEL_DIR",
    "ConfigError",
    "LSTMConfig",
    "LoadedModel",
    "ModelLoadError",
    "SequenceModel",
    "State",
    "load_model",
    "save_model",
]
