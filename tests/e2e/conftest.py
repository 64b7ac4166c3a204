import urllib.request

import pytest

from tests.factories import ServeProcess, free_port


@pytest.fixture(scope="module")
def served():
    """lstm-serve as a subprocess with its /metrics endpoint on a free port."""
    metrics_port = free_port()
    with ServeProcess(
        "--metrics-port", str(metrics_port), "--session-idle-timeout-s", "600"
    ) as proc:
        proc.metrics_port = metrics_port
        yield proc


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()
