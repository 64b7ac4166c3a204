"""What one StreamSteps message costs the server on the wire side, with each encoding (DESIGN
1.6): parse the request and decode its inputs, then set the outputs and serialise the response.
In-process, no network: the part of a message's cost that the encoding decides.

    python -m bench.wire
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.engine_step import median_s
from lstm_stream.v1 import inference_pb2 as pb
from server.codec import decode_steps, put_outputs

INPUT_SIZE, OUTPUT_SIZE = 32, 8  # the init256 model's
STEPS = (1, 32)


def message_cost(steps: int, packed: bool, repeats: int = 2000) -> dict[str, Any]:
    rng = np.random.default_rng(steps)
    inputs = rng.standard_normal((steps, INPUT_SIZE), dtype=np.float32)
    outputs = rng.standard_normal((steps, OUTPUT_SIZE), dtype=np.float32)
    request = (
        pb.StreamStepsRequest(packed_inputs=inputs.tobytes())
        if packed
        else pb.StreamStepsRequest(inputs=inputs.ravel().tolist())
    )
    wire = request.SerializeToString()

    def decode() -> None:
        message = pb.StreamStepsRequest.FromString(wire)
        decode_steps(message.inputs, INPUT_SIZE, 512, message.packed_inputs)

    def encode() -> None:
        response = pb.StreamStepsResponse(start_step=0, num_steps=steps)
        put_outputs(response, outputs, packed)
        response.SerializeToString()

    return {
        "steps": steps,
        "packed": packed,
        "request_bytes": len(wire),
        "decode_s": median_s(decode, repeats, warmup=50),
        "encode_s": median_s(encode, repeats, warmup=50),
    }


def run_all(repeats: int = 2000) -> list[dict[str, Any]]:
    return [message_cost(steps, packed, repeats) for steps in STEPS for packed in (False, True)]


def wire_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"| timesteps per message (input {INPUT_SIZE}, output {OUTPUT_SIZE}) | encoding "
        "| request bytes | parse + decode µs | outputs + serialise µs | per message µs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        encoding = "packed bytes" if r["packed"] else "repeated float"
        total = (r["decode_s"] + r["encode_s"]) * 1e6
        lines.append(
            f"| {r['steps']} | {encoding} | {r['request_bytes']:,} | {r['decode_s'] * 1e6:.1f} "
            f"| {r['encode_s'] * 1e6:.1f} | {total:.1f} |"
        )
    return lines


def main() -> None:
    print("\n".join(wire_table(run_all())))


if __name__ == "__main__":
    main()
