"""Where the state store's records live: one Redis (redis://, rediss://, unix://) or a Redis
Cluster (redis+cluster://HOST:PORT[,HOST:PORT...], the seed nodes), and how keys are laid out.

One write call (a Lua script) must touch keys of one hash slot only in a cluster, and it carries
the replica's marker with its sessions. So in a cluster every session key carries a hash tag
naming one of BUCKETS buckets (a CRC of principal and id, the same on every replica), the marker
has one key per bucket, and the writer sends one call per bucket. A shard that restarts empty
loses its buckets' markers, and the next write to any of them says so. On one Redis there is a
single bucket and the keys are those of earlier releases, so records written before an upgrade
are still found.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

CLUSTER_SCHEME = "redis+cluster://"
SCHEMES = ("redis://", "rediss://", "unix://", CLUSTER_SCHEME)
KEY_PREFIX = "lstm-stream:session:"
MARKER_PREFIX = "lstm-stream:replica-marker:"
BUCKETS = 256  # in a cluster: enough to spread over many shards, few enough to batch writes


@dataclass(frozen=True)
class ClusterSeeds:
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None


def parse_cluster_url(url: str) -> ClusterSeeds:
    """redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...] -> its seed nodes; ValueError
    names what is wrong."""
    rest = url.removeprefix(CLUSTER_SCHEME).rstrip("/")
    username = password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        user, _, secret = credentials.partition(":")
        username, password = (unquote(user) or None), unquote(secret)
    nodes = []
    for seed in rest.split(","):
        host, _, port = seed.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                "--state-store: expected redis+cluster://HOST:PORT[,HOST:PORT...] (the seed "
                f"nodes), got seed {seed!r} in {redacted(url)!r}"
            )
        nodes.append((host.strip("[]"), int(port)))
    return ClusterSeeds(tuple(nodes), username, password)


def check_url(url: str) -> None:
    if not url.startswith(SCHEMES):
        raise ValueError(
            "--state-store: expected a URL redis://HOST:PORT/DB (or rediss://, unix://), or "
            f"redis+cluster://HOST:PORT[,HOST:PORT...] for a Redis Cluster, got {redacted(url)!r}"
        )
    if url.startswith(CLUSTER_SCHEME):
        parse_cluster_url(url)


def connect(url: str, connections: int, timeout_s: float) -> Any:
    """A redis.asyncio client for the URL: Redis, or RedisCluster. At most `connections` at once
    (per node in a cluster); more callers wait for one (a cluster's client refuses them instead,
    which the store's batched look-ups keep from happening)."""
    timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if not url.startswith(CLUSTER_SCHEME):
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=connections,
            timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # the writer retries on its own schedule
            **timeouts,
        )
        return Redis.from_pool(pool)
    seeds = parse_cluster_url(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in seeds.nodes],
        username=seeds.username,
        password=seeds.password,
        max_connections=connections,
        retry=Retry(NoBackoff(), 0),
        **timeouts,
    )


class KeyLayout:
    """Session keys, and the buckets a write call may span."""

    def __init__(self, url: str, replica: str) -> None:
        self.clustered = url.startswith(CLUSTER_SCHEME)
        self._replica = replica

    def bucket(self, principal: str, session_id: str) -> int:
        if not self.clustered:
            return 0
        return zlib.crc32(f"{principal}:{session_id}".encode()) % BUCKETS

    def session(self, principal: str, session_id: str) -> str:
        # Session ids have no ':' (codec.SESSION_ID_PATTERN), so the key splits unambiguously.
        if not self.clustered:
            return session_key(principal, session_id)
        return f"{KEY_PREFIX}{{{self.bucket(principal, session_id)}}}:{principal}:{session_id}"

    def marker(self, bucket: int) -> str:
        """The key that exists while the store keeps what this replica wrote to the bucket."""
        if not self.clustered:
            return MARKER_PREFIX + self._replica
        return f"{MARKER_PREFIX}{{{bucket}}}:{self._replica}"


def session_key(principal: str, session_id: str) -> str:
    """A session's key on one Redis."""
    return f"{KEY_PREFIX}{principal}:{session_id}"


def redacted(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
