import hypothesis.internal.observability  # noqa: F401  (see below)
import pytest

from lstm_model import load_model
from lstm_stream.client import StreamingClient
from tests.factories import ServeProcess, make_model_dir

# Imported here, on the main thread before any server thread runs, because hypothesis's pytest
# plugin imports it at the very end, and pytest compiles it then (assertion rewriting). On
# Python 3.11, ast compilation is not thread-safe (CPython gh-106905): that compile, racing one
# in another thread of the test process, failed a run with "SystemError: AST constructor recursion
# depth mismatch" after all its tests had passed.


@pytest.fixture(scope="module")
def server():
    """The bundled model behind lstm-serve on a free port, shared by a module's tests. A
    subprocess: gRPC's asyncio layer serves one event loop per process, and the tests run
    asyncio clients of their own."""
    with ServeProcess("--max-sessions", "4096") as proc:
        yield proc


@pytest.fixture(scope="module")
def bundled_model():
    return load_model().model


@pytest.fixture
def client(server):
    with StreamingClient(server.target) as c:
        yield c


@pytest.fixture(scope="session")
def regression_dir(tmp_path_factory):
    """A regression model shaped like the bundled one (6 inputs, 4 outputs). Its outputs do not
    saturate as the bundled classifier's softmax does, so a step applied twice or skipped shows
    in them (tests/equality.py)."""
    path = tmp_path_factory.mktemp("regression") / "model"
    return make_model_dir(path, input_size=6, hidden_size=48, output_size=4)


@pytest.fixture(scope="session")
def regression_model(regression_dir):
    return load_model(regression_dir).model


@pytest.fixture(scope="module")
def regression_server(regression_dir):
    """lstm-serve on a free port serving the regression model, shared by a module's tests."""
    with ServeProcess("--model", str(regression_dir), "--max-sessions", "4096") as proc:
        yield proc
