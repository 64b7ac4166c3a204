"""Server assembly: create_server(config) builds it, serve() runs it until SIGTERM/SIGINT,
main() is the lstm-serve console script."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from lstm_model.checkpoint import ModelLoadError
from lstm_stream.v1 import inference_pb2
from server import metrics
from server.config import ServerConfig, load_config
from server.engine import default_torch_threads, resolve_device
from server.errors import ServiceError
from server.oip import OIP_SERVICE_NAME, OpenInferenceService, add_oip_servicer
from server.rollout import RepositoryError
from server.rpc import add_servicer
from server.runtime import Runtime
from server.security import AuthInterceptor, TokenFileError, TokenStore, server_credentials
from server.service import InferenceService
from server.snapshot import (
    SNAPSHOT_FILE,
    SnapshotError,
    discard_snapshot,
    ensure_writable,
    read_snapshot,
    write_snapshot,
)
from server.transfer import SessionRecord

log = logging.getLogger(__name__)
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


@dataclass
class Server:
    config: ServerConfig
    grpc_server: grpc.aio.Server
    port: int
    runtime: Runtime
    health: health.aio.HealthServicer
    tokens: TokenStore | None = None

    async def start(self) -> None:
        await self.restore_snapshot()
        await self.runtime.start()
        await self.grpc_server.start()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    def reload(self) -> None:
        """SIGHUP: re-read the token file and the model repository."""
        if self.tokens is not None:
            self.tokens.reload()
        self.runtime.reload_repository()

    async def begin_drain(self) -> None:
        """Health NOT_SERVING, new streams and messages refused, in-flight ones answered."""
        await self.health.enter_graceful_shutdown()
        await self.runtime.drain()

    async def stop(self, grace_s: float) -> None:
        await self.begin_drain()
        await self.grpc_server.stop(grace_s)
        await self.write_snapshot()
        await self.runtime.stop()

    @property
    def _snapshot_dir(self) -> Path | None:
        directory = self.config.snapshot_dir
        return Path(directory) if directory else None

    async def restore_snapshot(self) -> None:
        """Restore the sessions of --snapshot-dir; refuse (or set aside) a bad snapshot."""
        directory = self._snapshot_dir
        if directory is None:
            return
        try:
            records = read_snapshot(directory)
            records = self._placeable(directory, records)
        except SnapshotError as exc:
            if not self.config.snapshot_discard_invalid:
                raise
            aside = discard_snapshot(directory, "rejected")
            log.warning("%s; moved to %s, starting with no sessions", exc, aside)
            return
        sessions = await self.runtime.restore(records)
        if discard_snapshot(directory, "restored"):
            log.info("restored %d sessions from %s", len(sessions), directory)

    def _placeable(self, directory: Path, records: list[SessionRecord]) -> list[SessionRecord]:
        """The sessions whose version is loaded with the very model they were stepped with.
        The others (a restart in the middle of a rollout: their version left the repository)
        are written aside as a snapshot of their own, for a server that holds their version;
        when none is placeable the whole snapshot is refused, as another model's."""
        placeable, lost, why = [], [], ""
        for record in records:
            try:
                self.runtime.check_placeable(record)
                placeable.append(record)
            except ServiceError as exc:
                lost.append(record)
                why = why or exc.message
        if lost and not placeable:
            raise SnapshotError(
                f"{directory / SNAPSHOT_FILE}: {why}; restoring it would apply another "
                "model's state (serve that version, or --snapshot-discard-invalid)"
            )
        if lost:
            aside = directory / f"unrestored-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            write_snapshot(aside, lost)
            log.warning(
                "%d sessions of the snapshot live on versions this server does not hold (%s): "
                "written to %s; start a server holding them with --snapshot-dir %s",
                len(lost),
                why,
                aside / SNAPSHOT_FILE,
                aside,
            )
        return placeable

    async def write_snapshot(self) -> None:
        directory = self._snapshot_dir
        if directory is None:
            return
        records = await self.runtime.records()
        path = write_snapshot(directory, records)
        log.info("wrote %d sessions to %s", len(records), path)


