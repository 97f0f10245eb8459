# SPDX-License-Identifier: GPL-2.0-only
"""The requests the sans-I/O core makes of whoever drives it.

The core never does I/O.  Code that needs the TPM is a generator that ``yield``s one of the
kinds below and is sent back the answer.  ``yield from`` composes them the way the kernel
composes function calls.  Drivers: :func:`run_sync` here (tests, tools) and the trio adapter
:class:`cusetpm.daemon.chip.TpmChip`.  Each driver dispatches with ``match`` and
``assert_never``, so mypy fails on a driver that forgets a kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, TypeVar, Union, assert_never

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Send:
    """Send one command; the answer is the response bytes or a negative errno.

    ``timeout`` is the kernel's duration for this ordinal, in seconds: a backend that has no
    answer by then gives ``-ETIME`` (tpm_try_transmit's "Operation Timed out").
    """

    data: bytes
    timeout: float


@dataclass(frozen=True, slots=True)
class Sleep:
    """Sleep holding the chip (the retry loop's back-off, msleep()); the answer is ``None``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Wait:
    """Give the chip up until ``event`` is signalled or ``timeout`` seconds pass.

    The answer is True when signalled, False on time-out.  The driver lets go of the chip
    lock while it waits and takes it again before answering, so other files' commands (the
    one that frees what the waiter wants among them) run meanwhile.  The kernel never waits
    like this; opt-in features do (see :class:`cusetpm.kernel.structs.Chip.signal`).
    """

    event: str
    timeout: float


Request = Union[Send, Sleep, Wait]
Reply = Union[bytes, int, bool, None]
#: A sans-I/O computation that talks to the TPM and finally returns a T.
Io = Generator[Request, Reply, T]


def run_sync(gen: Io[T], transport: Callable[[Send], bytes | int]) -> T:
    """Drive a core generator with a synchronous ``transport``.

    Sleeps are skipped and a Wait times out at once: with one caller and no other thread
    nobody could signal it.
    """
    reply: Reply = None
    while True:
        try:
            req = gen.send(reply)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        match req:
            case Send():
                reply = transport(req)
            case Sleep():
                reply = None
            case Wait():
                reply = False
            case _:
                assert_never(req)
