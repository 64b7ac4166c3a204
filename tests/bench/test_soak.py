"""The soak target runs: a few seconds of it, with every check it makes at full length."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_soak_smoke_run_passes_its_checks(tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            "--seconds",
            "6",
            "--sample-every",
            "1",
            "--workers",
            "8",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert all(report["checks"].values()), report["checks"]
    assert report["counts"]["sessions"] > 0 and report["counts"]["errors"] == 0
    assert len(report["samples"]) >= 4
    assert all(s["rss_mib"] > 0 for s in report["samples"])


ILL_CONDITIONED_SEED = 994734146  # a soak input: float32 offline is 3.7e-5 from float64


def batched(model, steps: np.ndarray, chunks: list[int], seed: int = 1) -> np.ndarray:
    """The session's outputs chunk by chunk, each chunk sharing a batch with random rows of
    other lengths, as the server runs it (packed sequences)."""
    rng = np.random.default_rng(seed)
    layers, hidden = model.config.num_layers, model.config.hidden_size
    h, c = torch.zeros(layers, 1, hidden), torch.zeros(layers, 1, hidden)
    outputs, start = [], 0
    with torch.inference_mode():
        for n in chunks:
            lengths = [n, *rng.integers(1, 9, 5).tolist()]
            x = (rng.standard_normal((6, max(lengths), 6)) * 3).astype(np.float32)  # (B, T, I)
            x[0, :n], x[0, n:] = steps[start : start + n], 0
            h0 = torch.cat([h, torch.randn(layers, 5, hidden)], 1)  # (L, B, H)
            c0 = torch.cat([c, torch.randn(layers, 5, hidden)], 1)
            y, (h1, c1) = model(torch.from_numpy(x), (h0, c0), torch.tensor(lengths))
            outputs.append(y[0, :n].numpy())
            h, c, start = h1[:, :1], c1[:, :1], start + n
    return np.concatenate(outputs)


def test_the_soak_check_allows_float32_error_and_catches_misapplied_state():
    from bench.soak import Churn

    churn = Churn("unused:0", seed=0)
    steps = np.random.default_rng(ILL_CONDITIONED_SEED).standard_normal((59, 6))
    steps = steps.astype(np.float32) * 3
    chunks = [8, 7, 4, 5, 7, 1, 2, 6, 5, 4, 3, 7]
    got = batched(churn.model, steps, chunks)
    expected = churn.offline(steps, torch.float32)
    assert np.abs(got - expected).max() > 1e-5  # what failed the smoke run
    assert churn.matches_offline(steps, got)
    assert churn.counts["ill_conditioned"] == 1
    # One step applied twice, or the state lost once, is far beyond float32's error.
    twice = np.concatenate([steps[:12], steps[11:58]])
    assert not churn.matches_offline(steps, batched(churn.model, twice, chunks))
    restart = np.concatenate([got[:8], batched(churn.model, steps[8:], chunks[1:])])
    assert not churn.matches_offline(steps, restart)
    # A typical input is held to 1e-5, batched or not.
    typical = np.random.default_rng(5).standard_normal((40, 6)).astype(np.float32) * 3
    assert churn.matches_offline(typical, batched(churn.model, typical, [8, 8, 8, 8, 8]))
    assert churn.counts["ill_conditioned"] == 1
