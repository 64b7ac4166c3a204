"""ServerConfig: every setting of lstm-serve, from flags or LSTM_SERVE_* environment variables.

One config object is built at start and passed down; nothing else reads flags or the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lstm_model.checkpoint import BUNDLED_MODEL_DIR
from server.one_step import CHOICES as ONE_STEP_KERNELS
from server.store_backend import check_url

ENV_PREFIX = "LSTM_SERVE_"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 8000  # 0 disables the /metrics endpoint
    model: str = str(BUNDLED_MODEL_DIR)
    model_repository: str = ""  # DIR/NAME/VERSION/ model directories; set: --model is unused
    repository_poll_s: float = 30.0  # re-read the repository this often (0: on SIGHUP only)
    default_model: str = ""  # the model of requests that name none (default: the first by name)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | float16 | bfloat16
    max_batch_size: int = 256  # sessions per batch
    max_batch_delay_us: int = 0  # 0: eager, dispatch as soon as the engine is free
    max_sessions: int = 10_000
    session_idle_timeout_s: float = 600.0
    replay_steps: int = 256
    max_chunk_steps: int = 512
    max_batch_chunks: int = 4096  # sessions' chunks in one StepBatch / StreamBatches message
    snapshot_dir: str = ""
    snapshot_discard_invalid: bool = False  # start empty instead of refusing a bad snapshot
    state_store: str = ""  # redis://HOST:PORT/DB: durable sessions shared by replicas
    state_store_interval_ms: float = 100.0  # writes start at most this often (0: back to back)
    torch_threads: int = 0  # 0: per batch (server/engine.py ThreadPolicy)
    one_step_kernel: str = "nn.LSTM"  # nn.LSTM | fused | fastest (server/one_step.py)
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    # Security (docs/security.md)
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set: mutual TLS, clients must present a certificate it signed
    auth_tokens: str = ""  # file of "TOKEN PRINCIPAL" lines; set: every call needs a token
    auth_health: bool = False  # also require a token for health and reflection
    max_sessions_per_principal: int = 0  # 0: no per-principal quota
    rate_limit_steps_per_s: float = 0.0  # per principal; 0: unlimited
    max_message_bytes: int = 16 * 1024 * 1024
    max_streams_per_connection: int = 4096
    min_ping_interval_s: float = 10.0  # clients pinging more often are told to go away

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_sessions",
            "replay_steps",
            "max_chunk_steps",
            "max_batch_chunks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in (
            "max_batch_delay_us",
            "torch_threads",
            "port",
            "metrics_port",
            "max_sessions_per_principal",
            "rate_limit_steps_per_s",
            "max_message_bytes",
            "max_streams_per_connection",
            "min_ping_interval_s",
            "state_store_interval_ms",
            "repository_poll_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if self.session_idle_timeout_s <= 0:
            raise ValueError(
                f"--session-idle-timeout-s must be > 0, got {self.session_idle_timeout_s}"
            )
        if self.state_store:
            check_url(self.state_store)
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.one_step_kernel not in ONE_STEP_KERNELS:
            raise ValueError(
                f"--one-step-kernel must be one of {', '.join(ONE_STEP_KERNELS)}, "
                f"got {self.one_step_kernel!r}"
            )


_HELP = {
    "host": "address to bind",
    "port": "gRPC port (0: pick a free one)",
    "metrics_port": "Prometheus /metrics port (0 disables)",
    "model": "model directory (config.json + model.safetensors); default: the bundled model",
    "model_repository": "model repository DIR/NAME/VERSION/ (each a model directory): several "
    "models and versions, re-read on SIGHUP and every --repository-poll-s (replaces --model)",
    "repository_poll_s": "re-read --model-repository this often, in seconds (0: on SIGHUP only)",
    "default_model": "the model of requests that name none (default: the repository's first "
    "model by name)",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N",
    "dtype": "compute dtype on the device",
    "max_batch_size": "most sessions stepped in one batch",
    "max_batch_delay_us": "longest a free engine waits for a batch to fill (0: eager)",
    "max_sessions": "session capacity (RESOURCE_EXHAUSTED beyond it)",
    "session_idle_timeout_s": "sessions idle this long expire",
    "replay_steps": "outputs kept per session to answer resent timesteps",
    "max_chunk_steps": "most timesteps in one message",
    "max_batch_chunks": "most sessions' chunks in one StepBatch or StreamBatches message",
    "snapshot_dir": "write sessions here on shutdown, restore them at start",
    "snapshot_discard_invalid": "move a mismatched or corrupt snapshot aside and start empty "
    "(default: refuse to start)",
    "state_store": "redis://HOST:PORT/DB, or redis+cluster://HOST:PORT[,HOST:PORT...] for a "
    "Redis Cluster: write session state behind to Redis, so another replica can continue a "
    "session after this one is lost (default: off)",
    "state_store_interval_ms": "start a write to the state store at most this often: each "
    "session is written at most once per interval, and the store lags the session by at most "
    "the interval plus one write's time (0: write as soon as the last write is done)",
    "torch_threads": "torch intra-op threads (0: per batch, all cores but one for one-step "
    "chunks and every core for chunks of 8 or more timesteps)",
    "one_step_kernel": "what runs one-step batches: nn.LSTM; fused (one addmm per layer: faster "
    "for small batches on a CPU, but its outputs drift from nn.LSTM's by float rounding, which "
    "a recurrence can amplify past 1e-5); fastest (of the two, per batch size, timed at start)",
    "shutdown_grace_s": "how long in-flight work gets on shutdown",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "tls_cert": "PEM certificate chain: serve TLS",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle: require client certificates it signed (mutual TLS)",
    "auth_tokens": "file of 'TOKEN PRINCIPAL' lines: require 'authorization: Bearer TOKEN' "
    "(reloaded on SIGHUP)",
    "auth_health": "require a token for health checks and reflection too",
    "max_sessions_per_principal": "per-principal session quota (0: none)",
    "rate_limit_steps_per_s": "per-principal timesteps per second (0: unlimited)",
    "max_message_bytes": "largest request message accepted",
    "max_streams_per_connection": "concurrent streams per HTTP/2 connection",
    "min_ping_interval_s": "keepalive pings more frequent than this get GOAWAY",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-serve",
        description="Streaming LSTM inference server. Every flag is also an environment "
        f"variable {ENV_PREFIX}<FLAG>, e.g. {ENV_PREFIX}MAX_SESSIONS.",
    )
    for field in dataclasses.fields(ServerConfig):
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(field.default, bool):
            parser.add_argument(
                flag,
                dest=field.name,
                action="store_const",
                const=True,
                default=None,
                help=_HELP[field.name],
            )
            continue
        parser.add_argument(
            flag,
            dest=field.name,
            type=type(field.default),
            default=None,
            help=f"{_HELP[field.name]} (default {field.default!r})",
        )
    return parser


def _parse_env(name: str, text: str, default: object) -> object:
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: expected true or false, got {text!r}")
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(
            f"{ENV_PREFIX}{name.upper()}: expected {type(default).__name__}, got {text!r}"
        ) from None


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Flags win over environment variables, which win over the defaults."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values = {}
    for field in dataclasses.fields(ServerConfig):
        flag = getattr(args, field.name)
        env = environ.get(ENV_PREFIX + field.name.upper())
        if flag is not None:
            values[field.name] = flag
        elif env is not None:
            values[field.name] = _parse_env(field.name, env, field.default)
    return ServerConfig(**values)
