"""Models and versions (DESIGN 1.8): the repository on disk and the versions loaded from it.

A repository is `DIR/NAME/VERSION/`, each VERSION a positive integer and a model directory.
Every loaded version has engine state of its own (pool, replay rings, batcher), so a batch never
mixes versions, and a session lives on one version for its whole life. New sessions of a model
go to its newest READY version.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lstm_model.checkpoint import LoadedModel
from lstm_model.config import LSTMConfig
from lstm_model.repository import version_number
from server import metrics
from server.batcher import Batcher
from server.config import ServerConfig
from server.engine import DTYPES, Engine
from server.errors import ModelNotFound
from server.sessions import ReplayPool
from server.state_pool import StatePool
from server.state_store import StateStore
from server.steps import Commit

log = logging.getLogger(__name__)


class VersionState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    DRAINING = "DRAINING"  # left the repository: its sessions go on, new ones are refused
    FAILED = "FAILED"  # did not load; skipped until its files change


@dataclass(frozen=True, order=True)
class VersionKey:
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


def scan_repository(root: Path) -> dict[VersionKey, Path]:
    """Every `root/NAME/VERSION/` holding a config.json; other entries (files, hidden or
    unreadable directories such as a volume's lost+found) are ignored. OSError: the root
    itself cannot be listed."""
    found: dict[VersionKey, Path] = {}
    for model_dir in sorted(root.iterdir()):
        if model_dir.name.startswith("."):
            continue
        try:
            entries = list(model_dir.iterdir()) if model_dir.is_dir() else []
        except OSError as exc:
            log.warning("model repository: %s skipped (%s)", model_dir, exc)
            continue
        for version_dir in entries:
            version = version_number(version_dir.name)
            try:
                if version is not None and (version_dir / "config.json").is_file():
                    found[VersionKey(model_dir.name, version)] = version_dir
            except OSError as exc:
                log.warning("model repository: %s skipped (%s)", version_dir, exc)
    return found


def files_signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """What a retry of a failed version compares: its files' names, sizes and mtimes."""
    try:
        return tuple(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir())
        )
    except OSError:
        return ()


def single_model_key(config: LSTMConfig) -> VersionKey:
    """--model DIR: a repository of one, named and numbered by its config.json."""
    return VersionKey(config.name, version_number(str(config.version)) or 1)


class ModelVersion:
    """One loaded version: its engine, replay rings and batcher, and how many sessions and
    other users hold it (it unloads when it drains to none). Unloaded, it keeps only its key,
    config and fingerprint."""

    def __init__(
        self,
        key: VersionKey,
        loaded: LoadedModel,
        config: ServerConfig,
        device: torch.device,
        store: StateStore | None,
    ) -> None:
        self.key = key
        self.loaded = loaded
        self.config = loaded.model.config
        self.fingerprint = loaded.fingerprint
        self.engine = Engine(
            loaded,
            config.max_sessions,
            device,
            DTYPES[config.dtype],
            config.max_batch_size,
            torch_threads=config.torch_threads,
            one_step_kernel=config.one_step_kernel,
        )
        self.replay = ReplayPool(config.max_sessions, config.replay_steps, self.config.output_size)
        self.batcher = Batcher(
            self.engine,
            Commit(self.replay, store),
            config.max_batch_size,
            config.max_batch_delay_us,
            model=key.name,
            version=key.version,
        )
        self.state = VersionState.READY
        self.sessions = 0  # live sessions on this version
        self.users = 0  # work that holds it loaded without a session: Predict calls, a move
        metrics.SESSIONS_CREATED.labels(key.name)  # exported as 0 from the start
        metrics.MODEL_SESSIONS.labels(key.name, str(key.version)).set(0)

    def count_sessions(self, delta: int) -> None:
        """A session took a slot here (+1) or gave its zeroed slot back (-1)."""
        self.sessions += delta
        if delta > 0:
            metrics.SESSIONS_CREATED.labels(self.key.name).inc(delta)
        metrics.MODEL_SESSIONS.labels(self.key.name, str(self.key.version)).set(self.sessions)

    @property
    def pool(self) -> StatePool:
        return self.engine.pool

    @property
    def idle(self) -> bool:
        return self.sessions == 0 and self.users == 0

    def describe(self) -> str:
        c = self.config
        return (
            f"model {self.key} ({self.fingerprint[:12]}) on {self.engine.device}/"
            f"{str(self.engine.dtype).removeprefix('torch.')}: {c.cell}, input {c.input_size}, "
            f"hidden {c.hidden_size} x {c.num_layers} layers, output {c.output_size}; state pool "
            f"{self.pool.nbytes / 2**20:.1f} MiB"
        )


