"""Servers as subprocesses for the benchmarks: start, learn the port from the log, stop."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NGINX_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "nginx.conf"
PORT_PATTERN = re.compile(r"serving on \S+:(\d+)")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


def lstm_serve(*args: str) -> list[str]:
    """The lstm-serve command on a free loopback port, installed or run from the tree."""
    return [sys.executable, "-m", "server.app", "--host", "127.0.0.1", "--port", "0", *args]


def wait_for_port(process: subprocess.Popen, log_path: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = PORT_PATTERN.search(log_path.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server did not start: {log_path.read_text(errors='replace')[-2000:]}")


@contextmanager
def running_server(
    command: list[str], log_path: Path, exit_codes: list[int] | None = None
) -> Iterator[tuple[str, int]]:
    """Start a server whose output goes to log_path (a file: a pipe nobody drains stalls it);
    yield (target, pid); SIGTERM it after, and warn if it did not exit 0 (its exit code is
    appended to `exit_codes` when given)."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        port = wait_for_port(process, log_path)
        yield f"127.0.0.1:{port}", process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if exit_codes is not None:
            exit_codes.append(code)
        if code != 0:
            print(f"warning: {command[0]} exited {code}; log {log_path}", file=sys.stderr)


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """A throwaway redis-server on a free loopback port (no persistence); yield (url, pid)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the durable variant needs redis-server (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", process.pid
    finally:
        process.kill()
        process.wait()


def nginx_config(listen_port: int, replica_ports: list[int]) -> str:
    """The shipped config with its upstream servers and listen address made local."""
    text = NGINX_CONF.read_text()
    servers = re.findall(r"^( *)server replica-\d+:50051( [^;]*)?;\n", text, re.M)
    if not servers:
        raise ValueError(f"{NGINX_CONF} names no replica-N upstream servers")
    indent, options = servers[0][0], servers[0][1]
    local = "".join(f"{indent}server 127.0.0.1:{port}{options};\n" for port in replica_ports)
    text = re.sub(r"^ *server replica-\d+:50051[^;]*;\n", "", text, flags=re.M)
    text = text.replace("keepalive 256;", "keepalive 256;\n" + local.rstrip("\n"), 1)
    text, count = re.subn(r"listen 50051 http2;", f"listen 127.0.0.1:{listen_port} http2;", text)
    if count != 1:
        raise ValueError(f"{NGINX_CONF}: expected one 'listen 50051 http2;', found {count}")
    return text


@contextmanager
def local_nginx(directory: Path, replica_ports: list[int]) -> Iterator[str]:
    """nginx with the shipped config in front of local servers; yield its target."""
    binary = shutil.which("nginx")
    if binary is None:
        raise RuntimeError("the balancer needs nginx (apt-get install nginx)")
    port = free_port()
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(nginx_config(port, replica_ports))
    error_log = directory / "logs" / "error.log"
    globals_ = f"daemon off; pid {directory}/nginx.pid; error_log {error_log};"
    with (directory / "logs" / "stderr.log").open("w") as stderr:
        process = subprocess.Popen(
            [binary, "-p", str(directory), "-c", str(conf), "-g", globals_],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            if time.monotonic() > deadline or process.poll() is not None:
                said = "".join(p.read_text(errors="replace") for p in directory.glob("logs/*.log"))
                raise RuntimeError(f"nginx did not start on port {port}: {said[-2000:]}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
