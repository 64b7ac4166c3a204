"""A real Prometheus scrapes a real lstm-serve; its HTTP API reports what the test sent."""

import json
import math
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from lstm_stream.client import StreamingClient
from tests.e2e.conftest import fetch
from tests.factories import free_port, random_steps, require_binary, wait_for

SESSIONS, STEPS, KEPT_OPEN = 12, 50, 4
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture
def prometheus(tmp_path, served):
    binary = require_binary("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: lstm-serve\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{served.metrics_port}']\n"
    )
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(base), timeout=60, what="prometheus /-/ready")
        yield base
    finally:
        process.terminate()
        process.wait(30)


def _ready(base):
    try:
        return "Ready" in fetch(f"{base}/-/ready")
    except OSError:
        return False


def query(base: str, promql: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    body = json.loads(fetch(url))
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(base: str, promql: str) -> float | None:
    result = query(base, promql)
    return float(result[0]["value"][1]) if result else None


def wait_for_scraped(base: str, promql: str, value: float) -> None:
    wait_for(lambda: scalar(base, promql) == value, timeout=60, what=f"a scrape of {promql}")


def test_prometheus_sees_the_timesteps_latency_and_sessions(served, prometheus):
    with StreamingClient(served.target) as client:
        for i in range(SESSIONS):
            session = client.open_session()
            for j, chunk in enumerate(np.array_split(random_steps(STEPS, 6, seed=i), 5)):
                session.send(chunk)
                if i == j == 0:  # a scrape sees the series before it grows, so rate() > 0
                    wait_for_scraped(prometheus, "lstm_timesteps_total", len(chunk))
            if i >= KEPT_OPEN:
                session.close()  # one more message: end_session
            else:
                session.detach()

    messages = SESSIONS * 5 + (SESSIONS - KEPT_OPEN)
    expected = {
        "lstm_timesteps_total": SESSIONS * STEPS,
        "lstm_sessions_active": KEPT_OPEN,
        "lstm_sessions_created_total": SESSIONS,
        'lstm_sessions_closed_total{reason="ended"}': SESSIONS - KEPT_OPEN,
        'lstm_requests_total{rpc="StreamSteps", code="OK"}': messages,
        'lstm_step_latency_seconds_count{rpc="StreamSteps"}': messages,
    }

    def scraped():
        return {promql: scalar(prometheus, promql) for promql in expected}

    try:  # the last scrape that saw everything; its values are the ones asserted
        wait_for(lambda: scraped() == expected, timeout=30, what="Prometheus to scrape it all")
    except TimeoutError:
        assert scraped() == expected
    p99_query = (
        "histogram_quantile(0.99, sum by (le) "
        '(rate(lstm_step_latency_seconds_bucket{rpc="StreamSteps"}[1m])))'
    )
    # rate() needs two scrapes of the series; give Prometheus a few seconds of them.
    p99 = wait_for(lambda: scalar(prometheus, p99_query), timeout=30, what="a p99 latency")
    assert p99 is not None and math.isfinite(p99) and 0 < p99 < 10
    for expr in dashboard_queries():
        values = wait_for(
            lambda expr=expr: finite_values(prometheus, expr), timeout=30, what=f"{expr!r}"
        )
        assert all(v >= 0 for v in values), (expr, values)
    info = query(prometheus, "lstm_model_info")[0]["metric"]
    assert (info["name"], info["device"], info["dtype"]) == ("basic-motions", "cpu", "float32")


def dashboard_queries() -> list[str]:
    """The dashboard's PromQL as Grafana sends it, but for the state store's panels (this
    server has no store, so they are empty by design)."""
    dashboard = json.loads((DEPLOY / "grafana/dashboards/lstm-stream.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return [
        e.replace("$__rate_interval", "1m").replace("$model", ".*")  # the selector's "All"
        for e in exprs
        if "lstm_state_store" not in e
    ]


def finite_values(base: str, promql: str) -> list[float] | None:
    """The query's values when it has samples and all are finite numbers; else None."""
    values = [float(r["value"][1]) for r in query(base, promql)]
    return values if values and all(math.isfinite(v) for v in values) else None
