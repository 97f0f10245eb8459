# SPDX-License-Identifier: GPL-2.0-only
"""A fake device for testing the CUSE front end: each open file echoes what was written.

It has the shape of /dev/tpmrm0 without a TPM: one write, then one read returns it
(EBUSY for a second write before the read, EAGAIN for a non-blocking read with
nothing ready).  A few magic writes let a test look inside:

* ``delay:<seconds>:<data>`` -- the response is ready only after that long, so a
  read blocks and a poll has to be woken by a FUSE_NOTIFY_POLL;
* ``nonblock?`` -- the response says whether that write() saw O_NONBLOCK;
* ``stats`` -- the response counts opens, releases, interrupted reads and reads
  waiting right now.

Run as a script it serves ``/dev/<name>`` and prints ``READY`` once the node can
be opened; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import math
import os
import select
import signal
import sys
from collections.abc import Callable

import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cusetpm.daemon.node import Opener  # noqa: E402
from cusetpm.frontends.cuse import serve_cuse  # noqa: E402


class EchoDevice:
    """Makes :class:`EchoFile` objects and keeps counters a test can ask for."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.opens = 0
        self.releases = 0
        self.cancelled_reads = 0
        self.blocked_reads = 0  # reads waiting right now
        self.open_flags: list[int] = []
        self.openers: list[Opener] = []

    def open(self, flags: int, opener: Opener) -> EchoFile:
        self.opens += 1
        self.open_flags.append(flags)
        self.openers.append(opener)
        return EchoFile(self)

    def stats(self) -> bytes:
        return (
            f"opens={self.opens} releases={self.releases} "
            f"cancelled_reads={self.cancelled_reads} blocked_reads={self.blocked_reads}"
        ).encode()


class EchoFile:
    """One open file: at most one pending response, like tpmrm's per-file buffer."""

    def __init__(self, device: EchoDevice) -> None:
        self.device = device
        self.pending: bytes | None = None
        self.ready_at = 0.0
        self.changed = trio.Event()
        self.wakers: list[Callable[[], None]] = []
        self.released = False

    def _ready(self) -> bool:
        return self.pending is not None and trio.current_time() >= self.ready_at

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        wakers, self.wakers = self.wakers, []
        for wake in wakers:
            wake()

    async def _notify_at(self, when: float) -> None:
        await trio.sleep_until(when)
        self._notify()

    async def write(self, data: bytes, nonblock: bool) -> int:
        if self.pending is not None:
            raise OSError(errno.EBUSY, "response not read yet")
        accepted = len(data)
        delay = 0.0
        if data == b"stats":
            data = self.device.stats()
        elif data == b"nonblock?":
            data = b"nonblock=%d" % nonblock
        elif data.startswith(b"delay:"):
            _, secs, data = data.split(b":", 2)
            delay = float(secs)
        self.pending = data
        self.ready_at = trio.current_time() + delay
        if delay:
            self.device.nursery.start_soon(self._notify_at, self.ready_at)
        self._notify()
        return accepted

    async def read(self, size: int, nonblock: bool) -> bytes:
        while not self._ready():
            if nonblock:
                raise OSError(errno.EAGAIN, "no response ready")
            deadline = self.ready_at if self.pending is not None else math.inf
            self.device.blocked_reads += 1
            try:
                with trio.move_on_at(deadline):
                    await self.changed.wait()
            except trio.Cancelled:
                self.device.cancelled_reads += 1
                raise
            finally:
                self.device.blocked_reads -= 1
        assert self.pending is not None
        data, self.pending = self.pending[:size], None
        self._notify()
        return data

    async def poll(self, wake: Callable[[], None] | None) -> int:
        if wake is not None:
            self.wakers.append(wake)
        mask = 0
        if self._ready():
            mask |= select.POLLIN | select.POLLRDNORM
        if self.pending is None:
            mask |= select.POLLOUT | select.POLLWRNORM
        return mask

    async def release(self) -> None:
        self.released = True
        self.wakers.clear()
        self.device.releases += 1


async def main(name: str, mode: int | None, major: int, minor: int) -> None:
    async with trio.open_nursery() as nursery:
        device = EchoDevice(nursery)
        await nursery.start(functools.partial(serve_cuse, device, name, mode=mode, major=major, minor=minor))
        print("READY", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--mode", type=lambda s: int(s, 8), default=None)
    ap.add_argument("--major", type=int, default=0)
    ap.add_argument("--minor", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="echo-server: %(levelname)s %(message)s")
    trio.run(main, args.name, args.mode, args.major, args.minor)
