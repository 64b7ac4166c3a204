"""The engine, without gRPC: batches of mixed chunk lengths equal each chunk run alone."""

import numpy as np
import torch

from lstm_model.checkpoint import LoadedModel
from server.engine import Engine, StepWork
from tests.factories import make_model, offline, random_steps


def make_engine(
    capacity: int = 64, one_step_graphs: bool = False, max_batch_size: int = 64, **model_args
) -> Engine:
    model = make_model(**({"input_size": 6, "hidden_size": 32, "output_size": 4} | model_args))
    return Engine(
        LoadedModel(model, "f" * 64, None),
        capacity,
        torch.device("cpu"),
        torch.float32,
        max_batch_size,
        one_step_graphs,
    )


def test_a_batch_mixing_1_and_32_step_chunks_equals_the_unbatched_result():
    engine = make_engine()
    reference = make_engine()  # same seed, same weights: runs each session alone
    sequences = {slot: random_steps(66, 6, seed=slot) for slot in range(40)}
    plans = {slot: ([1, 32, 1, 32] if slot % 2 else [32, 1, 32, 1]) for slot in sequences}
    batched = {slot: [] for slot in sequences}
    for round_ in range(4):  # every batch holds 20 one-step and 20 32-step chunks
        batch, starts = [], {}
        for slot, plan in plans.items():
            starts[slot] = sum(plan[:round_])
            batch.append(
                StepWork(slot, sequences[slot][starts[slot] : starts[slot] + plan[round_]])
            )
        for work, out in zip(batch, engine.step(batch), strict=True):
            batched[work.slot].append(out)
    for slot, steps in sequences.items():
        alone = np.concatenate([reference.step([StepWork(slot, steps[:66])])[0]])
        np.testing.assert_allclose(np.concatenate(batched[slot]), alone, atol=1e-5, rtol=0)
        np.testing.assert_allclose(alone, offline(engine.model, steps), atol=1e-5, rtol=0)


def test_reset_zeroes_only_its_own_slot_and_empty_chunks_give_empty_outputs():
    engine = make_engine()
    steps = random_steps(5, 6, seed=2)
    engine.step([StepWork(0, steps), StepWork(1, steps)])
    outputs = engine.step([StepWork(0, steps[:0], reset=True), StepWork(1, steps[:0])])
    assert [o.shape for o in outputs] == [(0, 4), (0, 4)]
    (h0,), _ = engine.pool.read([0])
    (h1,), _ = engine.pool.read([1])
    assert torch.count_nonzero(h0) == 0
    assert torch.count_nonzero(h1) > 0


def test_predict_leaves_the_pool_untouched():
    engine = make_engine()
    before = engine.pool.h.clone()
    out = engine.predict(random_steps(7, 6))
    assert out.shape == (7, 4)
    assert torch.equal(engine.pool.h, before)


def test_bucketed_one_step_path_equals_the_plain_path():
    """The path CUDA graphs replay (padded to a bucket, padding written to the scratch slot),
    run eagerly on the CPU, gives the plain path's outputs and states, slot for slot."""
    bucketed, plain = make_engine(one_step_graphs=True), make_engine(one_step_graphs=False)
    assert bucketed.one_step is not None and bucketed.one_step.sizes == [1, 2, 4, 8, 16, 32, 64]
    rng = np.random.default_rng(0)
    for size in (1, 3, 5, 17, 33, 64, 2):  # bucket sizes 1, 4, 8, 32, 64, 64, 2
        slots = rng.choice(64, size=size, replace=False)
        steps = random_steps(size, 6, seed=size)
        batch = [StepWork(int(slot), steps[i : i + 1]) for i, slot in enumerate(slots)]
        for got, want in zip(bucketed.step(batch), plain.step(batch), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    real = slice(0, 64)
    torch.testing.assert_close(bucketed.pool.h[:, real], plain.pool.h[:, real], atol=1e-6, rtol=0)
    torch.testing.assert_close(bucketed.pool.c[:, real], plain.pool.c[:, real], atol=1e-6, rtol=0)
    assert torch.count_nonzero(plain.pool.h[:, 64]) == 0  # the plain path never uses scratch
