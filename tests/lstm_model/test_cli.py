import os
import subprocess

import torch

from lstm_model.checkpoint import load_model
from lstm_model.cli import main
from tests.factories import console_script


def test_init_is_seeded_and_has_the_asked_sizes(tmp_path, capsys):
    args = [
        "init",
        "--input-size",
        "32",
        "--hidden-size",
        "64",
        "--num-layers",
        "2",
        "--output-size",
        "8",
        "--seed",
        "5",
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert a.fingerprint == b.fingerprint
    config = a.model.config
    assert (config.input_size, config.hidden_size, config.num_layers, config.output_size) == (
        32,
        64,
        2,
        8,
    )
    assert a.model.lstm.weight_ih_l1.shape == (256, 64)


def test_init_seed_changes_weights(tmp_path):
    base = [
        "init",
        "--input-size",
        "2",
        "--hidden-size",
        "3",
        "--num-layers",
        "1",
        "--output-size",
        "1",
    ]
    main([*base, "--out", str(tmp_path / "a"), "--seed", "1"])
    main([*base, "--out", str(tmp_path / "b"), "--seed", "2"])
    a, b = load_model(tmp_path / "a").model, load_model(tmp_path / "b").model
    assert not torch.equal(a.lstm.weight_hh_l0, b.lstm.weight_hh_l0)


def test_console_script_reports_a_bad_model_dir_without_a_traceback(tmp_path):
    result = subprocess.run(
        [console_script("lstm-model"), "eval", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("lstm-model: ")
    assert "Traceback" not in result.stderr


INIT = ["init", "--input-size", "2", "--hidden-size", "3", "--num-layers", "1"]
INIT += ["--output-size", "2"]


def test_init_refuses_a_non_empty_out_unless_forced(tmp_path, capsys):
    out = tmp_path / "model"
    assert main([*INIT, "--out", str(out), "--seed", "1"]) == 0
    first = load_model(out).fingerprint
    capsys.readouterr()
    assert main([*INIT, "--out", str(out), "--seed", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lstm-model: --out {out}: exists and is not empty (--force overwrites it)"
    )
    assert load_model(out).fingerprint == first  # untouched
    assert main([*INIT, "--out", str(out), "--seed", "2", "--force"]) == 0
    assert load_model(out).fingerprint != first


def test_model_files_are_created_as_the_umask_says(tmp_path):
    previous = os.umask(0o022)
    try:
        assert main([*INIT, "--out", str(tmp_path / "model")]) == 0
    finally:
        os.umask(previous)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "model" / name).stat().st_mode & 0o777 == 0o644, name


def test_init_with_cell_gru_writes_a_gru_model(tmp_path, capsys):
    """`lstm-model init --cell gru` records the cell in config.json; the model loads as a GRU
    (one state tensor) whose outputs run chunk by chunk equal one pass."""
    import json

    import torch

    from lstm_model.checkpoint import load_model
    from lstm_model.cli import main
    from tests.factories import make_inputs

    out = tmp_path / "gru"
    args = ["init", "--cell", "gru", "--input-size", "3", "--hidden-size", "8"]
    assert main([*args, "--num-layers", "2", "--output-size", "2", "--out", str(out)]) == 0
    assert "cell=gru input=3 hidden=8 layers=2 output=2" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["cell"] == "gru"
    model = load_model(out).model
    x = make_inputs(batch=2, steps=6, input_size=3)
    with torch.inference_mode():
        whole, (h,) = model(x)
        first, state = model(x[:, :4])
        rest, (h_rest,) = model(x[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(h_rest, h, atol=1e-6, rtol=0)
