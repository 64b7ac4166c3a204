"""The suite's one rule for "equal to offline", and the state an exactly-once test compares.

Equal to offline: elementwise within ATOL + RTOL·|x| (1e-5 + 4e-6·|x|) of the float32 offline
computation x, or else within that + 3·|f32 − f64| of the float64 one. Batching moves an
ill-conditioned float32 input by ~4e-5 (a batched GEMM sums in another order); the float64 term
admits exactly that conditioning and nothing else, so a wrong step still shows. The relative term
is for the cell state: c is an accumulator (c = f·c + i·g, f near 1 for many steps), reaches tens,
where one float32 ulp is 2e-6, and its rounding adds up over steps (a replica in a container
exported c = 25.49843 against 25.49842 offline, f32 and f64 alike). 4e-6 is 32 float32 ulps;
a doubled step moves logits by 2e-2 or more.

A doubled or skipped step can hide in a classifier's outputs: the bundled model's softmax
saturates, and a step applied twice moved it by less than 1e-5 in a third of random inputs while
its logits moved by 2e-2 or more. So a test of exactly-once, resume, replay, takeover, transfer
or restart also compares the session's exported state (h and c; h for a GRU) with offline
(assert_state_equals_offline), or runs a regression model, whose outputs do not saturate.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from lstm_model.model import SequenceModel
from tests.factories import one_thread

ATOL = 1e-5
RTOL = 4e-6


def _run(model: SequenceModel, steps, dtype: torch.dtype):
    """Outputs (T, O) and the final state tensors (h and c, or h), (L, H) each, of one sequence
    from zero state."""
    one_thread()
    if dtype is not torch.float32:
        model = copy.deepcopy(model).to(dtype)
    with torch.inference_mode():
        x = torch.as_tensor(np.asarray(steps), dtype=dtype)[None]  # (1, T, I)
        y, state = model(x)
    return y[0].double().numpy(), tuple(t[:, 0].double().numpy() for t in state)


def _assert_close(got, f32, f64_of, err_msg: str, what: str) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == f32.shape, f"{what}: shape {got.shape}, offline {f32.shape}. {err_msg}"
    if np.all(np.abs(got - f32) <= ATOL + RTOL * np.abs(f32)):
        return
    f64 = f64_of()
    bound = ATOL + RTOL * np.abs(f64) + 3 * np.abs(f32 - f64)
    off = np.abs(got - f64) > bound
    if off.any():
        worst = np.unravel_index(np.argmax(np.abs(got - f64) - bound), got.shape)
        raise AssertionError(
            f"{what}: {int(off.sum())} of {got.size} values differ from offline; worst at "
            f"{worst}: got {got[worst]:.7g}, float32 offline {f32[worst]:.7g}, float64 offline "
            f"{f64[worst]:.7g} (allowed {bound[worst]:.2g}). {err_msg}"
        )


def assert_equals_offline(
    got, model: SequenceModel, steps, first: int = 0, err_msg: str = ""
) -> None:
    """`got` holds the outputs of steps first .. first + len(got) - 1 of the sequence `steps`
    (T, I), run whole from zero state."""
    rows = slice(first, first + len(got))
    y32 = _run(model, steps, torch.float32)[0][rows]
    _assert_close(got, y32, lambda: _run(model, steps, torch.float64)[0][rows], err_msg, "outputs")


def offline_state(model: SequenceModel, steps) -> tuple[np.ndarray, ...]:
    """The state tensors (h and c, or h) after the sequence `steps` (T, I) from zero state,
    (L, H) each, float32."""
    return tuple(t.astype(np.float32) for t in _run(model, steps, torch.float32)[1])


def exported_state(
    target: str, session_id: str, metadata: Sequence[tuple[str, str]] = ()
) -> tuple[dict[str, np.ndarray], int]:
    """A live session's state tensors by name ((L, H) each) and its next step, as ExportSession
    gives them."""
    import grpc
    from safetensors.numpy import load

    from lstm_stream.v1 import inference_pb2 as pb
    from lstm_stream.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.ExportSessionRequest(session_id=session_id)
        state = stub.ExportSession(request, metadata=tuple(metadata), timeout=30).state
        info = stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=metadata)
    tensors = load(state)
    tensors.pop("replay")
    return tensors, info.session.next_step


def assert_state_equals_offline(
    target: str,
    session_id: str,
    model: SequenceModel,
    steps,
    metadata: Sequence[tuple[str, str]] = (),
    err_msg: str = "",
) -> None:
    """The session has applied exactly `steps` (T, I) from zero state, each once: its next step
    is T and every exported state tensor (h and c, or h) equals offline's."""
    state, next_step = exported_state(target, session_id, metadata)
    assert next_step == len(steps), f"next_step {next_step}, expected {len(steps)}. {err_msg}"
    names = model.config.state_names
    assert sorted(state) == sorted(names), f"exported {sorted(state)}, expected {names}"
    offline32 = _run(model, steps, torch.float32)[1]
    f64 = lambda: _run(model, steps, torch.float64)[1]  # noqa: E731
    for k, name in enumerate(names):
        _assert_close(state[name], offline32[k], lambda k=k: f64()[k], err_msg, f"exported {name}")
