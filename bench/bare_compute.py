"""The model's own compute rate, with no server: SequenceModel's forward on one fixed batch."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

COMPUTE_BATCH, COMPUTE_STEPS = 64, 32  # the bare-model forward: (64, 32, input_size)


def time_bare_model(
    model_dir: Path | None, device: str, repeats: int = 30, threads: int = 0
) -> dict[str, Any]:
    """Median wall time of SequenceModel's forward on a (64, 32, input) batch with state, at
    `threads` torch threads (0: lstm-serve's own for such a batch, every core); in timesteps
    per second."""
    import torch

    from lstm_model import BUNDLED_MODEL_DIR, load_model
    from server.engine import ThreadPolicy

    threads = threads or ThreadPolicy().threads(COMPUTE_BATCH, COMPUTE_BATCH * COMPUTE_STEPS)
    torch.set_num_threads(threads)
    model = load_model(model_dir or BUNDLED_MODEL_DIR, device=device).model
    x = torch.randn(COMPUTE_BATCH, COMPUTE_STEPS, model.config.input_size, device=device)
    state = model.init_state(COMPUTE_BATCH)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):  # the first 3 warm up
            sync()
            start = time.perf_counter()
            model(x, state)
            sync()
            if i >= 3:
                times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "batch": COMPUTE_BATCH,
        "steps": COMPUTE_STEPS,
        "torch_threads": threads,
        "device": device,
        "repeats": repeats,
        "median_s": median,
        "timesteps_per_s": COMPUTE_BATCH * COMPUTE_STEPS / median,
    }
