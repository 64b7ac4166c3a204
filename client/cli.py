"""lstm-client: talk to a running lstm-serve from the command line.

Subcommands: info (the model, and every model the server holds), health, stream (CSV in, CSV
out), demo (the bundled held-out recordings), bench (a load generator). Each takes --target
HOST:PORT (env LSTM_CLIENT_TARGET); info, stream, demo and bench take --model NAME and
--model-version N.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_stream.client.errors import LstmStreamError, UsageError
from lstm_stream.client.options import ClientOptions, lacks_port
from lstm_stream.client.sync import StreamingClient, StreamSession
from lstm_stream.v1 import inference_pb2 as pb

DEFAULT_TARGET = "localhost:50051"


def options_from(args: argparse.Namespace) -> ClientOptions:
    if lacks_port(args.target):
        # gRPC alone would dial port 443 and wait out the deadline without a word.
        raise UsageError(
            f"--target {args.target!r}: expected HOST:PORT, got no port (gRPC would dial 443; "
            f"lstm-serve's default is 50051: --target {args.target.rstrip(':')}:50051)"
        )
    return ClientOptions(
        target=args.target,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=args.token or os.environ.get("LSTM_CLIENT_TOKEN"),
        deadline_s=args.deadline,
    )


# info, health


def _cmd_info(args: argparse.Namespace) -> int:
    with StreamingClient(options=options_from(args)) as client:
        info = client.info(args.model, args.model_version)
        models = _list_models(client)
    _print_info(info)
    if models is not None:
        print("\n".join(format_models(models)))
    return 0


def _list_models(client: StreamingClient) -> pb.ListModelsResponse | None:
    """The server's models, or None from a server older than ListModels."""
    try:
        return client.list_models()
    except LstmStreamError as err:
        if err.code == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise


def format_models(models: pb.ListModelsResponse) -> list[str]:
    """One line per model version: name, version, state, live sessions; '*' marks the
    default model."""
    rows = [
        (
            "*" if model.name == models.default_model else " ",
            model.name,
            f"v{version.version}",
            pb.ModelVersionState.Name(version.state).removeprefix("MODEL_VERSION_STATE_"),
            f"{version.sessions} session{'' if version.sessions == 1 else 's'}",
            version.error,
        )
        for model in models.models
        for version in model.versions
    ]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(5)]
    lines = ["models       (* the default)"]
    for row in rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True))
        lines.append(f"  {line}  {row[5]}".rstrip())
    return lines


def _print_info(info: pb.GetModelInfoResponse) -> None:
    kind = pb.OutputKind.Name(info.output_kind).removeprefix("OUTPUT_KIND_").lower()
    labels = f": {', '.join(info.labels)}" if info.labels else ""
    print(f"model        {info.name} v{info.version} ({info.fingerprint[:12]})")
    print(
        f"sizes        input {info.input_size}, hidden {info.hidden_size} x "
        f"{info.num_layers} layers, output {info.output_size}"
    )
    print(f"output       {kind}{labels}")
    print(f"device       {info.device} {info.dtype}")
    print(
        f"limits       {info.max_chunk_steps} timesteps per message, "
        f"replay buffer {info.replay_steps} steps"
    )


def _cmd_health(args: argparse.Namespace) -> int:
    options = options_from(args)
    with StreamingClient(options=options) as client:
        stub = health_pb2_grpc.HealthStub(client._channel)
        response = stub.Check(
            health_pb2.HealthCheckRequest(service=args.service),
            timeout=args.deadline,
            metadata=options.metadata(),
        )
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


# stream


def read_csv_rows(source: TextIO, width: int) -> Iterator[np.ndarray]:
    """One (width,) row per CSV line; blank lines and '#' comments are skipped, and so is a
    header: a first row with no number in it (column names)."""
    first = True
    for number, line in enumerate(csv.reader(source), start=1):
        if not line or line[0].lstrip().startswith("#"):
            continue
        if len(line) != width:
            raise UsageError(f"line {number}: {_width_problem(line, width, first)}")
        if first and _is_header(line):
            first = False
            continue
        first = False
        try:
            yield np.array([float(v) for v in line], dtype=np.float32)
        except ValueError:
            raise UsageError(f"line {number}: expected numbers, got {','.join(line)!r}") from None


# What a CSV written elsewhere may separate its values with instead of commas.
OTHER_DELIMITERS = {";": "';'", "\t": "tabs", "|": "'|'", " ": "spaces"}


