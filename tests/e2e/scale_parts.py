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
