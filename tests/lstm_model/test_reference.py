import pytest
import torch

from lstm_model.reference import reference_forward
from tests.factories import make_inputs, make_model


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize(
    ("input_size", "hidden_size", "num_layers", "output_size", "kind"),
    [
        (1, 1, 1, 1, "regression"),
        (4, 16, 1, 3, "regression"),
        (6, 48, 2, 4, "classification"),
        (32, 64, 3, 8, "regression"),
        (5, 128, 4, 2, "classification"),
    ],
)
@torch.inference_mode()
def test_fast_path_equals_gate_by_gate_reference(
    input_size, hidden_size, num_layers, output_size, kind, cell
):
    """nn.LSTM / nn.GRU against the gate-by-gate cells, from a random state: every state
    tensor (h and c; h alone for a GRU) and every output within 1e-5."""
    model = make_model(
        input_size,
        hidden_size,
        num_layers,
        output_size,
        seed=hidden_size,
        kind=kind,
        normalised=True,
        cell=cell,
    )
    x = make_inputs(batch=3, steps=11, input_size=input_size, seed=num_layers)
    generator = torch.Generator().manual_seed(7)
    names = model.config.state_names
    state = tuple(torch.randn(num_layers, 3, hidden_size, generator=generator) for _ in names)

    y_fast, state_fast = model(x, state)
    y_ref, state_ref = reference_forward(model, x, state)

    assert y_fast.shape == (3, 11, output_size)
    assert len(state_fast) == len(state_ref) == {"lstm": 2, "gru": 1}[cell]
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=0)
    for name, fast, ref in zip(names, state_fast, state_ref, strict=True):
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@torch.inference_mode()
def test_classification_outputs_are_probabilities():
    model = make_model(kind="classification", output_size=4)
    y, _ = model(make_inputs())
    torch.testing.assert_close(y.sum(-1), torch.ones(y.shape[:2]))
    assert (y >= 0).all()


@torch.inference_mode()
def test_normalisation_is_applied_inside_the_model():
    model = make_model(normalised=True)
    plain = make_model(normalised=False)
    x = make_inputs()
    normalised_x = (x - model.input_mean) / torch.tensor(model.config.input_std)
    torch.testing.assert_close(model(x)[0], plain(normalised_x)[0], atol=1e-6, rtol=0)
