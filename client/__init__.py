"""lstm-stream client: stream timesteps to a session, get each timestep's output back.

Sync: `StreamingClient`; asyncio: `AsyncStreamingClient` (same shape). Both resume a session
exactly once across dropped connections and raise `LstmStreamError` (with the server's ErrorInfo
reason) for errors a retry cannot fix.
"""

from client.aio import AsyncStreamingClient, AsyncStreamSession
from client.errors import LstmStreamError
from client.options import ClientOptions
from client.sync import StreamingClient, StreamSession

__all__ = [
    "AsyncStreamSession",
    "AsyncStreamingClient",
    "ClientOptions",
    "LstmStreamError",
    "StreamSession",
    "StreamingClient",
]
