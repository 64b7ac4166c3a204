"""The bundled model reaches its model card's held-out accuracy on the committed recordings."""

import re
import subprocess
import sys

import torch

from lstm_model.checkpoint import BUNDLED_MODEL_DIR, load_model
from lstm_model.evaluate import evaluate
from lstm_model.recordings import load_recordings


def model_card_correct() -> dict[int, int]:
    """Recordings classified correctly after t steps, as the model card's table states them."""
    card = (BUNDLED_MODEL_DIR / "MODEL_CARD.md").read_text()
    rows = re.findall(r"^\| (\d+) \| [\d.]+% \((\d+)/40\) \|$", card, flags=re.M)
    return {int(steps): int(correct) for steps, correct in rows}


def test_model_card_lists_accuracy_after_10_25_50_100_steps():
    assert sorted(model_card_correct()) == [10, 25, 50, 100]


def test_bundled_model_reaches_the_model_cards_accuracy():
    loaded = load_model()
    recordings = load_recordings()
    assert recordings.inputs.shape == (40, 100, 6)
    assert torch.bincount(recordings.labels).tolist() == [10, 10, 10, 10]
    assert recordings.label_names == loaded.model.config.labels

    accuracy = evaluate(loaded.model, recordings)
    for steps, correct in model_card_correct().items():
        assert round(accuracy[steps] * 40) == correct, steps
    assert accuracy[100] >= 0.85  # and the card's figure is a useful one


def test_lstm_model_eval_prints_the_model_cards_table():
    out = subprocess.run(
        [sys.executable, "-m", "lstm_model.cli", "eval"], capture_output=True, text=True, check=True
    ).stdout
    card = (BUNDLED_MODEL_DIR / "MODEL_CARD.md").read_text()
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 6
    for line in table:
        assert line in card
