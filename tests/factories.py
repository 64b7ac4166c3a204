"""Builders for what the tests need; every argument has a default."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from lstm_model.checkpoint import save_model
from lstm_model.cli import init_model
from lstm_model.model import SequenceModel


def make_model(
    input_size: int = 4,
    hidden_size: int = 16,
    num_layers: int = 2,
    output_size: int = 3,
    seed: int = 0,
    kind: str = "regression",
    normalised: bool = False,
    cell: str = "lstm",
) -> SequenceModel:
    model = init_model(input_size, hidden_size, num_layers, output_size, seed, kind, cell=cell)
    if normalised:
        generator = torch.Generator().manual_seed(seed + 1)
        mean = torch.randn(input_size, generator=generator)
        std = torch.rand(input_size, generator=generator) + 0.5
        config = model.config.__class__(
            **{**model.config.to_dict(), "input_mean": mean.tolist(), "input_std": std.tolist()}
        )
        normalised_model = SequenceModel(config)
        normalised_model.load_state_dict(model.state_dict())
        model = normalised_model.eval()
    return model


def make_model_dir(path: Path, **model_args) -> Path:
    return save_model(make_model(**model_args), path)


def one_thread() -> None:
    """Offline runs on one thread. They are small, step by step, and an in-process server may
    have left torch at every core; with other work on the cores, each timestep's OpenMP
    barrier then waits for a descheduled thread (a 512,000-step offline run once took over the
    300 s test timeout on a loaded 2-core machine, where one thread takes seconds)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def make_inputs(batch: int = 2, steps: int = 7, input_size: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, steps, input_size, generator=generator)  # (B, T, I)


def console_script(name: str) -> str:
    """Path of an installed console script: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[server,test]'"
    return found


def make_server_config(**overrides):
    from server.config import ServerConfig

    defaults = dict(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        max_sessions=512,
        session_idle_timeout_s=600.0,
        torch_threads=1,
    )
    return ServerConfig(**(defaults | overrides))


class ServerThread:
    """A real lstm-serve server on a real port, its event loop in a background thread."""

    def __init__(self, config) -> None:
        import asyncio
        import threading

        self.config = config
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.server = None
        self.port = 0

    def _run(self) -> None:
        import asyncio

        from server.app import create_server

        asyncio.set_event_loop(self.loop)
        try:
            self.server, self.port = self.loop.run_until_complete(create_server(self.config))
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # surfaced to the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 30.0):
        """Run a coroutine on the server's loop and wait for its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(60)
        if self._error:
            raise self._error
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        if self.server is not None and self.loop.is_running():
            self.call(self.server.stop(grace_s))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.server = None

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(**overrides) -> ServerThread:
    return ServerThread(make_server_config(**overrides))


def offline(model: SequenceModel, steps):
    """Outputs of one whole sequence (T, I) from zero state, as the server must reproduce."""
    one_thread()
    with torch.inference_mode():
        x = torch.as_tensor(steps, dtype=torch.float32)[None]  # (1, T, I)
        return model(x)[0][0].numpy()  # (T, O)


def random_steps(steps: int = 20, input_size: int = 6, seed: int = 0, scale: float = 3.0):
    import numpy as np

    return (np.random.default_rng(seed).standard_normal((steps, input_size)) * scale).astype(
        np.float32
    )


