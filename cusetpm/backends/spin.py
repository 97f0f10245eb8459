# SPDX-License-Identifier: GPL-2.0-only
"""Waiting for a socket TPM's answer by polling it briefly, instead of sleeping in trio's epoll.

A swtpm answers most commands in 10 to 30 µs.  Sleeping for the answer costs more than that on
our request path: trio registers the socket with epoll, parks the task, polls, and runs it
again, a few system calls, a scheduler round and a wake-up each time, four times a command in
kernel mode (ContextLoad, the command, ContextSave, FlushContext).  So after sending a command
the socket backends (:mod:`.socket`, :mod:`.mssim`) first poll the socket for up to
``seconds`` (``serve --spin-us``, the request loop's spin) with 0-timeout ``poll()`` calls, and
only then wait in trio.

Between two polls the spin yields the CPU (``sched_yield``).  A send on a Unix socket wakes
swtpm as a "sync" wake-up, which tells the scheduler the sender is about to sleep, so swtpm is
often queued on the sender's own CPU (with ``--cpu`` always): without the yield it would wait
for the spin to end (a Sign went from 611-698 to 580-770 µs; with the yield 558-591).

It spins only for a client that has the TPM to itself (``alone``: the chip's command is its
file's second in a row, and no other command waits).  Under load the answer is no quicker to
pick up than the next request, and a yield would hand the daemon's CPU to one of many client
processes for a time slice; then it returns at once and the command waits in trio, as before.

The spin blocks the event loop, so it also watches the front ends' channels (``/dev/fuse``,
``/dev/cuse``).  A request there in the first :data:`ALONE_GRACE` may wait: for a client alone
it is its own poll, sent as soon as its write was answered, which the loop answers at once
once the response is in.  After that, a request ends the spin, and the loop serves it while
the answer comes in the usual way.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable

#: How long a spin lets a channel's request wait.
ALONE_GRACE = 50e-6
#: The longest a spin for one answer may last: a command whose answer took longer than this
#: last time is not spun for at all (its answer is not worth the CPU).
SPIN_CAP = 2e-3


class SpinWait:
    """Polls a backend socket for up to ``seconds`` while no channel has a request."""

    def __init__(self, seconds: float, alone: Callable[[], bool] | None = None) -> None:
        self.seconds = seconds
        #: True while one client has the TPM to itself (the chip's ``alone``); None: always.
        self.alone = alone
        #: The channels whose requests end a spin.
        self.channels: set[int] = set()
        self._poller: select.poll | None = None
        self._fd = -1
        #: How long each command code's answer took last time, in seconds (:meth:`budget`).
        self.took: dict[int, float] = {}
        #: When the answer a client alone waits for in trio is expected, at the latest
        #: (perf_counter; 0: none): :meth:`spin_until`.
        self._expected = 0.0

    def budget(self, cc: int) -> float:
        """How long to spin for the answer to a command with code ``cc``: ``seconds``, or
        longer for one whose answer took longer last time (1.25 times that, and 20 µs),
        up to :data:`SPIN_CAP`; 0 for one whose answer took longer than that.  A Sign takes
        swtpm about 300 µs: waiting for it in trio after a 100 µs spin cost about 80 µs more."""
        last = self.took.get(cc)
        if last is None:
            return self.seconds
        want = 1.25 * last + 20e-6
        if want <= self.seconds:
            return self.seconds
        return want if want <= max(SPIN_CAP, self.seconds) else 0.0

    def answered(self, cc: int, took: float) -> None:
        """The answer to a command with code ``cc`` came ``took`` seconds after it was sent."""
        self.took[cc] = took
        self._expected = 0.0

    def awaiting(self, cc: int, sent_at: float) -> None:
        """The answer to a command with code ``cc``, sent at ``sent_at``, did not come within
        the spin (a channel's request ended it, or the budget ran out): it is waited for in
        trio, and expected by ``sent_at`` plus its :meth:`budget` (none: 0)."""
        budget = self.budget(cc)
        self._expected = sent_at + budget if budget > 0 else 0.0

    def spin_until(self) -> float:
        """Until when the request loop should keep spinning (perf_counter), though no request
        comes: the answer a client alone waits for is due by then.  Sleeping in epoll
        meanwhile costs the wake-up when it comes: a Sign took about 80 µs more that way."""
        return self._expected if self._expected and self.may_wait() else 0.0

    def watch(self, fd: int) -> None:
        """A front end's channel, serving from now on."""
        self.channels.add(fd)
        self._poller = None

    def forget(self, fd: int) -> None:
        """The channel is closing (its number may be reused)."""
        self.channels.discard(fd)
        self._poller = None

    def may_wait(self) -> bool:
        """May the loop wait for the TPM's answer now?  Spinning is on and the client is alone."""
        return self.seconds > 0 and (self.alone is None or self.alone())

    def ready(self, fd: int, seconds: float | None = None) -> bool:
        """True once ``fd`` is readable; False at once unless ``alone``, and when ``seconds``
        (the spin's own if None; :meth:`budget`) ran out first or a channel has a request
        (then the caller waits in trio as usual)."""
        if seconds is None:
            seconds = self.seconds
        if seconds <= 0 or not self.may_wait():
            return False
        poller = self._poller
        if poller is None or self._fd != fd:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            for channel in self.channels:
                poller.register(channel, select.POLLIN)
            self._poller, self._fd = poller, fd
        clock = time.perf_counter
        start = clock()
        end, deaf = start + seconds, start + ALONE_GRACE
        while True:
            events = poller.poll(0)
            if events:
                if any(ready == fd for ready, _ in events):
                    return True
                if clock() >= deaf:
                    return False
            elif clock() >= end:
                return False
            os.sched_yield()  # a swtpm woken on our CPU runs now, not after the spin
