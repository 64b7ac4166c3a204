"""What a benchmark run compares: the server variants, the models they serve, and the command
that starts each variant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

VARIANTS = ("shipped", "durable", "durable-eager", "unbatched", "echo")
TABLE_VARIANTS = ("shipped", "unbatched", "echo")  # the main tables; the durable ones have theirs
DURABLE_VARIANTS = ("durable", "durable-eager")
MODELS = ("init256", "bundled")
INIT256 = {"input_size": 32, "hidden_size": 256, "num_layers": 2, "output_size": 8}


def console_script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def prepare_model(key: str, workdir: Path) -> Path | None:
    """The model directory to serve: a fresh `lstm-model init` for init256, None for bundled."""
    if key == "bundled":
        return None
    out = workdir / key
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in INIT256.items()]
    subprocess.run(
        [console_script("lstm-model"), "init", *flags, "--seed", "0", "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


def model_summary(key: str, model_dir: Path | None) -> dict[str, Any]:
    from lstm_model import BUNDLED_MODEL_DIR, LSTMConfig

    config = LSTMConfig.load(Path(model_dir or BUNDLED_MODEL_DIR) / "config.json")
    return {
        "key": key,
        "name": config.name,
        "input_size": config.input_size,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "output_size": config.output_size,
    }


def server_command(
    variant: str,
    model: dict[str, Any],
    model_dir: Path | None,
    device: str,
    store_url: str = "",
) -> list[str]:
    listen = ["--host", "127.0.0.1", "--port", "0"]
    if variant == "echo":
        sizes = [f"--input-size={model['input_size']}", f"--output-size={model['output_size']}"]
        return [sys.executable, "-m", "bench.echo_server", *listen, *sizes]
    command = [console_script("lstm-serve"), *listen, "--metrics-port", "0"]
    command += ["--max-sessions", "4096", "--device", device]
    if model_dir is not None:
        command += ["--model", str(model_dir)]
    if variant == "unbatched":
        command += ["--max-batch-size", "1"]
    if variant in DURABLE_VARIANTS:
        command += ["--state-store", store_url]
    if variant == "durable-eager":
        command += ["--state-store-interval-ms", "0"]
    return command
