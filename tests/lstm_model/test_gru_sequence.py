"""GruSequence, the CPU kernel for multi-step chunks of a GRU model, against
SequenceModel.forward (nn.GRU): its native layer loop (C++, lstm_model/native.py) and its Python
loop, each."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lstm_model import gru_sequence
from lstm_model.checkpoint import LoadedModel
from lstm_model.gru_sequence import GruSequence
from server.engine import Engine, StepWork
from tests.factories import make_inputs, make_model, require_native_gru


def make_gru(**overrides):
    args = dict(input_size=5, hidden_size=24, num_layers=2, output_size=3, cell="gru")
    return make_model(**{**args, **overrides})


def random_state(model, batch: int, seed: int = 1) -> tuple[torch.Tensor]:
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    shape = (config.num_layers, batch, config.hidden_size)
    return (torch.randn(shape, generator=generator),)  # (L, B, H)


@pytest.fixture(params=["native", "python"])
def make_kernel(request):
    """GruSequence(model) with the native layer loop, or with the Python one."""
    if request.param == "native":
        require_native_gru()

    def make(model):
        kernel = GruSequence(model, use_native=request.param == "native")
        assert (kernel.native is not None) == (request.param == "native")
        return kernel

    return make


def assert_equals_the_module(model, kernel, batch: int, steps: int, seed: int = 0) -> None:
    x = make_inputs(batch, steps, model.config.input_size, seed)  # (B, T, I)
    state = random_state(model, batch, seed + 1)
    with torch.inference_mode():
        want, (h_want,) = model(x, state)  # (B, T, O), (L, B, H)
    got, (h_got,) = kernel(x, state)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_got, h_want, atol=1e-5, rtol=0)
    assert not torch.equal(h_got, state[0])  # it stepped


@pytest.mark.parametrize("kind", ["regression", "classification"])
@pytest.mark.parametrize(("batch", "steps"), [(1, 1), (5, 7), (64, 32)])
def test_a_chunk_equals_the_module(make_kernel, kind, batch, steps):
    model = make_gru(kind=kind, normalised=True)
    assert_equals_the_module(model, make_kernel(model), batch, steps)


@pytest.mark.parametrize("hidden", [5, 64, 100])
def test_one_layer_and_other_hidden_sizes_equal_the_module(make_kernel, hidden):
    """Hidden sizes under one vector, of whole vectors and with a short last vector."""
    model = make_gru(num_layers=1, hidden_size=hidden)
    assert_equals_the_module(model, make_kernel(model), 8, 9)


def test_batches_of_many_sizes_each_equal_the_module(make_kernel, monkeypatch):
    """Its recurrent weights are packed per batch size and the last few sizes (here 2) kept:
    sizes coming and going (the oldest evicted, then needed again) all compute the same."""
    monkeypatch.setattr(gru_sequence, "PACKED_BATCH_SIZES", 2)
    model = make_gru()
    kernel = make_kernel(model)
    for seed, batch in enumerate([3, 7, 3, 11, 7, 3, 5, 7]):
        assert_equals_the_module(model, kernel, batch, 4, seed)
    if torch.backends.mkl.is_available():
        assert list(kernel._packed) == [5, 7]  # the last two sizes, the newest last


def test_without_mkl_it_runs_plain_matrix_products_and_still_equals_the_module(
    make_kernel, monkeypatch
):
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    model = make_gru()
    kernel = make_kernel(model)
    assert_equals_the_module(model, kernel, 5, 6)
    assert not kernel._packed


def test_rows_of_different_lengths_go_to_the_module():
    model = make_gru()
    x = make_inputs(3, 5, 5)
    lengths = torch.tensor([5, 2, 4])
    state = random_state(model, 3)
    with torch.inference_mode():
        want, (h_want,) = model(x, state, lengths)
    got, (h_got,) = GruSequence(model)(x, state, lengths)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(h_got, h_want, atol=0, rtol=0)


def test_an_lstm_is_refused_saying_what_it_is():
    with pytest.raises(ValueError, match="expected a GRU model, got cell 'lstm'"):
        GruSequence(make_model(cell="lstm"))


def test_the_engine_runs_a_gru_chunk_through_it_and_matches_the_module():
    require_native_gru()
    model = make_gru(normalised=True)
    engine = Engine(LoadedModel(model, "test", Path(".")), 8, torch.device("cpu"), torch.float32)
    try:
        assert isinstance(engine.chunk_runner, GruSequence)
        assert engine.chunk_runner.native is not None  # the engine runs the C++ loop
        x = make_inputs(4, 6, 5).numpy()  # (B, T, I)
        outputs = engine.run_on_worker(
            lambda: engine.step([StepWork(slot, x[slot]) for slot in range(4)])
        )
        with torch.inference_mode():
            want, _ = model(torch.from_numpy(x))  # from zero state
        np.testing.assert_allclose(np.stack(outputs.rows), want.numpy(), atol=1e-5, rtol=0)
    finally:
        engine.close()
