# SPDX-License-Identifier: GPL-2.0-only
"""The guest figure's Python floor: the least a CUSE daemon written in Python costs.

A CUSE device on the kernel's own /dev/tpmrm0, as :data:`.bench_guest.C_CUSE_RELAY` is in C:
every open of it opens /dev/tpmrm0, a write() writes the command there (the kernel runs it in
that write) and reads the response, which read() hands out.  One thread blocking in read() on
/dev/cuse, no trio, no resource manager of its own, on cusetpm's protocol layer
(:mod:`cusetpm.frontends.cuse_proto`).  What the node costs beyond it is the node's own work
(its resource manager, its event loop); what it costs beyond the C relay is Python's.

``python -m cusetpm.testing.py_cuse_relay [--trio SPIN_US] DEVNAME TPM_PATH`` serves
/dev/DEVNAME in the foreground until /dev/cuse goes away or SIGTERM ends it (exit status 0; the
bench's guest side starts it).  With ``--trio`` the same relay runs on a trio loop shaped like
the node's request loop (:mod:`cusetpm.frontends.channel`: /dev/cuse O_NONBLOCK, polled for
SPIN_US µs after the last request with a trio checkpoint a round, then trio's epoll): the bench
prints both, so what trio's loop costs a Python CUSE daemon is told apart from the node's own
work.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import sys
import time

from ..frontends import cuse_proto as proto
from ..kernel.wire import TPM_BUFSIZE

#: poll()'s answer with a response pending, and without: a TPM file is always writable.
READY = select.POLLIN | select.POLLRDNORM | select.POLLOUT | select.POLLWRNORM
WRITABLE = select.POLLOUT | select.POLLWRNORM


class Relay:
    """The relay's files: a request's bytes in, its reply's bytes out (None: no reply)."""

    def __init__(self, target: str) -> None:
        self.target = target
        #: fh -> the target's file, and the response it has pending for read().
        self.files: dict[int, int] = {}
        self.pending: dict[int, bytes] = {}
        self.next_fh = 1

    def handle(self, buf: bytes) -> bytes | None:
        """Answer one request, as the C relay does; the target's errors become errnos."""
        hot = proto.parse_read_or_poll(buf)
        if hot is not None:
            opcode, unique, fh, size, _ = hot
            if opcode == proto.OP_READ:
                data = self.pending.pop(fh, b"")
                if len(data) > size:  # handed out in parts, as the C relay does
                    self.pending[fh] = data[size:]
                return proto.reply_read(unique, data[:size])
            return proto.reply_poll(unique, READY if fh in self.pending else WRITABLE)
        req = proto.parse_request(buf)
        try:
            if isinstance(req, proto.Open):
                self.files[self.next_fh] = os.open(self.target, os.O_RDWR | os.O_CLOEXEC)
                self.next_fh += 1
                return proto.reply_open(req.unique, self.next_fh - 1)
            if isinstance(req, proto.Write):
                fd = self.files[req.fh]
                os.write(fd, req.data)  # the kernel's tpmrm runs the command in this write
                self.pending[req.fh] = os.read(fd, TPM_BUFSIZE)
                return proto.reply_write(req.unique, len(req.data))
            if isinstance(req, proto.Release):
                self.pending.pop(req.fh, None)
                fd = self.files.pop(req.fh, -1)
                if fd >= 0:
                    os.close(fd)
                return proto.reply(req.unique)
        except OSError as exc:
            return proto.reply_error(req.unique, exc.errno or errno.EIO)
        return proto.default_reply(req)


def serve(devname: str, target: str, trio_spin: float | None = None) -> None:
    """Serve /dev/``devname`` on /dev/cuse until the channel goes away; ``trio_spin``: on
    trio, spinning that many seconds (None: one thread blocking in read())."""
    proto.check_devname(devname)
    fd = os.open("/dev/cuse", os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if trio_spin is not None else 0))
    try:
        if trio_spin is None:
            relay_loop(fd, devname, target)
        else:
            import trio

            trio.run(_serve_trio, fd, devname, target, trio_spin)
    finally:
        os.close(fd)


async def _serve_trio(fd: int, devname: str, target: str, spin: float) -> None:
    """:func:`trio_relay_loop` until it ends or SIGTERM comes (trio's own signal handling: a
    handler raising SystemExit inside trio's run loop would not end it cleanly)."""
    import trio

    async def stop_on_sigterm(scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_sigterm, nursery.cancel_scope)
        await trio_relay_loop(fd, devname, target, spin)
        nursery.cancel_scope.cancel()


def _init_reply(buf: bytes, devname: str) -> bytes:
    """The reply to the channel's first request, which must be CUSE_INIT."""
    init = proto.parse_request(buf)
    if not isinstance(init, proto.CuseInit):
        raise proto.ProtocolError(f"expected CUSE_INIT, got opcode {init.header.opcode}")
    return proto.reply_cuse_init(init.unique, devname, kernel_minor=init.minor, kernel_flags=init.flags)


def _reply(fd: int, out: bytes | None) -> None:
    if out:
        try:
            os.write(fd, out)
        except FileNotFoundError:  # its caller is gone
            pass


def relay_loop(fd: int, devname: str, target: str) -> None:
    """The relay on channel ``fd`` (blocking), from CUSE_INIT until the channel goes away."""
    buf = bytearray(proto.READ_BUFFER_SIZE)
    view = memoryview(buf)
    os.write(fd, _init_reply(bytes(view[: os.readv(fd, [buf])]), devname))
    relay = Relay(target)
    while True:
        try:
            n = os.readv(fd, [buf])
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # the request was interrupted before we read it
                continue
            return  # ENODEV: the channel is gone
        if n == 0:  # a socket standing in for /dev/cuse, closed
            return
        _reply(fd, relay.handle(bytes(view[:n])))


async def trio_relay_loop(fd: int, devname: str, target: str, spin: float) -> None:
    """:func:`relay_loop` on trio, for an O_NONBLOCK ``fd``: a request is read at once if
    there, else polled for with a checkpoint a round for ``spin`` seconds, else waited for in
    trio's epoll, as the node's request loop does (Channel.request_loop, Channel.spin_read)."""
    import trio

    buf = bytearray(proto.READ_BUFFER_SIZE)
    view = memoryview(buf)
    relay: Relay | None = None
    deadline: float | None = None  # while spinning: until when
    while True:
        try:
            n = os.readv(fd, [buf])
        except BlockingIOError:
            if deadline is None:
                deadline = time.perf_counter() + spin
            if time.perf_counter() < deadline:
                await trio.lowlevel.checkpoint()
            else:
                deadline = None
                await trio.lowlevel.wait_readable(fd)
            continue
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                continue
            return
        deadline = None
        if n == 0:
            return
        if relay is None:
            os.write(fd, _init_reply(bytes(view[:n]), devname))
            relay = Relay(target)
            continue
        _reply(fd, relay.handle(bytes(view[:n])))


def main(argv: list[str]) -> None:
    """``[--trio SPIN_US] DEVNAME TPM_PATH``."""
    spin = None
    if argv[:1] == ["--trio"]:
        spin, argv = float(argv[1]) / 1e6, argv[2:]
    serve(argv[0], argv[1], spin)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the bench's terminate() is the normal end
    main(sys.argv[1:])
