"""Every Prometheus metric of the service, defined once (DESIGN Part 1.5). Base units."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

# 50 µs to 10 s: resolves 100 µs steps and multi-second stalls alike.
LATENCY_BUCKETS = (
    50e-6, 100e-6, 200e-6, 500e-6,
    1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 200e-3, 500e-3,
    1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

STEP_LATENCY = Histogram(
    "lstm_step_latency_seconds",
    "Per request message (and unary call): from receipt to its response handed to gRPC.",
    ["rpc"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "lstm_queue_wait_seconds",
    "Per batch: how long its oldest chunk waited for the engine.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_COMPUTE = Histogram(
    "lstm_batch_compute_seconds",
    "Per batch: engine time (gather, model forward, scatter, outputs to host).",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "lstm_batch_size", "Sessions per executed batch.", ["model"], buckets=BATCH_SIZE_BUCKETS
)
BATCH_CHUNKS = Histogram(
    "lstm_batch_chunks",
    "Sessions' chunks per StepBatch or StreamBatches request message.",
    ["rpc"],
    buckets=BATCH_SIZE_BUCKETS,
)
CHUNKS_REFUSED = Counter(
    "lstm_chunks_refused",
    "Chunks of batch messages refused on their own (the rest of the message was answered).",
    ["rpc", "code"],
)
TIMESTEPS = Counter(
    "lstm_timesteps", "Timesteps applied to session state or Predict.", ["model", "version"]
)
REQUESTS = Counter(
    "lstm_requests", "Requests by RPC and status code; per message for streams.", ["rpc", "code"]
)
SESSIONS_ACTIVE = Gauge("lstm_sessions_active", "Live sessions (every model).")
MODEL_SESSIONS = Gauge(
    "lstm_model_sessions_active", "Live sessions on each loaded version.", ["model", "version"]
)
SESSIONS_CAPACITY = Gauge("lstm_sessions_capacity", "Most live sessions (--max-sessions).")
SESSIONS_CREATED = Counter(
    "lstm_sessions_created", "Sessions created (imports included).", ["model"]
)
SESSIONS_CLOSED = Counter(
    "lstm_sessions_closed",
    "Sessions closed, by reason: ended, deleted, expired, taken_over, shutdown, superseded "
    "(a newer state of it came from the state store).",
    ["reason"],
)
STATE_BYTES = Gauge(
    "lstm_state_bytes", "Bytes of the loaded versions' session state pools (h and c)."
)
# Labelled by the store's URL (password removed): a server without a store exports no sample.
STATE_STORE_UP = Gauge(
    "lstm_state_store_up",
    "1 while the --state-store answers writes, 0 while it does not.",
    ["store"],
)
STATE_STORE_WRITES = Counter("lstm_state_store_writes", "Session records written to the store.")
STATE_STORE_ERRORS = Counter("lstm_state_store_errors", "Store writes that failed (retried).")
STATE_STORE_LOADS = Counter(
    "lstm_state_store_loads", "Sessions this replica did not hold, loaded from the store."
)
STATE_STORE_PENDING = Gauge(
    "lstm_state_store_pending_sessions", "Sessions whose newest state is not written yet."
)
STATE_STORE_FLUSH = Histogram(
    "lstm_state_store_flush_seconds",
    "Per pipelined write: encoding the records and Redis's reply.",
    buckets=LATENCY_BUCKETS,
)
MODEL_INFO = Info("lstm_model", "Each loaded model version.", ["name", "version"])
MODEL_VERSION_STATE = Gauge(
    "lstm_model_version_state",
    "1 for a loaded version's state (READY, DRAINING), 0 for the others.",
    ["model", "version", "state"],
)
MODEL_LOADS = Counter(
    "lstm_model_loads", "Model versions loaded, by result (ok, failed).", ["result"]
)
MODEL_UNLOADS = Counter("lstm_model_unloads", "Drained model versions unloaded.")
REPOSITORY_READS = Counter(
    "lstm_model_repository_reads",
    "Passes over --model-repository (start, SIGHUP, polls) that finished, new versions loaded.",
)

CLOSE_REASONS = ("ended", "deleted", "expired", "taken_over", "shutdown", "superseded")
for _reason in CLOSE_REASONS:
    SESSIONS_CLOSED.labels(_reason)
