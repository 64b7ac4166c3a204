"""lstm-stream client: stream timesteps to a session, get each timestep's output back."""

from client.aio import AsyncStreamingClient, AsyncStreamSession
from client.errors import LstmStreamError
from client.sync import StreamingClient, StreamSession

__all__ = [
    "AsyncStreamSession",
    "AsyncStreamingClient",
    "LstmStreamError",
    "StreamSession",
    "StreamingClient",
]
