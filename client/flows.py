"""The client's logic, written once for the sync and the asyncio surfaces (sans-IO).

A flow is a generator that yields what it needs done and is sent back what came of it:

    response = yield Call(stream.read, deadline_s)   # a call to make: its result, or its error
    yield Sleep(wait)                                # a backoff
    yield Output(outputs)                            # a value handed to the caller mid-way

It never waits itself. The sync surface drives it with `run` / `outputs` (a Call is made, a
Sleep slept), the asyncio surface with `arun` / `aoutputs` (what a Call returns is awaited),
so the logic behind both clients is the same code. A flow run for its value hands nothing out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
Flow = Generator[Any, Any, T]  # yields Call | Sleep | Output, returns T
Outcome = tuple[Any, Exception | None]  # what an effect returned, or what it raised


class Call:
    """Call `fn(*args, **kwargs)`: the sync surface blocks on it, the asyncio surface awaits
    what it returns."""

    __slots__ = ("args", "fn", "kwargs")

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __call__(self) -> Any:
        return self.fn(*self.args, **self.kwargs)


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Output:
    """A value for the caller of a flow that hands out many (a stream's outputs, one by one)."""

    value: Any


def resume(flow: Flow[Any], outcome: Outcome = (None, None)) -> tuple[bool, Any]:
    """Send `flow` what came of its last effect: (False, its next effect), or (True, its value)
    once it has returned."""
    result, error = outcome
    try:
        return False, flow.send(result) if error is None else flow.throw(error)
    except StopIteration as done:
        return True, done.value


def perform(effect: Call | Sleep) -> Outcome:
    try:
        return (time.sleep(effect.seconds) if isinstance(effect, Sleep) else effect()), None
    except Exception as err:  # the flow decides what an error means
        return None, err


async def aperform(effect: Call | Sleep) -> Outcome:
    try:
        if isinstance(effect, Sleep):
            return await asyncio.sleep(effect.seconds), None
        return await effect(), None
    except Exception as err:  # the flow decides what an error means
        return None, err


def run(flow: Flow[T]) -> T:
    """Drive a flow synchronously (blocking on each call): its value."""
    with closing(flow):
        done, effect = resume(flow)
        while not done:
            done, effect = resume(flow, perform(effect))
        return effect


async def arun(flow: Flow[T]) -> T:
    """Drive a flow in asyncio (awaiting each call): its value."""
    with closing(flow):
        done, effect = resume(flow)
        while not done:
            done, effect = resume(flow, await aperform(effect))
        return effect


def outputs(flow: Flow[Any]) -> Iterator[Any]:
    """Drive a flow synchronously: what it hands out, one by one."""
    with closing(flow):
        while (value := run(_until_output(flow))) is not _END:
            yield value


async def aoutputs(flow: Flow[Any]) -> AsyncIterator[Any]:
    """Drive a flow in asyncio: what it hands out, one by one."""
    with closing(flow):
        while (value := await arun(_until_output(flow))) is not _END:
            yield value


_END = object()


def _until_output(flow: Flow[Any]) -> Flow[Any]:
    """A flow that goes on with `flow` up to the next value it hands out, and returns that
    value (or _END once `flow` has returned)."""
    done, effect = resume(flow)
    while not done:
        if isinstance(effect, Output):
            return effect.value
        try:
            outcome: Outcome = ((yield effect), None)
        except Exception as err:
            outcome = (None, err)
        done, effect = resume(flow, outcome)
    return _END