@dataclass
class Failure:
    """A version that did not load: why, and the files it was tried with."""

    error: str
    signature: tuple[tuple[str, int, int], ...]


@dataclass
class Models:
    """The versions this server holds, by model; which model requests that name none use."""

    default_name: str = ""
    versions: dict[str, dict[int, ModelVersion]] = field(default_factory=dict)
    failed: dict[VersionKey, Failure] = field(default_factory=dict)
    loading: set[VersionKey] = field(default_factory=set)

    def __iter__(self) -> Iterator[ModelVersion]:
        return iter([v for versions in self.versions.values() for v in versions.values()])

    def add(self, model: ModelVersion) -> None:
        self.versions.setdefault(model.key.name, {})[model.key.version] = model
        self.failed.pop(model.key, None)
        metrics.MODEL_INFO.labels(model.key.name, str(model.key.version)).info(
            {
                "device": str(model.engine.device),
                "dtype": str(model.engine.dtype).removeprefix("torch."),
                "fingerprint": model.fingerprint[:12],
                "cell": model.config.cell,
            }
        )
        self.update_state_metric(model)
        metrics.STATE_BYTES.set(sum(v.pool.nbytes for v in self))

    def remove(self, model: ModelVersion) -> None:
        versions = self.versions.get(model.key.name, {})
        if versions.get(model.key.version) is model:
            del versions[model.key.version]
        if not versions:
            self.versions.pop(model.key.name, None)
        metrics.STATE_BYTES.set(sum(v.pool.nbytes for v in self))
        labels = (model.key.name, str(model.key.version))
        for metric in (metrics.MODEL_INFO, metrics.MODEL_SESSIONS):
            with contextlib.suppress(KeyError):
                metric.remove(*labels)
        for state in VersionState:
            with contextlib.suppress(KeyError):
                metrics.MODEL_VERSION_STATE.remove(*labels, state.value)

    def update_state_metric(self, model: ModelVersion) -> None:
        for state in (VersionState.READY, VersionState.DRAINING):
            metrics.MODEL_VERSION_STATE.labels(
                model.key.name, str(model.key.version), state.value
            ).set(1 if model.state is state else 0)

    def get(self, key: VersionKey) -> ModelVersion | None:
        return self.versions.get(key.name, {}).get(key.version)

    def holds(self, model: ModelVersion) -> bool:
        """Whether the version is still loaded (not unloaded after draining)."""
        return self.get(model.key) is model

    def choose_default(self, preferred: str) -> None:
        """Keep requests that name no model working when the default model left: the
        preferred (--default-model) or current one while it has a READY version, else the
        first model by name that has one."""
        ready = sorted(
            name
            for name, versions in self.versions.items()
            if any(v.state is VersionState.READY for v in versions.values())
        )
        for name in (preferred, self.default_name):
            if name in ready:
                self.default_name = name
                return
        if ready:
            if self.default_name:  # none named (--default-model unset) is no cause to warn
                log.warning(
                    "default model %r has no ready version: %r is the default now",
                    self.default_name,
                    ready[0],
                )
            self.default_name = ready[0]

    def with_fingerprint(self, fingerprint: str) -> ModelVersion | None:
        return next((v for v in self if v.fingerprint == fingerprint), None)

    def resolve(self, name: str = "", version: int = 0, new_work: bool = True) -> ModelVersion:
        """The version a request names (empty / 0: the default model, its newest READY
        version). `new_work`: a new session or a Predict, which a DRAINING version refuses."""
        asked = name
        name = name or self.default_name
        versions = self.versions.get(name)
        if not versions:
            raise ModelNotFound(
                f"model: expected one of {sorted(self.versions)} (or empty for the default, "
                f"{self.default_name!r}), got {asked!r}"
            )
        ready = sorted(n for n, v in versions.items() if v.state is VersionState.READY)
        if not version:
            if not ready:
                raise ModelNotFound(f"model {name!r}: no version is ready (all are draining)")
            return versions[ready[-1]]
        found = versions.get(version)
        if found is None or (new_work and found.state is not VersionState.READY):
            why = "draining: it left the repository" if found is not None else "not loaded"
            raise ModelNotFound(
                f"model_version: expected one of {ready} for model {name!r} (or 0 for the "
                f"newest), got {version} ({why})"
            )
        return found
