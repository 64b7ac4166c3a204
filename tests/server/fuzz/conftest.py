"""One fuzz campaign for the whole package: its tests each check one part of the Report."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from lstm_model import load_model
from tests.factories import ServeProcess, free_port
from tests.server.fuzz.campaign import Report, run
from tests.server.fuzz.common import MAX_MESSAGE_BYTES, REPLAY_STEPS


@pytest.fixture(scope="package")
def campaign() -> Report:
    metrics_port = free_port()
    args = ["--replay-steps", str(REPLAY_STEPS), "--metrics-port", str(metrics_port)]
    with ServeProcess(*args, "--max-message-bytes", str(MAX_MESSAGE_BYTES)) as proc:
        report = asyncio.run(run(proc, metrics_port, load_model().model))
        report.alive = proc.process.poll() is None
        try:
            report.exit_code, report.log = proc.finish(timeout=10 if report.broken else 30)
        except subprocess.TimeoutExpired:
            report.exit_code, report.log = "no exit after SIGTERM", "".join(proc.log)
    print(summary(report))
    return report


def summary(report: Report) -> str:
    ledger, valid = report.ledger, report.valid
    return (
        f"\nfuzz: {sum(ledger.messages.values())} hostile messages, {sum(ledger.bad.values())} "
        f"to be refused; valid: {sum(s.messages for s in valid)} messages, "
        f"{sum(s.next_step for s in valid)} timesteps, {sum(s.refused for s in valid)} refused "
        f"on purpose; tcp garbage: {report.tcp.closed_by_server}/{report.tcp.connections} closed "
        f"by the server; slow reader: {report.slow_reader}; live sessions "
        f"{report.sessions_active} (expected {report.sessions_expected}); VmRSS (MB): "
        + ", ".join(f"{k} {v:.0f}" for k, v in report.rss_mb.items())
    )
