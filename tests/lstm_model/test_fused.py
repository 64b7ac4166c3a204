"""FusedStep, one timestep as one addmm per layer, against SequenceModel.forward."""

import pytest
import torch

from lstm_model.fused import FusedStep
from tests.factories import make_model


@pytest.mark.parametrize("kind", ["regression", "classification"])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_fused_steps_equal_the_model_stepped_one_timestep_at_a_time(kind, batch):
    model = make_model(input_size=5, hidden_size=24, num_layers=2, output_size=3, kind=kind,
                       normalised=True)  # fmt: skip
    fused = FusedStep(model)
    x = torch.randn(batch, 6, 5, generator=torch.Generator().manual_seed(batch))  # (B, T, I)
    with torch.inference_mode():
        want, (h_want, c_want) = model(x)  # (B, T, O)
        h, c = model.init_state(batch)  # (L, B, H)
        got = torch.stack([fused(x[:, t], h, c)[0] for t in range(6)], dim=1)  # (B, T, O)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, h_want, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, c_want, atol=1e-5, rtol=0)
    assert not torch.equal(h, torch.zeros_like(h))  # the state was updated in place
