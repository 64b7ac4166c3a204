"""lstm-serve as users run it: a subprocess, configured by flags or env vars, stopped by signals."""

import asyncio
import signal
import socket
import subprocess

import grpc
import numpy as np
import pytest
import torch

from lstm_model import load_model
from lstm_model.cli import main as lstm_model_main
from lstm_stream.client import AsyncStreamingClient, LstmStreamError, StreamingClient
from server.config import ServerConfig, load_config
from tests.equality import assert_equals_offline
from tests.factories import ServeProcess, console_script, free_port, offline, random_steps


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stream_against_the_subprocess_then_stop_gracefully(sig, bundled_model):
    with ServeProcess() as proc:
        steps = random_steps(25, 6, seed=40)
        with StreamingClient(proc.target) as client, client.open_session() as session:
            outputs = np.concatenate([session.send(steps[:5]), session.send(steps[5:])])
        code, log = proc.finish(sig)
    assert_equals_offline(outputs, bundled_model, steps)
    assert code == 0, log
    assert "on cpu/float32" in log  # --device auto says what it chose
    assert "draining" in log and "stopped" in log


def test_shutdown_answers_in_flight_messages_and_refuses_the_rest(bundled_model):
    """Messages pipelined at SIGTERM: each is answered correctly or refused UNAVAILABLE."""

    async def pipeline(target, proc):
        steps = random_steps(64 * 40, 6, seed=41)
        async with AsyncStreamingClient(target) as client:
            info = await client.info()
            from lstm_stream.v1 import inference_pb2 as pb

            call = client.stub.StreamSteps()
            for i in range(40):
                await call.write(pb.StreamStepsRequest(inputs=steps[i * 64 : (i + 1) * 64].ravel()))
            first = await call.read()
            proc.process.send_signal(signal.SIGTERM)
            answered = [first]
            try:
                while (response := await call.read()) is not grpc.aio.EOF:
                    answered.append(response)
            except grpc.aio.AioRpcError as err:
                return steps, info, answered, err.code(), err.details()
            return steps, info, answered, await call.code(), await call.details()

    with ServeProcess() as proc:
        steps, info, answered, code, details = asyncio.run(pipeline(proc.target, proc))
        exit_code, log = proc.finish(signalled=True)
    assert exit_code == 0, log
    expected = offline(bundled_model, steps)
    for response in answered:
        rows = np.asarray(response.outputs).reshape(response.num_steps, info.output_size)
        start = response.start_step
        np.testing.assert_allclose(
            rows, expected[start : start + response.num_steps], atol=1e-5, rtol=0
        )
    assert [r.start_step for r in answered] == [64 * i for i in range(len(answered))]
    if len(answered) < 40:
        assert code == grpc.StatusCode.UNAVAILABLE, details


def run_serve(*args: str) -> subprocess.CompletedProcess:
    """lstm-serve that is expected to refuse to start."""
    return subprocess.run(
        [console_script("lstm-serve"), "--port", "0", "--metrics-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_refusal(result: subprocess.CompletedProcess, code: int, *expected: str):
    assert result.returncode == code, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lstm-serve: "), result.stderr
    for text in expected:
        assert text in last, result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_model_dir_exits_non_zero_with_one_clear_line(tmp_path):
    assert_one_line_refusal(run_serve("--model", str(tmp_path)), 1, "config.json: no such file")


@pytest.mark.parametrize("device", ["tpu", "cpu:x", "cuda:a", ""])
def test_a_bad_device_is_one_line_naming_what_is_accepted(device):
    result = run_serve("--device", device)
    assert_one_line_refusal(result, 2, "--device must be auto, cpu, cuda or cuda:N", repr(device))
    assert len(result.stderr.strip().splitlines()) == 1


def test_cuda_on_a_host_without_cuda_is_refused_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the refusal is for hosts without it")
    assert_one_line_refusal(run_serve("--device", "cuda:0"), 1, "CUDA is not available")


def test_a_grpc_port_in_use_by_another_server_is_refused_not_shared():
    """gRPC binds with SO_REUSEPORT by default: two servers would split the clients."""
    port = free_port()
    with ServeProcess("--port", str(port)) as first:
        assert first.port == port
        result = run_serve("--port", str(port))
        assert_one_line_refusal(result, 1, f"--port {port}: cannot bind", "in use")
        with StreamingClient(first.target) as client:  # the first server serves on, alone
            assert client.info().input_size == 6


def test_a_metrics_port_in_use_is_refused_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--host", "127.0.0.1", "--metrics-port", str(port))
    assert_one_line_refusal(result, 1, f"--metrics-port {port}: cannot bind", "in use")


def test_env_vars_configure_the_server_and_flags_win(tmp_path):
    lstm_model_main(
        [
            "init",
            "--input-size",
            "3",
            "--hidden-size",
            "8",
            "--num-layers",
            "1",
            "--output-size",
            "2",
            "--out",
            str(tmp_path / "m"),
        ]
    )
    env = {
        "LSTM_SERVE_MODEL": str(tmp_path / "m"),
        "LSTM_SERVE_MAX_CHUNK_STEPS": "7",
        "LSTM_SERVE_MAX_SESSIONS": "2",
    }
    with ServeProcess("--max-sessions", "1", env=env) as proc:
        with StreamingClient(proc.target) as client:
            info = client.info()
            assert (info.input_size, info.max_chunk_steps) == (3, 7)
            session = client.open_session()
            session.send([[0.0, 1.0, 2.0]])
            with pytest.raises(LstmStreamError) as err:
                client.open_session()
            assert err.value.reason == "SESSION_CAPACITY"  # --max-sessions 1 beat the env's 2
            session.close()
        assert proc.finish()[0] == 0
    model = load_model(tmp_path / "m").model
    assert model.config.input_size == 3


def test_config_parsing_names_the_bad_value():
    assert load_config([], {}) == ServerConfig()
    assert load_config(["--port", "7"], {"LSTM_SERVE_PORT": "9"}).port == 7
    assert (
        load_config([], {"LSTM_SERVE_SESSION_IDLE_TIMEOUT_S": "2.5"}).session_idle_timeout_s == 2.5
    )
    with pytest.raises(ValueError, match="LSTM_SERVE_PORT: expected int, got 'abc'"):
        load_config([], {"LSTM_SERVE_PORT": "abc"})
    with pytest.raises(ValueError, match="--max-batch-size must be >= 1, got 0"):
        load_config(["--max-batch-size", "0"], {})
