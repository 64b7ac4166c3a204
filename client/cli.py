"""lstm-client: talk to a running lstm-serve from the command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstm_stream.v1 import inference_pb2 as pb

from client.errors import LstmStreamError
from client.sync import StreamingClient

DEFAULT_TARGET = "localhost:50051"


def _cmd_info(args: argparse.Namespace) -> int:
    with StreamingClient(args.target) as client:
        info = client.info()
    kind = pb.OutputKind.Name(info.output_kind).removeprefix("OUTPUT_KIND_").lower()
    print(f"model        {info.name} v{info.version} ({info.fingerprint[:12]})")
    print(
        f"sizes        input {info.input_size}, hidden {info.hidden_size} x "
        f"{info.num_layers} layers, output {info.output_size}"
    )
    print(f"output       {kind}" + (f": {', '.join(info.labels)}" if info.labels else ""))
    print(f"device       {info.device} {info.dtype}")
    print(
        f"limits       {info.max_chunk_steps} timesteps per message, "
        f"replay buffer {info.replay_steps} steps"
    )
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
        )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstm-client", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--target",
            default=os.environ.get("LSTM_CLIENT_TARGET", DEFAULT_TARGET),
            help=f"HOST:PORT of lstm-serve (env LSTM_CLIENT_TARGET, default {DEFAULT_TARGET})",
        )
        return p

    p = command("info", "what model the server runs")
    p.set_defaults(run=_cmd_info)
    p = command("health", "gRPC health check; exit 0 when SERVING")
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(run=_cmd_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LstmStreamError as exc:
        print(f"lstm-client: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"lstm-client: {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
