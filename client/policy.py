"""What the sync and asyncio clients decide alike: when to repeat a call, how long to back off,
when to give up. Pure: neither waits nor does I/O; each client waits its own way."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from lstm_stream.client.errors import BadInputError, LstmStreamError
from lstm_stream.client.options import IDEMPOTENT, ClientOptions, is_retryable

ArrayLike = np.ndarray | Sequence[Any]


def as_rows(chunk: ArrayLike, width: int) -> np.ndarray:
    """A chunk as (num_steps, width) float32; a flat sequence is read row by row."""
    try:
        rows = np.asarray(chunk, dtype=np.float32)
    except ValueError as err:  # ragged rows, or not numbers
        raise BadInputError(
            f"inputs: expected numbers in rows of input_size={width}, got {err}"
        ) from None
    if rows.size == 0:
        return np.zeros((0, width), dtype=np.float32)
    if rows.ndim <= 1:
        if rows.size % width:
            raise BadInputError(
                f"inputs: expected a multiple of input_size={width} values "
                f"(num_steps * input_size), got {rows.size}"
            )
        return rows.reshape(-1, width)
    if rows.ndim != 2 or rows.shape[1] != width:
        raise BadInputError(
            f"inputs: expected shape (num_steps, input_size={width}), got {rows.shape}"
        )
    return rows


def new_session_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits


class UnaryRetry:
    """One unary call: idempotent methods are repeated after a retryable failure, with
    backoff, and all attempts together stay within the client's deadline."""

    def __init__(self, options: ClientOptions, method: str) -> None:
        self._options = options
        self._retryable_method = method in IDEMPOTENT
        deadline = options.deadline_s
        self._give_up_at = None if deadline is None else time.monotonic() + deadline
        self.attempt = 0

    def timeout(self) -> float | None:
        """The next attempt's deadline: what is left of the call's."""
        self.attempt += 1
        if self._give_up_at is None:
            return None
        return max(self._give_up_at - time.monotonic(), 0.0)

    def backoff_after(self, err: LstmStreamError) -> float | None:
        """Seconds to wait before the next attempt, or None: raise `err`."""
        if not self._retryable_method or not is_retryable(err.code, err.reason):
            return None
        if self.attempt > self._options.max_retries:
            return None
        wait = self._options.backoff(self.attempt)
        if self._give_up_at is not None and time.monotonic() + wait >= self._give_up_at:
            return None
        return wait

    def final(self, err: LstmStreamError) -> LstmStreamError:
        """The error to raise: a deadline says it covered every attempt."""
        if err.code != grpc.StatusCode.DEADLINE_EXCEEDED or err.reason:
            return err
        return LstmStreamError(
            err.code,
            f"no answer within {self._options.deadline_s} s, retries included (is the server up?): "
            f"{err.details}",
        )


class StreamRetry:
    """A session's stream: reopened after a retryable failure or a rewind, at most
    `max_retries` times in a row for one answer."""

    def __init__(self, options: ClientOptions) -> None:
        self._options = options
        self.attempt = 0

    def backoff_after(self, err: LstmStreamError, rewound: bool) -> float | None:
        """Seconds to wait before reopening (0 after a rewind, which is no failure to wait
        out), or None: give up and raise `err`."""
        if not (rewound or is_retryable(err.code, err.reason)):
            return None
        if self.attempt >= self._options.max_retries:
            return None
        self.attempt += 1
        return 0.0 if rewound else self._options.backoff(self.attempt)
