"""The engine, without gRPC: batches of mixed chunk lengths equal each chunk run alone."""

import numpy as np
import pytest
import torch

from lstm_model.checkpoint import LoadedModel
from server.engine import Engine, StepWork
from server.one_step import KERNELS
from server.state_pool import StatePool
from tests.factories import make_model, offline, random_steps


def make_engine(
    capacity: int = 64,
    one_step_graphs: bool = False,
    max_batch_size: int = 64,
    one_step_kernel: str = "nn.LSTM",
    **model_args,
) -> Engine:
    model = make_model(**({"input_size": 6, "hidden_size": 32, "output_size": 4} | model_args))
    return Engine(
        LoadedModel(model, "f" * 64, None),
        capacity,
        torch.device("cpu"),
        torch.float32,
        max_batch_size,
        one_step_graphs,
        one_step_kernel=one_step_kernel,
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
        for work, out in zip(batch, engine.step(batch).rows, strict=True):
            batched[work.slot].append(out)
    for slot, steps in sequences.items():
        alone = np.concatenate([reference.step([StepWork(slot, steps[:66])]).rows[0]])
        np.testing.assert_allclose(np.concatenate(batched[slot]), alone, atol=1e-5, rtol=0)
        np.testing.assert_allclose(alone, offline(engine.network, steps), atol=1e-5, rtol=0)


def test_reset_zeroes_only_its_own_slot_and_empty_chunks_give_empty_outputs():
    engine = make_engine()
    steps = random_steps(5, 6, seed=2)
    engine.step([StepWork(0, steps), StepWork(1, steps)])
    outputs = engine.step([StepWork(0, steps[:0], reset=True), StepWork(1, steps[:0])]).rows
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


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bucketed_one_step_path_equals_the_plain_path(cell):
    """The path CUDA graphs replay (padded to a bucket, padding written to the scratch slot),
    run eagerly on the CPU, gives the plain path's outputs and states, slot for slot, for
    either cell (a GRU's pool holds h alone)."""
    bucketed = make_engine(one_step_graphs=True, cell=cell)
    plain = make_engine(one_step_graphs=False, cell=cell)
    assert len(plain.pool.tensors) == {"lstm": 2, "gru": 1}[cell]
    assert bucketed.one_step is not None and bucketed.one_step.sizes == [1, 2, 4, 8, 16, 32, 64]
    rng = np.random.default_rng(0)
    for size in (1, 3, 5, 17, 33, 64, 2):  # bucket sizes 1, 4, 8, 32, 64, 64, 2
        slots = rng.choice(64, size=size, replace=False)
        steps = random_steps(size, 6, seed=size)
        batch = [StepWork(int(slot), steps[i : i + 1]) for i, slot in enumerate(slots)]
        for got, want in zip(bucketed.step(batch).rows, plain.step(batch).rows, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    real = slice(0, 64)
    for bucketed_state, plain_state in zip(bucketed.pool.tensors, plain.pool.tensors, strict=True):
        torch.testing.assert_close(bucketed_state[:, real], plain_state[:, real], atol=1e-6, rtol=0)
    assert torch.count_nonzero(plain.pool.h[:, 64]) == 0  # the plain path never uses scratch


def test_a_gru_runs_its_module_whichever_one_step_kernel_is_asked_for():
    """There is no fused GRU step: `fused` and `fastest` run nn.GRU, equal to offline."""
    for kernel in ("fused", "fastest"):
        engine = make_engine(one_step_kernel=kernel, cell="gru")
        assert {engine.one_step.kernel_for(n) for n in (1, 10, 64)} == {"nn.LSTM"}
        steps = random_steps(6, 6, seed=9)
        rows = [engine.step([StepWork(0, steps[t : t + 1])]).rows[0] for t in range(6)]
        np.testing.assert_allclose(
            np.concatenate(rows), offline(engine.network, steps), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("kernel", ["fused", "fastest"])
def test_each_one_step_kernel_streams_what_nn_lstm_does(kernel):
    """Ten sessions stepped one timestep per batch, with a mixed batch and a reset between."""
    engine, plain = make_engine(one_step_kernel=kernel), make_engine()
    assert {engine.one_step.kernel_for(n) for n in (1, 10, 64)} <= set(KERNELS)
    steps = {slot: random_steps(8, 6, seed=slot) for slot in range(10)}
    for t in range(8):
        if t == 4:  # a batch of uneven chunks, then one with a reset alone
            batch = [StepWork(slot, steps[slot][t : t + 1 + slot % 2]) for slot in range(10)]
            batch.append(StepWork(10, steps[0][:0], reset=True))
        else:
            batch = [StepWork(slot, steps[slot][t : t + 1]) for slot in range(10)]
        for got, want in zip(engine.step(batch).rows, plain.step(batch).rows, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(engine.pool.h, plain.pool.h, atol=1e-5, rtol=0)


def test_a_uniform_batch_hands_back_one_array_whose_rows_are_the_outputs():
    engine = make_engine()
    steps = random_steps(6, 6, seed=4)
    out = engine.step([StepWork(slot, steps[slot * 3 : slot * 3 + 3]) for slot in range(2)])
    assert out.uniform is not None and out.uniform.shape == (2, 3, 4)
    for row, array in zip(out.rows, out.uniform, strict=True):
        assert np.shares_memory(row, out.uniform) and np.array_equal(row, array)
    np.testing.assert_allclose(out.rows[0], offline(engine.network, steps[:3]), atol=1e-5, rtol=0)


def test_zeroing_slots_builds_its_index_on_the_pools_own_device():
    """Ending a session zeroes its slot from the event loop's side; an index made on the CPU
    fails against a pool on another device (seen on the GPU as one error per session)."""
    pool = StatePool(2, 3, 4, torch.device("meta"), torch.float32)  # checks devices like CUDA
    pool.zero([1, 2])
    cpu = StatePool(1, 2, 4, torch.device("cpu"), torch.float32)
    cpu.h.fill_(1.0)
    cpu.zero([2])
    assert cpu.h[0, :, 0].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
