"""A bare gRPC echo of InferenceService: the same message shapes as lstm-serve, no model.

Benchmarked beside lstm-serve, it is the transport's ceiling on this machine: what grpc.aio and
protobuf alone cost per message.

    python -m bench.echo_server --host 127.0.0.1 --port 0 --input-size 32 --output-size 8
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("echo_server")
MAX_CHUNK_STEPS = 512


class EchoService(pb_grpc.InferenceServiceServicer):
    """Answers each StreamSteps message with zeros of the right shape."""

    def __init__(self, input_size: int, output_size: int) -> None:
        self.input_size = input_size
        self.output_size = output_size
        self.session_id = secrets.token_hex(16)
        self._zeros: dict[int, list[float]] = {}

    def _outputs(self, num_steps: int) -> list[float]:
        """A zeros list per chunk length, built once and reused."""
        zeros = self._zeros.get(num_steps)
        if zeros is None:
            zeros = self._zeros[num_steps] = [0.0] * (num_steps * self.output_size)
        return zeros

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any):
        return pb.GetModelInfoResponse(
            name="echo",
            input_size=self.input_size,
            output_size=self.output_size,
            max_chunk_steps=MAX_CHUNK_STEPS,
        )

    async def StreamSteps(
        self, request_iterator: AsyncIterator[pb.StreamStepsRequest], context: Any
    ) -> AsyncIterator[pb.StreamStepsResponse]:
        step = 0
        async for request in request_iterator:
            num_steps = len(request.inputs) // self.input_size
            yield pb.StreamStepsResponse(
                session_id=self.session_id,
                start_step=step,
                num_steps=num_steps,
                outputs=self._outputs(num_steps),
            )
            step += num_steps
            if request.end_session:
                return


async def create_echo_server(
    host: str, port: int, input_size: int, output_size: int
) -> tuple[grpc.aio.Server, int]:
    """Build the echo server, bound but not started; (server, bound port)."""
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(EchoService(input_size, output_size), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return server, bound


async def serve(host: str, port: int, input_size: int, output_size: int) -> None:
    server, bound = await create_echo_server(host, port, input_size, output_size)
    await server.start()
    log.info("serving on %s:%d", host, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: pick a free one")
    parser.add_argument("--input-size", type=int, required=True)
    parser.add_argument("--output-size", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(args.host, args.port, args.input_size, args.output_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
