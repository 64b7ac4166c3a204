"""The metrics of DESIGN 1.5 by value: a known run, and exactly what it must have counted.

Counts are read from a subprocess server's own /metrics (nothing else feeds it), or, where the
server must stop first, as deltas of this process's registry around an in-process server."""

import math
import re
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from lstm_stream.client import LstmStreamError, StreamingClient
from lstm_stream.v1 import inference_pb2 as pb
from tests.factories import RawStream, ServeProcess, free_port, random_steps, serve, wait_for


def scrape(port: int) -> dict[str, float]:
    """Every sample of a server's /metrics, keyed as written: 'name{label="v",...}'."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """One sample by name and labels (label order as the server writes it does not matter)."""
    for key, value in samples.items():
        found = re.fullmatch(r"([^{]+)(?:\{(.*)\})?", key)
        got = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
        if found.group(1) == name and got == labels:
            return value
    return 0.0


MODEL = {"model": "basic-motions"}  # the bundled model: work is counted per model


@pytest.fixture
def metered():
    port = free_port()
    with ServeProcess("--metrics-port", str(port)) as proc:
        proc.metrics_port = port
        yield proc


def test_batches_timesteps_requests_and_codes_are_counted_exactly(metered):
    """One session, one message at a time: every message is a batch of one session."""
    sizes = (1, 3, 5, 32)
    with RawStream(metered.target) as stream:
        for size in sizes:
            stream.send(random_steps(size, 6, seed=size))
        with pytest.raises(LstmStreamError):
            stream.send([[math.nan] * 6])
    with StreamingClient(metered.target) as client, pytest.raises(LstmStreamError):
        client.get_session("no-such-session")
    got = scrape(metered.metrics_port)

    assert sample(got, "lstm_batch_size_count", **MODEL) == len(sizes)
    assert sample(got, "lstm_batch_size_sum", **MODEL) == len(sizes)  # one session per batch
    assert sample(got, "lstm_batch_size_bucket", **MODEL, le="1.0") == len(sizes)
    assert sample(got, "lstm_timesteps_total", **MODEL, version="1") == sum(sizes)
    for histogram in ("lstm_queue_wait_seconds", "lstm_batch_compute_seconds"):
        assert sample(got, f"{histogram}_count", **MODEL) == len(sizes)
        assert sample(got, f"{histogram}_bucket", **MODEL, le="+Inf") == len(sizes)
    assert sample(got, "lstm_batch_compute_seconds_sum", **MODEL) > 0
    assert sample(got, "lstm_requests_total", rpc="StreamSteps", code="OK") == len(sizes)
    assert sample(got, "lstm_requests_total", rpc="StreamSteps", code="INVALID_ARGUMENT") == 1
    assert sample(got, "lstm_requests_total", rpc="GetSession", code="NOT_FOUND") == 1
    assert sample(got, "lstm_step_latency_seconds_count", rpc="StreamSteps") == len(sizes) + 1
    assert sample(got, "lstm_step_latency_seconds_count", rpc="GetSession") == 1


def test_sessions_created_active_and_closed_by_reason(metered):
    with StreamingClient(metered.target) as client:
        with RawStream(metered.target) as ended:
            ended.send(random_steps(2, 6), end_session=True)
        deleted = client.open_session()
        deleted.send(random_steps(2, 6))
        deleted.detach()
        client.delete_session(deleted.session_id)
        first = RawStream(metered.target)
        first.send(random_steps(2, 6))
        second = RawStream(metered.target, first.session_id)
        second.send(random_steps(1, 6))  # takes the session over
        with pytest.raises(LstmStreamError) as err:
            first.send(random_steps(1, 6))
        assert err.value.reason == "SESSION_TAKEN_OVER"
        got = scrape(metered.metrics_port)
        first.close()
        second.close()

    assert sample(got, "lstm_sessions_created_total", **MODEL) == 3
    assert sample(got, "lstm_sessions_active") == 1  # the one taken over lives on
    assert sample(got, "lstm_model_sessions_active", **MODEL, version="1") == 1
    closed = {
        reason: sample(got, "lstm_sessions_closed_total", reason=reason)
        for reason in ("ended", "deleted", "taken_over", "expired", "shutdown")
    }
    assert closed == {"ended": 1, "deleted": 1, "taken_over": 1, "expired": 0, "shutdown": 0}
    assert sample(got, "lstm_requests_total", rpc="StreamSteps", code="ABORTED") == 0
    assert sample(got, "lstm_requests_total", rpc="DeleteSession", code="OK") == 1


def closed_count(reason: str) -> float:
    return REGISTRY.get_sample_value("lstm_sessions_closed_total", {"reason": reason}) or 0.0


def test_expired_and_shutdown_closes_are_counted():
    """In-process: 'shutdown' is counted as the server stops, when /metrics is gone."""
    expired_before = closed_count("expired")
    with serve(session_idle_timeout_s=0.3) as srv:
        for seed in range(2):
            with RawStream(srv.target) as stream:
                stream.send(random_steps(1, 6, seed=seed))
        wait_for(lambda: closed_count("expired") - expired_before == 2, what="two expiries")
        assert len(srv.server.runtime.sessions) == 0

    shutdown_before = closed_count("shutdown")
    srv = serve()
    with srv, StreamingClient(srv.target) as client:
        for _ in range(3):
            client.open_session().detach()
        client.call("CreateSession", pb.CreateSessionRequest())
        srv.stop()
    assert closed_count("shutdown") - shutdown_before == 4
    assert closed_count("expired") - expired_before == 2


def test_a_refused_message_is_counted_under_its_code_not_ok(metered):
    with RawStream(metered.target) as stream:
        stream.send(random_steps(4, 6))
        with pytest.raises(LstmStreamError) as err:
            stream.send(random_steps(1, 6), start_step=9)  # a gap
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    got = scrape(metered.metrics_port)
    assert sample(got, "lstm_requests_total", rpc="StreamSteps", code="OK") == 1
    assert sample(got, "lstm_requests_total", rpc="StreamSteps", code="FAILED_PRECONDITION") == 1
    # The refused message applied nothing.
    assert sample(got, "lstm_timesteps_total", **MODEL, version="1") == 4
    np.testing.assert_equal(sample(got, "lstm_batch_size_count", **MODEL), 1)
