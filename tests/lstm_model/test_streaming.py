"""A sequence fed in any chunking gives the outputs and final state of one pass."""

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.factories import make_inputs, make_model

MODEL = make_model(input_size=3, hidden_size=24, num_layers=2, output_size=5, normalised=True)
STEPS = 40


def run_in_chunks(x: torch.Tensor, boundaries: list[int]) -> tuple[torch.Tensor, tuple]:
    state = MODEL.init_state(x.shape[0])
    outputs = []
    cuts = [0, *sorted(set(boundaries)), x.shape[1]]
    for start, end in itertools.pairwise(cuts):
        if start == end:
            continue
        y, state = MODEL(x[:, start:end], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


@settings(max_examples=60, deadline=None)
@given(
    boundaries=st.lists(st.integers(min_value=0, max_value=STEPS), max_size=STEPS),
    seed=st.integers(0, 2**16),
)
@torch.inference_mode()
def test_any_chunking_equals_one_pass(boundaries, seed):
    x = make_inputs(batch=2, steps=STEPS, input_size=3, seed=seed)
    y_once, (h_once, c_once) = MODEL(x)
    y_chunked, (h_chunked, c_chunked) = run_in_chunks(x, boundaries)
    torch.testing.assert_close(y_chunked, y_once, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_chunked, h_once, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_chunked, c_once, atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=8))
@torch.inference_mode()
def test_rows_of_different_lengths_in_one_chunk_equal_each_row_alone(lengths):
    batch, longest = len(lengths), max(lengths)
    x = make_inputs(batch=batch, steps=longest, input_size=3, seed=batch)
    generator = torch.Generator().manual_seed(longest)
    state = tuple(torch.randn(2, batch, 24, generator=generator) for _ in range(2))

    y, (h, c) = MODEL(x, state, lengths=torch.tensor(lengths))

    for b, length in enumerate(lengths):
        row_state = (state[0][:, b : b + 1], state[1][:, b : b + 1])
        y_row, (h_row, c_row) = MODEL(x[b : b + 1, :length], row_state)
        torch.testing.assert_close(y[b : b + 1, :length], y_row, atol=1e-5, rtol=0)
        torch.testing.assert_close(h[:, b : b + 1], h_row, atol=1e-5, rtol=0)
        torch.testing.assert_close(c[:, b : b + 1], c_row, atol=1e-5, rtol=0)