def random_chunks(total: int, max_chunk: int = 8, seed: int = 0) -> list[int]:
    """Chunk lengths (each >= 1) that add up to total."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = []
    while total > 0:
        sizes.append(int(min(total, rng.integers(1, max_chunk + 1))))
        total -= sizes[-1]
    return sizes


class ServeProcess:
    """`lstm-serve` as a subprocess on a free port (read back from its log)."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        import os
        import subprocess

        self.args = [
            console_script("lstm-serve"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--torch-threads",
            "1",
            *args,
        ]
        self.process = subprocess.Popen(
            self.args,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.log: list[str] = []
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        import re
        import threading

        for line in self.process.stderr:
            self.log.append(line)
            found = re.search(r"serving on \S+:(\d+)", line)
            if found:
                # Keep draining: a server blocked on a full stderr pipe stops serving.
                self._drainer = threading.Thread(target=self._drain, daemon=True)
                self._drainer.start()
                return int(found.group(1))
        raise RuntimeError("lstm-serve exited before serving:\n" + "".join(self.log))

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def finish(self, sig=None, timeout: float = 30.0, signalled: bool = False) -> tuple[int, str]:
        """Send a signal (default SIGTERM) unless already `signalled`, wait for exit;
        (exit code, whole log)."""
        import signal

        if not signalled and self.process.poll() is None:
            self.process.send_signal(sig or signal.SIGTERM)
        self.process.wait(timeout=timeout)
        self._drainer.join(timeout)  # until it has read what the process wrote last
        return self.process.returncode, "".join(self.log)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def require_binary(name: str) -> str:
    """Path of a system binary the test drives for real. Missing: skip locally, fail under CI."""
    import os

    import pytest

    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed (.ci/run installs it with apt-get; see there)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_native_gru():
    """The native GRU layer loop (lstm_model/native.py), built here if need be. Without a C++
    compiler: skip locally, fail under CI; any other reason it is missing fails."""
    import os

    import pytest

    from lstm_model import native

    loaded = native.gru_layer()
    if loaded is None:
        require_binary(os.environ.get("CXX") or "c++")
        pytest.fail(f"the native GRU kernel is unavailable: {native._failure}")
    return loaded


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    """Poll until condition() returns a truthy value; that value."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class RawStream:
    """One StreamSteps call driven message by message, with no client-side numbering or
    retries: for tests of the server's own protocol."""

    def __init__(
        self, target: str, session_id: str = "", metadata: tuple = (), channel=None
    ) -> None:
        """A channel of its own, or `channel` (shared, left open on close)."""
        import queue

        import grpc

        from lstm_stream.v1 import inference_pb2 as pb
        from lstm_stream.v1 import inference_pb2_grpc as pb_grpc

        self._pb = pb
        self._own_channel = channel is None
        self._channel = grpc.insecure_channel(target) if channel is None else channel
        stub = pb_grpc.InferenceServiceStub(self._channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        self.input_size, self.output_size = info.input_size, info.output_size
        self._requests = queue.SimpleQueue()
        self._end = object()
        self._call = stub.StreamSteps(iter(self._requests.get, self._end), metadata=metadata)
        self._responses = iter(self._call)
        self.session_id = session_id
        self._first = True

    def send(self, rows=(), start_step=None, reset=False, end_session=False, session_id=None):
        """One message; (start_step, outputs (num_steps, output_size)) or LstmStreamError."""
        import grpc
        import numpy as np

        from lstm_stream.client.errors import from_rpc_error

        values = np.asarray(rows, dtype=np.float32).ravel().tolist()
        request = self._pb.StreamStepsRequest(inputs=values, reset=reset, end_session=end_session)
        if session_id is not None:
            request.session_id = session_id
        elif self._first and self.session_id:
            request.session_id = self.session_id
        if start_step is not None:
            request.start_step = start_step
        self._first = False
        self._requests.put(request)
        try:
            response = next(self._responses)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        self.session_id = response.session_id
        outputs = np.asarray(response.outputs, dtype=np.float32)
        return response.start_step, outputs.reshape(response.num_steps, self.output_size)

    def outputs(self, rows=(), **kwargs):
        return self.send(rows, **kwargs)[1]

    def write(self, rows=()) -> None:
        """A message whose answer is not read."""
        import numpy as np

        values = [float(v) for v in np.asarray(rows, dtype=np.float32).ravel()]
        self._requests.put(self._pb.StreamStepsRequest(inputs=values))

    def end_status(self):
        """The status the server ended the stream with; AssertionError if it answers instead."""
        import grpc

        try:
            response = next(self._responses, None)
        except grpc.RpcError as err:
            return err.code()
        assert response is None, f"answered after the end: {response}"
        return self._call.code()

    def half_close(self):
        """End the requests and wait for the server to end the call; its status."""
        self._requests.put(self._end)
        return self.end_status()

    def close(self) -> None:
        self._requests.put(self._end)
        self._call.cancel()
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> RawStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def metric_value(port: int, name: str, **labels: str) -> float:
    """A sample of a server's /metrics (e.g. 'lstm_sessions_active'), summed over the label
    sets that hold `labels` (lstm_timesteps_total over every model, for example); KeyError
    when no sample matches."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = [
        (dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or "")), float(match.group(2)))
        for match in re.finditer(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", text, flags=re.M)
    ]
    values = [v for got, v in found if labels.items() <= got.items()]
    if not values:
        raise KeyError(f"{name}{labels or ''} not in /metrics")
    return sum(values)
