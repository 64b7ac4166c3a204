"""Connection options shared by the sync and asyncio clients."""

from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc

SERVICE = "lstm_stream.v1.InferenceService"
PARTITION_METADATA = "x-lstm-partition"  # the routing key of batch calls (batching.py)
UNARY_METHODS = (
    "GetModelInfo",
    "ListModels",
    "CreateSession",
    "GetSession",
    "DeleteSession",
    "Predict",
    "ExportSession",
    "ImportSession",
)
# Unary calls the client may repeat itself after a transport failure: a repeat has the same
# effect (CreateSession with the client's own random id answers SESSION_EXISTS, which the
# client recognises as its own).
IDEMPOTENT = frozenset(
    {"GetModelInfo", "ListModels", "CreateSession", "GetSession", "Predict", "ExportSession"}
)
# Codes after which a stream is reopened and its unanswered chunks resent: the connection or
# the server went away, or a message was not answered in time.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# These too, when they come from the transport (a cut connection shows as "Internal error from
# Core" or an RST_STREAM) rather than from the server's logic, whose errors carry a reason.
RETRYABLE_WITHOUT_REASON = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
)


def lacks_port(target: str) -> bool:
    """Whether a target is a host with no port ('localhost', '[::1]', 'host:'). gRPC dials port
    443 (https's) for it, not lstm-serve's 50051. A target with a scheme ('dns:', 'unix:',
    'ipv4:', ...) is taken as given."""
    bracketed = re.fullmatch(r"\[[^\]]*\](:\d*)?", target)
    if bracketed:
        return bracketed.group(1) in (None, ":")
    return bool(re.fullmatch(r"[^:/\[\]]+:?", target))


def is_retryable(code: grpc.StatusCode, reason: str) -> bool:
    """Resending is always safe (the server applies each step once); this says when it helps."""
    if reason == "SHUTTING_DOWN":
        return True
    return code in RETRYABLE or (code in RETRYABLE_WITHOUT_REASON and not reason)


@dataclass(frozen=True)
class ClientOptions:
    target: str = "localhost:50051"
    # TLS: a CA bundle to trust (PEM path); a client certificate and key for mutual TLS.
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None  # override the name checked against the certificate
    token: str | None = None  # sent as `authorization: Bearer <token>`
    deadline_s: float | None = 30.0  # per unary call, and per stream message's answer
    keepalive_s: float = 30.0  # HTTP/2 pings on idle connections (0: off)
    max_retries: int = 10  # stream reconnects in a row before giving up
    # Durable sessions: answered timesteps kept until the server's store holds them, to resend
    # if the replica is lost; beyond this many (the store far behind), the oldest are dropped.
    max_unstored_steps: int = 8192
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    extra_metadata: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    # Behind a session-affine balancer: route every call by the session's partition,
    # crc32(id) % partitions, sent as `x-lstm-partition` (0: off, route by x-session-id).
    # Batch calls then carry one partition's sessions each. The README's scale-out section.
    partitions: int = 0

    @property
    def secure(self) -> bool:
        return self.tls or bool(self.tls_ca or self.tls_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        credentials = grpc.ssl_channel_credentials(
            read(self.tls_ca), read(self.tls_key), read(self.tls_cert)
        )
        if self.token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(self.token)
            )
        return credentials

    def channel_options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.service_config", json.dumps(retry_service_config())),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # Reconnect soon after a dropped connection (gRPC's default first wait is 1 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(self.backoff_max_s * 1000)),
        ]
        if self.keepalive_s:
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def metadata(self, session_id: str = "", partition: str = "") -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the session id (and, with partitions, its partition) for a
        balancer, the token on plaintext channels (TLS channels carry it as call credentials
        instead). A batch call names its partition instead of a session."""
        metadata = list(self.extra_metadata)
        if session_id:
            metadata.append(("x-session-id", session_id))
            if self.partitions:
                partition = str(zlib.crc32(session_id.encode()) % self.partitions)
        if partition:
            metadata.append((PARTITION_METADATA, partition))
        if self.token and not self.secure:
            metadata.append(("authorization", f"Bearer {self.token}"))
        return tuple(metadata)

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter, for reconnect `attempt` (1, 2, ...)."""
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)


def retry_service_config() -> dict:
    """gRPC's own retries for the unary calls (a stream's are the client's: see ledger.py)."""
    return {
        "methodConfig": [
            {
                "name": [{"service": SERVICE, "method": m} for m in UNARY_METHODS],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
