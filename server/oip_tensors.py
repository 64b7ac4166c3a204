"""Open Inference Protocol requests <-> what the core takes: the one input tensor as timesteps,
Triton's sequence parameters, and the response's output tensor.

A model has one FP32 input, INPUT, shaped [T, input_size] (or [1, T, input_size]: a batch of
one sequence), and one FP32 output, OUTPUT, shaped as the input with output_size in place of
input_size. Tensors arrive in `raw_input_contents` (little-endian bytes, what tritonclient sends)
or in the typed `contents.fp32_contents`; outputs go back in `raw_output_contents`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from server.codec import PACKED_DTYPE, check_session_id, decode_steps
from server.errors import BadInput

INPUT_NAME, OUTPUT_NAME, DATATYPE = "INPUT", "OUTPUT", "FP32"
START_STEP_PARAMETER = "lstm_start_step"  # this service's own: not a reserved name
DURABLE_STEP_PARAMETER = "durable_step"


@dataclass(frozen=True, slots=True)
class SequenceParameters:
    """Triton's sequence parameters of one request; no id: a stateless request."""

    session_id: str = ""
    start: bool = False
    end: bool = False
    start_step: int | None = None


def sequence_of(parameters: Any) -> SequenceParameters:
    """The request's `sequence_id` (int64 or string), `sequence_start`, `sequence_end` and
    `lstm_start_step` parameters."""
    if "sequence_id" not in parameters:
        named = [n for n in ("sequence_start", "sequence_end") if _flag(parameters, n)]
        named += [START_STEP_PARAMETER] if START_STEP_PARAMETER in parameters else []
        if named:
            raise BadInput(f"parameters: {named[0]} needs a sequence_id, and none was given")
        return SequenceParameters()
    raw = _value(parameters["sequence_id"], "sequence_id", ("int64_param", "string_param"))
    if isinstance(raw, int) and raw <= 0:
        raise BadInput(f"parameters: expected a sequence_id above 0 (0 means none), got {raw}")
    session_id = check_session_id(str(raw))
    start_step = None
    if START_STEP_PARAMETER in parameters:
        step = _value(parameters[START_STEP_PARAMETER], START_STEP_PARAMETER, _UNSIGNED)
        if step < 0:
            raise BadInput(f"parameters: expected {START_STEP_PARAMETER} >= 0, got {step}")
        start_step = int(step)
    return SequenceParameters(
        session_id,
        bool(_flag(parameters, "sequence_start")),
        bool(_flag(parameters, "sequence_end")),
        start_step,
    )


_UNSIGNED = ("int64_param", "uint64_param")


def _flag(parameters: Any, name: str) -> bool:
    return name in parameters and _value(parameters[name], name, ("bool_param",))


def _value(parameter: Any, name: str, kinds: tuple[str, ...]) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in kinds:
        expected = " or ".join(kinds)
        raise BadInput(f"parameters: expected {name} as {expected}, got {kind or 'no value'}")
    return getattr(parameter, kind)


def decode_input(request: Any, input_size: int, max_steps: int) -> tuple[np.ndarray, bool]:
    """The request's timesteps (T, input_size) float32, and whether they came with a leading
    batch dimension of 1."""
    if len(request.inputs) != 1:
        names = [t.name for t in request.inputs]
        raise BadInput(f"inputs: expected one tensor, {INPUT_NAME}, got {len(names)}: {names}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise BadInput(f"inputs[0].name: expected {INPUT_NAME!r}, got {tensor.name!r}")
    if tensor.datatype != DATATYPE:
        raise BadInput(f"{INPUT_NAME}.datatype: expected {DATATYPE!r}, got {tensor.datatype!r}")
    shape = list(tensor.shape)
    batched = len(shape) == 3
    if not (len(shape) == 2 or (batched and shape[0] == 1)) or shape[-1] != input_size:
        raise BadInput(
            f"{INPUT_NAME}.shape: expected [timesteps, {input_size}] or [1, timesteps, "
            f"{input_size}], got {shape}"
        )
    if shape[-2] < 0:
        raise BadInput(f"{INPUT_NAME}.shape: expected a timestep count >= 0, got {shape}")
    count = shape[-2] * input_size
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise BadInput(
                f"raw_input_contents: expected one entry (for {INPUT_NAME}), got "
                f"{len(request.raw_input_contents)}"
            )
        raw = request.raw_input_contents[0]
        if tensor.contents.fp32_contents:
            raise BadInput(f"{INPUT_NAME}: expected raw_input_contents or contents, got both")
        if len(raw) != 4 * count:
            raise BadInput(
                f"raw_input_contents[0]: expected {4 * count} bytes (FP32, shape {shape}), "
                f"got {len(raw)}"
            )
        return decode_steps((), input_size, max_steps, raw), batched
    values = tensor.contents.fp32_contents
    if len(values) != count:
        raise BadInput(
            f"{INPUT_NAME}.contents.fp32_contents: expected {count} values (shape {shape}), "
            f"got {len(values)}"
        )
    return decode_steps(values, input_size, max_steps), batched


def check_requested_outputs(request: Any) -> None:
    for wanted in request.outputs:
        if wanted.name != OUTPUT_NAME:
            raise BadInput(f"outputs: expected {OUTPUT_NAME!r} only, got {wanted.name!r}")


def put_output(response: Any, outputs: np.ndarray, batched: bool) -> None:
    """OUTPUT (T, output_size) into the response, shaped as its request's input was."""
    shape = [1, *outputs.shape] if batched else list(outputs.shape)
    response.outputs.add(name=OUTPUT_NAME, datatype=DATATYPE, shape=shape)
    response.raw_output_contents.append(outputs.astype(PACKED_DTYPE, copy=False).tobytes())
