"""Who may call: TLS credentials, bearer tokens mapped to principals, per-principal rate limits.

Tokens are compared in constant time and never logged. Without --auth-tokens every caller is
the anonymous principal "" and sessions are shared; with it, a session belongs to the
principal that created it and is invisible (NOT_FOUND) to every other.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from server.config import ServerConfig
from server.errors import ServiceError

log = logging.getLogger(__name__)
ANONYMOUS = ""
OPEN_SERVICES = (  # probes: gRPC health, and the Open Inference Protocol's live and ready
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)


class Unauthenticated(ServiceError):
    code, reason = grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"


class RateLimited(ServiceError):
    code, reason = grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"


class TokenFileError(Exception):
    pass


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    try:
        key = Path(config.tls_key).read_bytes()
        chain = Path(config.tls_cert).read_bytes()
        client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    except OSError as exc:
        raise ValueError(f"TLS: cannot read {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def parse_tokens(text: str, source: str) -> dict[bytes, str]:
    """'TOKEN PRINCIPAL' per line, '#' comments -> {token bytes: principal}."""
    tokens: dict[bytes, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenFileError(
                f"{source} line {number}: expected 'TOKEN PRINCIPAL', got {len(parts)} fields"
            )  # the line itself may hold a secret
        tokens[parts[0].encode()] = parts[1]
    if not tokens:
        raise TokenFileError(f"{source}: no tokens (expected 'TOKEN PRINCIPAL' lines)")
    return tokens


def principal_of(tokens: TokenStore | None, context: Any) -> str:
    """Who is calling: the token's principal, or anonymous when auth is off."""
    if tokens is None:
        return ANONYMOUS
    principal = tokens.principal(context.invocation_metadata())
    if principal is None:  # the interceptor refuses these first; this is a second lock
        raise Unauthenticated("expected 'authorization: Bearer <token>' with a valid token")
    return principal


class TokenStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._tokens: dict[bytes, str] = {}
        self.reload()

    def reload(self) -> None:
        """Read the file again; on error keep the tokens in force and say so."""
        try:
            self._tokens = parse_tokens(Path(self.path).read_text(), self.path)
        except (OSError, TokenFileError) as exc:
            if not self._tokens:
                raise TokenFileError(str(exc)) from None
            log.error("auth tokens not reloaded, the previous ones stay in force: %s", exc)
            return
        log.info("auth tokens loaded: %d principals", len(set(self._tokens.values())))

    def principal(self, metadata: Any) -> str | None:
        """The principal of a call's `authorization: Bearer TOKEN`, or None."""
        presented = b""
        for key, value in metadata or ():
            if key == "authorization" and value.startswith("Bearer "):
                presented = value[len("Bearer ") :].encode()
        found = None
        for token, principal in self._tokens.items():  # every token compared: constant time
            if hmac.compare_digest(token, presented) and presented:
                found = principal
        return found


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid token before they reach a servicer."""

    def __init__(self, tokens: TokenStore, protect_health: bool) -> None:
        self.tokens = tokens
        self.protect_health = protect_health

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        if not self.protect_health and details.method.startswith(OPEN_SERVICES):
            return handler
        if self.tokens.principal(details.invocation_metadata) is not None:
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    status = Unauthenticated(
        "expected 'authorization: Bearer <token>' metadata with a valid token"
    ).to_status()

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext):
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class RateLimiter:
    """A token bucket of timesteps per principal, refilled at `rate`, holding one second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}  # principal -> (level, updated)

    def take(self, principal: str, steps: int) -> None:
        if not self.rate or not steps:
            return
        now = time.monotonic()
        level, updated = self._buckets.get(principal, (self.rate, now))
        level = min(self.rate, level + (now - updated) * self.rate)
        if steps > level:
            self._buckets[principal] = (level, now)
            raise RateLimited(
                f"rate limit: expected at most {self.rate:g} timesteps/s for this principal, "
                f"this message brings {steps} with {level:.0f} left; retry after "
                f"{(steps - level) / self.rate:.2f} s"
            )
        self._buckets[principal] = (level - steps, now)
