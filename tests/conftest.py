import pytest

from client import StreamingClient
from lstm_model import load_model
from tests.factories import serve


@pytest.fixture(scope="module")
def server():
    """The bundled model behind a real server on a free port, shared by a module's tests."""
    with serve() as srv:
        yield srv


@pytest.fixture(scope="module")
def bundled_model():
    return load_model().model


@pytest.fixture
def client(server):
    with StreamingClient(server.target) as c:
        yield c
