"""The real parts of a scaled-out deployment on loopback: redis-server and nginx (with the
shipped deploy/nginx/nginx.conf, its upstreams pointed at local replicas)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.process import local_nginx
from tests.factories import free_port, require_binary, wait_for


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class RedisServer:
    """redis-server on a free loopback port, no persistence; stop() and start() again on the
    same port (empty, as a restarted Redis without persistence is)."""

    def __init__(self) -> None:
        self.binary = require_binary("redis-server")
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(self.port), 10, what="redis-server to listen")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def client(self):
        import redis

        return redis.Redis(port=self.port)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def nginx(directory: Path, replica_ports: list[int]) -> Iterator[str]:
    """nginx with the shipped config in front of local replicas; yield its target."""
    require_binary("nginx")
    with local_nginx(directory, replica_ports) as target:
        yield target


class RedisCluster:
    """A Redis Cluster of `masters` redis-servers on loopback (no replicas, no persistence),
    its slots spread by `redis-cli --cluster create`. url is the store URL with every node as a
    seed; kill(i) loses node i and everything it held."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        binary = require_binary("redis-server")
        cli = require_binary("redis-cli")
        # The cluster bus listens on port + 10000: keep both on free ports below 65536.
        self.ports = [_cluster_port() for _ in range(masters)]
        self.processes: list[subprocess.Popen] = []
        for port in self.ports:
            node_dir = directory / f"redis-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            self.processes.append(
                subprocess.Popen(
                    [binary, "--port", str(port), *options, *cluster, "--dir", str(node_dir)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            wait_for(lambda port=port: port_open(port), 10, what="a cluster node to listen")
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        wait_for(self._ready, 30, what="the cluster to cover every slot")

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def _ready(self) -> bool:
        import redis

        for port in self.ports:
            info = redis.Redis(port=port).cluster("info")
            if info.get("cluster_state") != "ok":
                return False
        return True

    def flush(self) -> None:
        """Empty every node (what a shard restarted without persistence holds)."""
        import redis

        for port in self.ports:
            redis.Redis(port=port).flushall()

    def client(self):
        from redis.cluster import ClusterNode
        from redis.cluster import RedisCluster as Client

        return Client(startup_nodes=[ClusterNode("127.0.0.1", port) for port in self.ports])

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_port() -> int:
    while True:
        port = free_port()
        if port < 55536:
            return port