def _width_problem(fields: list[str], width: int, first: bool) -> str:
    """What is wrong with a row of `len(fields) != width` fields: expected and got."""
    text = ",".join(fields)
    for delimiter, name in OTHER_DELIMITERS.items():
        if delimiter == " " and len(fields) > 1:
            continue  # '1, 2, 3': commas, with spaces after them
        values = text.split() if delimiter == " " else text.split(delimiter)
        if len(values) > 1:
            decimal = [v.replace(",", ".") for v in values]
            what = "column names" if first and _is_header(decimal) else "numbers"
            return (
                f"expected {width} comma-separated {what} (the model's input_size), got "
                f"{len(values)} separated by {name}"
            )
    what = "column names" if first and _is_header(fields) else "numbers"
    return f"expected {width} {what} (the model's input_size), got {len(fields)}"


def _is_header(fields: list[str]) -> bool:
    def is_number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    return not any(is_number(f) for f in fields)


def chunked(rows: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    chunk: list[np.ndarray] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)


def _cmd_stream(args: argparse.Namespace) -> int:
    if args.chunk < 1:
        raise UsageError(f"--chunk: expected a positive number of timesteps, got {args.chunk}")
    source = sys.stdin if args.file == "-" else _open_input(args.file)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    with StreamingClient(options=options_from(args)) as client:
        # An existing session keeps its own model; a new one is made on --model.
        attached = _attach(client, args) if args.session else None
        width = (attached or client.info(args.model, args.model_version)).input_size
        # The first row is read (and a bad one refused) before a session is made for it.
        rows = read_csv_rows(source, width)
        first = next(rows, None)
        rows = itertools.chain([] if first is None else [first], rows)
        session = attached or client.open_session(
            model=args.model, model_version=args.model_version
        )
        where = f" on {session.model} v{session.model_version}" if session.model else ""
        print(f"session {session.session_id} from step {session.next_step}{where}", file=sys.stderr)
        chunks = chunked(rows, args.chunk)
        start, printed = session.next_step, 0
        # The block's end ends the session, after an error too (a bad row, Ctrl-C), unless
        # --keep asked to keep it.
        with session:
            try:
                for outputs in session.stream(chunks, window=1):
                    writer.writerows([f"{v:.{args.precision}g}" for v in row] for row in outputs)
                    sys.stdout.flush()
                    printed += len(outputs)
            except BaseException as exc:
                if args.keep and not _session_gone(exc):
                    # The chunk in flight when it stopped (Ctrl-C) may have been applied: the
                    # server's step says, not the rows printed.
                    step = _next_step(client, session, start + printed)
                    _keep(session, step, f" after {printed} rows of this input")
                raise
            if args.keep:
                _keep(session, start + printed)
    return 0


def _next_step(client: StreamingClient, session: StreamSession, printed: int) -> int:
    """The kept session's next step as the server has it (`printed` if it cannot say)."""
    session.detach()
    try:
        return client.get_session(session.session_id).next_step
    except LstmStreamError:
        return printed


def _keep(session: StreamSession, step: int, after: str = "") -> None:
    session.detach()
    print(
        # --session=ID: ids may begin with '-', which argparse reads as a flag.
        f"session {session.session_id} kept at step {step}{after}; resume with "
        f"--session={session.session_id}",
        file=sys.stderr,
    )


def _session_gone(exc: BaseException) -> bool:
    """Whether an error says the session is no longer this command's to keep."""
    return isinstance(exc, LstmStreamError) and exc.reason in (
        "SESSION_NOT_FOUND",
        "SESSION_TAKEN_OVER",
    )


def _attach(client: StreamingClient, args: argparse.Namespace) -> StreamSession:
    session = client.attach(args.session)
    asked = (args.model, args.model_version or session.model_version)
    if args.model and session.model and asked != (session.model, session.model_version):
        version = f" v{args.model_version}" if args.model_version else ""
        raise UsageError(
            f"--session {args.session} lives on {session.model} v{session.model_version}, "
            f"not on {args.model}{version} (--model)"
        )
    return session


def _open_input(path: str) -> TextIO:
    try:
        return open(path, newline="")
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None


# demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from lstm_stream.client.demo import run_demo

    print(run_demo(options_from(args), args.concurrency, args.model, args.model_version))
    return 0


# bench


