"""lstm-stream client: stream timesteps to a session, get each timestep's output back.

Sync: `StreamingClient`; asyncio: `AsyncStreamingClient` (same shape). Many sessions per message:
`client.step_batch({session_id: chunk})` and `client.stream_batches(...)`, each a `BatchResult`.
Both resume a session
exactly once across dropped connections and raise `LstmStreamError` (with the server's ErrorInfo
reason) for errors a retry cannot fix.
"""

from lstm_stream.client.aio import AsyncStreamingClient, AsyncStreamSession
from lstm_stream.client.batching import BatchResult, partition_of
from lstm_stream.client.errors import BadInputError, LstmStreamError
from lstm_stream.client.options import ClientOptions
from lstm_stream.client.sync import StreamingClient, StreamSession

__all__ = [
    "AsyncStreamSession",
    "AsyncStreamingClient",
    "BadInputError",
    "BatchResult",
    "ClientOptions",
    "LstmStreamError",
    "StreamSession",
    "StreamingClient",
    "partition_of",
]
