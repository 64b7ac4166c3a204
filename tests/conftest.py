import pytest

from lstm_model import load_model
from lstm_stream.client import StreamingClient
from tests.factories import ServeProcess


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