async def create_server(config: ServerConfig) -> tuple[Server, int]:
    """Load the model and build the server, bound but not started; (server, bound port)."""
    device = resolve_device(config.device)
    if config.snapshot_dir:
        ensure_writable(Path(config.snapshot_dir))
    torch.set_num_threads(config.torch_threads or default_torch_threads())
    runtime = Runtime(config, device)
    await runtime.load_models()
    tokens = TokenStore(config.auth_tokens) if config.auth_tokens else None
    interceptors = [AuthInterceptor(tokens, config.auth_health)] if tokens else []
    grpc_server = grpc.aio.server(interceptors=interceptors, options=server_options(config))
    add_servicer(InferenceService(runtime, config, tokens), grpc_server)
    add_oip_servicer(OpenInferenceService(runtime, config, tokens), grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            OIP_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        grpc_server,
    )
    port = bind_grpc_port(grpc_server, config)
    metrics.SESSIONS_CAPACITY.set(config.max_sessions)
    log.info(
        "capacity %d sessions; default model %s%s",
        config.max_sessions,
        runtime.default_model,
        f"; repository {config.model_repository}, re-read on SIGHUP"
        + (f" and every {config.repository_poll_s:g} s" if config.repository_poll_s else "")
        if config.model_repository
        else "",
    )
    log.info(
        "transport %s; auth %s",
        _describe_tls(config),
        f"tokens from {config.auth_tokens}" if tokens else "off",
    )
    return Server(config, grpc_server, port, runtime, health_servicer, tokens), port


def bind_grpc_port(grpc_server: grpc.aio.Server, config: ServerConfig) -> int:
    """Bind --host:--port; a port another process listens on is refused, never shared."""
    ensure_port_free(config.host, config.port, "--port")
    address = f"{config.host}:{config.port}"
    credentials = server_credentials(config)
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(address)
        else:
            port = grpc_server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"--port {config.port}: cannot bind {address}")
    return port


def ensure_port_free(host: str, port: int, flag: str) -> None:
    """Raise a one-line OSError naming the flag and the port when it cannot be bound."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
            probe.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(f"{flag} {port}: cannot bind {host}:{port}: {reason}") from None


def start_metrics_server(config: ServerConfig) -> None:
    host = config.host.strip("[]")
    ensure_port_free(config.host, config.metrics_port, "--metrics-port")
    start_http_server(config.metrics_port, addr=host)
    log.info("metrics on :%d/metrics", config.metrics_port)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    ping_ms = int(config.min_ping_interval_s * 1000)
    return [
        # Off: with SO_REUSEPORT a second server on a taken port would silently share it.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        # Keepalive enforcement: pings closer together than this earn strikes; then GOAWAY.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", ping_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", ping_ms),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def _describe_tls(config: ServerConfig) -> str:
    if not config.tls_cert:
        return "plaintext"
    return "mutual TLS" if config.tls_client_ca else "TLS"


GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (Python's default: 700)


async def serve(config: ServerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before anything can announce readiness
        loop.add_signal_handler(sig, stop.set)
    server, port = await create_server(config)
    if config.metrics_port:
        start_metrics_server(config)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    await server.start()
    settle_garbage_collector()
    log.info("serving on %s:%d", config.host, port)
    await stop.wait()
    log.info("shutdown requested: draining (grace %.1f s)", config.shutdown_grace_s)
    await server.stop(config.shutdown_grace_s)
    log.info("stopped")


def settle_garbage_collector() -> None:
    """What was built at start (the model, torch, gRPC, restored sessions) lives as long as the
    process: freeze it out of the collector's passes, and collect young objects in bigger
    rounds. A batch message makes thousands of short-lived objects; with the defaults, full
    passes over the whole heap halved StreamBatches throughput (docs/performance.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ValueError as exc:
        print(f"lstm-serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(config))
    except (
        ModelLoadError,
        RepositoryError,
        SnapshotError,
        TokenFileError,
        ValueError,
        OSError,
    ) as exc:
        print(f"lstm-serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
