"""A gateway: interleaved device readings in, one batch call per flush out.

Reads CSV lines `device_id,t,value1,...,valueN` (N = the model's input_size) from a file or
stdin, as an MQTT bridge or a Kafka consumer would receive them: devices interleaved, each
device's readings in order. Every `--flush` lines, the readings gathered so far become one
batch (each device's readings one chunk of its session, the session named after the device)
and go to the server over StreamBatches, a few batches in flight. Prints
`device_id,t,output1,...` for every reading, in the order the readings arrived.

    python examples/gateway/gateway.py readings.csv --target localhost:50051
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Iterator

import numpy as np

from lstm_stream.client import ClientOptions, LstmStreamError, StreamingClient

Reading = tuple[str, str, list[float]]  # device id, its timestamp as given, values


def readings(lines: Iterable[str], input_size: int) -> Iterator[Reading]:
    for number, row in enumerate(csv.reader(lines), start=1):
        if not row or row[0].startswith("#"):
            continue
        if len(row) != 2 + input_size:
            raise SystemExit(
                f"line {number}: expected device_id,t and {input_size} values, "
                f"got {len(row)} fields"
            )
        yield row[0], row[1], [float(v) for v in row[2:]]


def flushes(source: Iterator[Reading], size: int) -> Iterator[list[Reading]]:
    batch: list[Reading] = []
    for reading in source:
        batch.append(reading)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def as_batch(flush: list[Reading]) -> dict[str, np.ndarray]:
    """Each device's readings of this flush, in order: its session's next chunk."""
    rows: dict[str, list[list[float]]] = {}
    for device, _, values in flush:
        rows.setdefault(device, []).append(values)
    return {device: np.asarray(r, dtype=np.float32) for device, r in rows.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?", default="-", help="CSV of readings ('-': stdin)")
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--flush", type=int, default=1000, help="readings per batch")
    parser.add_argument("--window", type=int, default=4, help="batches in flight")
    parser.add_argument("--partitions", type=int, default=0, help="behind the balancer: 64")
    args = parser.parse_args(argv)
    lines = sys.stdin if args.file == "-" else open(args.file, newline="")  # noqa: SIM115
    out = csv.writer(sys.stdout, lineterminator="\n")
    options = ClientOptions(target=args.target, partitions=args.partitions)
    with StreamingClient(options=options) as client:
        source = flushes(readings(lines, client.info().input_size), args.flush)
        pending: list[list[Reading]] = []

        def batches() -> Iterator[dict[str, np.ndarray]]:
            for flush in source:
                pending.append(flush)
                yield as_batch(flush)

        for result in client.stream_batches(batches(), window=args.window):
            flush = pending.pop(0)
            taken: dict[str, int] = {}
            for device, t, _ in flush:
                row = taken.get(device, 0)
                taken[device] = row + 1
                try:
                    outputs = result[device][row]
                except LstmStreamError as err:  # this device's chunk was refused; rest go on
                    print(f"{device},{t}: {err}", file=sys.stderr)
                    continue
                out.writerow([device, t, *(f"{v:.6g}" for v in outputs)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
