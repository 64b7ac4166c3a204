"""Bytes on the raw TCP port that are not HTTP/2 at all, or a preface and then garbage: the
server must close every such connection itself, and go on serving."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from tests.server.fuzz.common import TIMEOUT_S, Context

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class TcpTally:
    connections: int = 0
    closed_by_server: int = 0
    left_open: list[str] = field(default_factory=list)  # what was sent on those, in short


def garbage(ctx: Context) -> tuple[str, bytes]:
    """(what it is, the bytes); at least a preface's length, so the server need not wait."""
    data = os.urandom(ctx.rng.randint(24, 4096))
    choice = ctx.rng.random()
    if choice < 0.3:
        return f"the HTTP/2 preface, then {len(data)} random bytes", PREFACE + data
    if choice < 0.4:
        return "an HTTP/1.1 GET", b"GET / HTTP/1.1\r\nHost: lstm\r\n\r\n"
    return f"{len(data)} random bytes", data


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Read whatever the server answers until it closes the connection; False when it has not
    closed it within TIMEOUT_S."""
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def tcp_garbage(ctx: Context, tally: TcpTally) -> None:
    what, data = garbage(ctx)
    reader, writer = await asyncio.open_connection("127.0.0.1", ctx.port)
    tally.connections += 1
    try:
        writer.write(data)
        await writer.drain()
        closed = await closed_by_peer(reader)
    except ConnectionError:
        closed = True  # reset while we were still writing
    finally:
        writer.close()
    if closed:
        tally.closed_by_server += 1
    else:
        tally.left_open.append(what)
