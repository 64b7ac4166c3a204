import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lstm_model.checkpoint import ModelLoadError, load_model, save_model
from tests.factories import make_inputs, make_model, make_model_dir


def test_save_then_load_is_bit_for_bit(tmp_path):
    model = make_model(kind="classification", normalised=True)
    loaded = load_model(save_model(model, tmp_path / "m"))

    assert loaded.model.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    x = make_inputs()
    with torch.inference_mode():
        assert torch.equal(loaded.model(x)[0], model(x)[0])


def test_fingerprint_is_stable_and_tells_models_apart(tmp_path):
    a1 = load_model(make_model_dir(tmp_path / "a1", seed=1)).fingerprint
    a2 = load_model(make_model_dir(tmp_path / "a2", seed=1)).fingerprint
    b = load_model(make_model_dir(tmp_path / "b", seed=2)).fingerprint
    assert a1 == a2
    assert a1 != b
    assert len(a1) == 64


def _rewrite_config(model_dir, **changes):
    path = model_dir / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _rewrite_tensor(model_dir, name, tensor):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    if tensor is None:
        tensors.pop(name)
    else:
        tensors[name] = tensor
    save_file(tensors, str(path))


def _truncate(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "config.json").unlink(), "config.json: no such file"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: no such file"),
        (_truncate, "not a readable safetensors file"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: _rewrite_config(d, colour="blue"), "unknown keys ['colour']"),
        (lambda d: _rewrite_config(d, hidden_size=None), "missing required keys ['hidden_size']"),
        (lambda d: _rewrite_config(d, hidden_size=0), "hidden_size must be a positive integer"),
        (lambda d: _rewrite_config(d, output_kind="ranking"), "output_kind must be one of"),
        (
            lambda d: _rewrite_config(d, hidden_size=20),
            "tensor lstm.weight_ih_l0 has shape [64, 4], expected [80, 4]",
        ),
        (
            lambda d: _rewrite_tensor(d, "head.bias", torch.zeros(5)),
            "tensor head.bias has shape [5], expected [3]",
        ),
        (
            lambda d: _rewrite_tensor(d, "head.bias", torch.zeros(3, dtype=torch.float64)),
            "tensor head.bias has dtype torch.float64, expected float32",
        ),
        (
            lambda d: _rewrite_tensor(d, "lstm.weight_hh_l1", None),
            "missing tensors ['lstm.weight_hh_l1']",
        ),
        (
            lambda d: _rewrite_tensor(d, "extra.weight", torch.zeros(1)),
            "unexpected tensors ['extra.weight']",
        ),
        (
            lambda d: _rewrite_tensor(d, "lstm.bias_ih_l0", torch.full((64,), float("nan"))),
            "tensor lstm.bias_ih_l0 holds NaN or infinite values",
        ),
    ],
    ids=[
        "no-config",
        "no-weights",
        "truncated",
        "bad-json",
        "unknown-key",
        "missing-key",
        "bad-size",
        "bad-kind",
        "config-disagrees",
        "wrong-shape",
        "wrong-dtype",
        "missing-tensor",
        "unexpected-tensor",
        "nan-weights",
    ],
)
def test_malformed_model_dir_is_refused_with_a_clear_message(tmp_path, damage, message):
    model_dir = make_model_dir(tmp_path / "m")
    damage(model_dir)
    with pytest.raises(ModelLoadError) as err:
        load_model(model_dir)
    assert message in str(err.value)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(tmp_path / "nowhere")
