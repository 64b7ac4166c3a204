"""Rollout (DESIGN 1.8): the repository re-read on SIGHUP and every --repository-poll-s seconds.

A new version loads in the background (its weights and engine are built off the event loop, so
serving never pauses) and then takes its model's new sessions; a version that left the
repository drains (its sessions go on, new ones are refused) and unloads when its last session
ends or expires; a version that fails to load is logged, listed as FAILED and retried only
when its files change. Versions are immutable: a changed directory under the same number is
not reloaded (publish a new number).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import torch

from lstm_model.checkpoint import LoadedModel, ModelLoadError, load_model
from server import metrics
from server.config import ServerConfig
from server.models import (
    Failure,
    Models,
    ModelVersion,
    VersionKey,
    VersionState,
    files_signature,
    scan_repository,
    single_model_key,
)
from server.state_store import StateStore

log = logging.getLogger(__name__)


class RepositoryError(Exception):
    """Nothing could be served at start; the message says what was found and why it failed."""


class Rollout:
    def __init__(
        self, config: ServerConfig, device: torch.device, models: Models, store: StateStore | None
    ) -> None:
        self.config = config
        self.device = device
        self.models = models
        self.store = store
        self.root = Path(config.model_repository) if config.model_repository else None
        self._lock = asyncio.Lock()  # one pass over the repository at a time
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None

    async def load_initial(self) -> None:
        """Load what the repository holds now (or the --model directory)."""
        if self.root is None:
            loaded = await asyncio.to_thread(load_model, self.config.model)
            key = single_model_key(loaded.model.config)
            model = await self._build(key, loaded)
            self.models.add(model)
            self.models.default_name = key.name
            log.info("loaded %s", model.describe())
            return
        if not self.root.is_dir():
            raise RepositoryError(f"--model-repository {self.root}: not a directory")
        await self.reload()
        if not any(True for _ in self.models):
            failed = "; ".join(f"{k}: {f.error}" for k, f in self.models.failed.items())
            raise RepositoryError(
                f"--model-repository {self.root}: expected NAME/VERSION/ model directories, "
                f"loaded none ({failed or 'none found'})"
            )
        default = self.config.default_model
        if default and not self.models.versions.get(default):
            raise RepositoryError(
                f"--default-model {default!r}: not in the repository "
                f"(it holds {sorted(self.models.versions)})"
            )
        self.models.default_name = default or min(self.models.versions)

    def start(self) -> None:
        if self.root is not None and self.config.repository_poll_s > 0:
            self._poller = asyncio.create_task(self._poll(), name="repository-poll")

    def request_reload(self) -> None:
        """SIGHUP: re-read the repository soon, in the background."""
        log.info("SIGHUP: re-reading the model repository")
        self._spawn(self.reload())

    async def reload(self) -> None:
        """One pass: load new versions, drain removed ones. Returns once new ones are loaded."""
        if self.root is None:
            return
        async with self._lock:
            try:
                found = await asyncio.to_thread(scan_repository, self.root)
            except OSError as exc:
                log.error(
                    "model repository %s: cannot be read (%s); keeping what is loaded",
                    self.root,
                    exc,
                )
                return
            new = [(key, path) for key, path in found.items() if self._wanted(key, path)]
            await asyncio.gather(*(self._load(key, path) for key, path in new))
            if not found and any(True for _ in self.models):
                # An empty listing is more likely a volume not mounted (yet) than an intended
                # retirement of every model at once.
                log.error(
                    "model repository %s lists no version: keeping what is loaded "
                    "(remove versions one model at a time to retire them)",
                    self.root,
                )
                metrics.REPOSITORY_READS.inc()
                return
            for model in list(self.models):
                if model.key not in found:
                    self._drain(model)
                elif model.state is VersionState.DRAINING:
                    model.state = VersionState.READY
                    self.models.update_state_metric(model)
                    log.info("model %s is back in the repository: ready again", model.key)
            self.models.choose_default(self.config.default_model)
            metrics.REPOSITORY_READS.inc()

    def _wanted(self, key: VersionKey, path: Path) -> bool:
        if self.models.get(key) is not None:
            return False
        failure = self.models.failed.get(key)
        return failure is None or failure.signature != files_signature(path)

    async def _load(self, key: VersionKey, path: Path) -> None:
        signature = files_signature(path)
        self.models.loading.add(key)
        try:
            loaded = await asyncio.to_thread(load_model, path)
            config = loaded.model.config
            if (config.name, str(config.version)) != (key.name, str(key.version)):
                log.warning(
                    "model %s: its config.json says %s version %s; the repository's names win",
                    key,
                    config.name,
                    config.version,
                )
            model = await self._build(key, loaded)
        except Exception as exc:  # whatever it was, the rest keeps serving
            self.models.failed[key] = Failure(str(exc) or type(exc).__name__, signature)
            metrics.MODEL_LOADS.labels("failed").inc()
            log.error(
                "model %s (%s) did not load, skipped: %s",
                key,
                path,
                exc,
                exc_info=not isinstance(exc, ModelLoadError | OSError),
            )
            return
        finally:
            self.models.loading.discard(key)
        self.models.add(model)
        metrics.MODEL_LOADS.labels("ok").inc()
        newest = self.models.resolve(key.name)
        log.info(
            "loaded %s; new sessions of %s go to v%d",
            model.describe(),
            key.name,
            newest.key.version,
        )

    async def _build(self, key: VersionKey, loaded: LoadedModel) -> ModelVersion:
        model = await asyncio.to_thread(
            ModelVersion, key, loaded, self.config, self.device, self.store
        )
        model.batcher.start()
        return model

    def _drain(self, model: ModelVersion) -> None:
        if model.state is VersionState.DRAINING:
            return
        model.state = VersionState.DRAINING
        self.models.update_state_metric(model)
        log.info(
            "model %s left the repository: draining (%d sessions go on, new ones refused)",
            model.key,
            model.sessions,
        )
        self.unload_if_drained(model)

    @contextlib.contextmanager
    def pinned(self, model: ModelVersion) -> Iterator[ModelVersion]:
        """Hold a version loaded without a session (a Predict call, a session moving onto it):
        a draining version unloads once its last session and pin are gone."""
        model.users += 1
        try:
            yield model
        finally:
            model.users -= 1
            self.unload_if_drained(model)

    def unload_if_drained(self, model: ModelVersion) -> None:
        """Called when a session's slot or a Predict call is given back."""
        if model.state is VersionState.DRAINING and model.idle:
            self.models.remove(model)  # no new lookups find it from here on
            self._spawn(self._unload(model))

    async def _unload(self, model: ModelVersion) -> None:
        await model.batcher.stop()
        await asyncio.to_thread(model.engine.close)  # frees the state pool
        model.replay.free()
        del model.engine, model.loaded, model.replay, model.batcher
        # What is left (weights, engine, batcher) may hang together in reference cycles, and
        # the collector runs its full passes rarely (server/app.py): collect them now.
        gc.collect()
        metrics.MODEL_UNLOADS.inc()
        log.info("model %s unloaded (its last session ended)", model.key)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.repository_poll_s)
            try:
                await self.reload()
            except Exception:  # a bug here must not stop the polling
                log.exception("re-reading the model repository failed")

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
