"""Durable sessions at scale on one box: 20,000 live sessions fed by StreamBatches (1,024 chunks
a message) on one lstm-serve whose state store is a real three-master Redis Cluster. The server
is killed mid-stream; a new one on the same port and cluster continues every session."""

from __future__ import annotations

import signal

import numpy as np

from lstm_stream.client import ClientOptions, StreamingClient
from tests.e2e.scale_parts import RedisCluster
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import ServeProcess, free_port, metric_value

SESSIONS, ROUNDS, KILLED_AFTER = 20_000, 6, 3  # rounds of one timestep per session
SAMPLE = 200  # sessions held to offline one by one (every session's shape is checked)
OPTIONS = dict(deadline_s=60.0, max_retries=50, backoff_initial_s=0.05, backoff_max_s=1.0)


def serve(store_url: str, model_dir, port: int = 0) -> ServeProcess:
    """lstm-serve on the cluster (on `port`, or a free one); its metrics_port set."""
    metrics_port = free_port()
    replica = ServeProcess(
        "--state-store", store_url, "--model", str(model_dir),
        "--max-sessions", str(SESSIONS + 1000), "--max-batch-chunks", "1024",
        "--metrics-port", str(metrics_port),
        *(("--port", str(port)) if port else ()),
    )  # fmt: skip
    replica.metrics_port = metrics_port
    return replica


def test_20000_sessions_survive_a_killed_server_on_a_cluster_store(
    regression_dir, regression_model, tmp_path
):
    """Every session answers every round once (a regression model: a step applied twice or
    lost shows in its outputs), the new server loads every session from the cluster and
    creates no other, and sampled sessions equal offline, their exported state too."""
    rng = np.random.default_rng(2027)
    inputs = rng.standard_normal((SESSIONS, ROUNDS, 6)).astype(np.float32)  # (N, T, I)
    ids = [f"gw-{i}" for i in range(SESSIONS)]

    def batch(round_: int) -> dict:
        return {sid: inputs[i, round_ : round_ + 1] for i, sid in enumerate(ids)}

    outputs = np.full((SESSIONS, ROUNDS, 4), np.nan, np.float32)  # (N, T, O)
    answers = np.zeros(SESSIONS, np.int64)
    with RedisCluster(tmp_path / "cluster") as cluster:
        first = serve(cluster.url, regression_dir)
        second = None
        try:
            options = ClientOptions(target=first.target, **OPTIONS)
            with StreamingClient(options=options) as client:
                for round_, result in enumerate(client.stream_batches(map(batch, range(ROUNDS)))):
                    for i, sid in enumerate(ids):
                        outputs[i, answers[i]] = result[sid][0]
                        answers[i] += 1
                    if round_ + 1 == KILLED_AFTER:  # more rounds are in flight (a window)
                        first.process.send_signal(signal.SIGKILL)
                        first.process.wait(30)
                        second = serve(cluster.url, regression_dir, port=first.port)
            assert second is not None
            loaded = metric_value(second.metrics_port, "lstm_state_store_loads_total")
            created = metric_value(second.metrics_port, "lstm_sessions_created_total")
            for i in range(0, SESSIONS, SESSIONS // 8):
                assert_state_equals_offline(second.target, ids[i], regression_model, inputs[i])
        finally:
            first.__exit__()
            if second is not None:
                second.__exit__()
    assert (answers == ROUNDS).all()  # each round answered once for every session
    # Each one continued from the store (a load creates its session; none was created anew).
    assert loaded == created == SESSIONS, (loaded, created)
    for i in range(0, SESSIONS, SESSIONS // SAMPLE):
        assert_equals_offline(outputs[i], regression_model, inputs[i], err_msg=ids[i])