def _cmd_bench(args: argparse.Namespace) -> int:
    from lstm_stream.client.batch_loadgen import run_batch_load
    from lstm_stream.client.loadgen import run_load

    if args.sessions < 1 or args.chunk < 1 or args.duration <= 0:
        raise UsageError("--sessions and --chunk must be >= 1 and --duration > 0")
    if args.sessions_per_message < 0 or args.window < 1:
        raise UsageError(
            f"--sessions-per-message must be >= 0 and --window >= 1, got "
            f"{args.sessions_per_message} and {args.window}"
        )
    options = options_from(args)
    if args.sessions_per_message:
        run = run_batch_load(
            options,
            args.sessions,
            args.sessions_per_message,
            args.chunk,
            args.duration,
            args.window,
            model=args.model,
            model_version=args.model_version,
        )
    else:
        run = run_load(
            options,
            args.sessions,
            args.chunk,
            args.duration,
            packed=args.packed,
            model=args.model,
            model_version=args.model_version,
        )
    result = asyncio.run(run)
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        shape = (
            f"{result.sessions_per_message} sessions a StreamBatches message, "
            if result.sessions_per_message
            else ""
        )
        print(
            f"{result.sessions} sessions x {result.chunk_steps}-step chunks, {shape}for "
            f"{result.duration_s:.1f} s: {result.timesteps_per_s:,.0f} timesteps/s; latency "
            f"p50 {result.latency_p50_s * 1e3:.2f} ms, p95 {result.latency_p95_s * 1e3:.2f} ms,"
            f" p99 {result.latency_p99_s * 1e3:.2f} ms; {result.errors} errors"
        )
    return 0 if result.errors == 0 else 1


def _version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a version number (0: the newest), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--target",
            default=os.environ.get("LSTM_CLIENT_TARGET", DEFAULT_TARGET),
            help=f"HOST:PORT (env LSTM_CLIENT_TARGET; default {DEFAULT_TARGET})",
        )
        p.add_argument("--tls", action="store_true", help="TLS with the system's trusted CAs")
        p.add_argument("--tls-ca", help="PEM file of the CA to trust")
        p.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
        p.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
        p.add_argument("--token", help="bearer token (env LSTM_CLIENT_TOKEN)")
        p.add_argument("--deadline", type=float, default=10.0, help="seconds per call/answer")
        return p

    def model_arguments(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--model", default="", help=f"{what} (default: the server's default)")
        p.add_argument(
            "--model-version",
            type=_version,
            default=0,
            help="that model's version (default 0: its newest ready version)",
        )

    p = command("info", "what model the server runs, and every model it holds")
    model_arguments(p, "the model to describe")
    p.set_defaults(run=_cmd_info)

    p = command("health", "gRPC health check; exit 0 when SERVING")
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.set_defaults(run=_cmd_health)

    p = command(
        "stream",
        "stream CSV timesteps (a file or stdin); print one CSV row of outputs per timestep",
    )
    p.add_argument(
        "file",
        nargs="?",
        default="-",
        help="CSV file, '-' for stdin (default): input_size numbers a row; a first row of "
        "column names is skipped, and so are blank lines and '#' comments",
    )
    p.add_argument("--session", help="resume this session from its next step")
    p.add_argument("--chunk", type=int, default=1, help="timesteps per message (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the session open at the end")
    p.add_argument("--precision", type=int, default=8, help="significant digits printed")
    model_arguments(p, "the model a new session runs on")
    p.set_defaults(run=_cmd_stream)

    p = command("demo", "stream the bundled held-out recordings; accuracy and latency")
    p.add_argument("--concurrency", type=int, default=8, help="recordings streamed at once")
    model_arguments(p, "the model to stream through (a basic-motions one)")
    p.set_defaults(run=_cmd_demo)

    p = command("bench", "load generator: N concurrent sessions, closed loop")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--chunk", type=int, default=1, help="timesteps per message")
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument(
        "--sessions-per-message",
        type=int,
        default=0,
        help="feed the sessions by StreamBatches, N sessions' chunks a message (default 0: "
        "one StreamSteps stream per session)",
    )
    p.add_argument(
        "--window", type=int, default=4, help="batch messages in flight per stream (default 4)"
    )
    p.add_argument(
        "--packed", action="store_true", help="StreamSteps with packed inputs and outputs"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    model_arguments(p, "the model the sessions run on")
    p.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"lstm-client: {exc}", file=sys.stderr)
        _print_notes(exc)
        return 2
    except LstmStreamError as exc:
        print(f"lstm-client: {args.target}: {exc}", file=sys.stderr)
        _print_notes(exc)
        return 1
    except grpc.RpcError as exc:
        print(f"lstm-client: {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _print_notes(exc: BaseException) -> None:
    """What was added to an error on its way (a session that could not be ended)."""
    for note in getattr(exc, "__notes__", ()):
        print(f"lstm-client: {note}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
