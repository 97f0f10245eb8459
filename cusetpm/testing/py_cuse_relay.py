# SPDX-License-Identifier: GPL-2.0-only
"""The guest figure's Python floor: the least a CUSE daemon written in Python costs.

A CUSE device on the kernel's own /dev/tpmrm0, as :data:`.bench_guest.C_CUSE_RELAY` is in C:
every open of it opens /dev/tpmrm0, a write() writes the command there (the kernel runs it in
that write) and reads the response, which read() hands out.  One thread blocking in read() on
/dev/cuse, no trio, no resource manager of its own, on cusetpm's protocol layer
(:mod:`cusetpm.frontends.cuse_proto`).  What the node costs beyond it is the node's own work
(its resource manager, its event loop); what it costs beyond the C relay is Python's.

``python -m cusetpm.testing.py_cuse_relay DEVNAME TPM_PATH`` serves /dev/DEVNAME in the
foreground until /dev/cuse goes away or a signal ends it (the bench's guest side starts it).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import sys

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


def serve(devname: str, target: str) -> None:
    """Serve /dev/``devname`` on /dev/cuse until the channel goes away."""
    proto.check_devname(devname)
    fd = os.open("/dev/cuse", os.O_RDWR | os.O_CLOEXEC)
    buf = bytearray(proto.READ_BUFFER_SIZE)
    view = memoryview(buf)
    init = proto.parse_request(bytes(view[: os.readv(fd, [buf])]))
    if not isinstance(init, proto.CuseInit):
        raise proto.ProtocolError(f"expected CUSE_INIT, got opcode {init.header.opcode}")
    os.write(fd, proto.reply_cuse_init(init.unique, devname, kernel_minor=init.minor, kernel_flags=init.flags))
    relay = Relay(target)
    while True:
        try:
            n = os.readv(fd, [buf])
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # the request was interrupted before we read it
                continue
            return  # ENODEV: the channel is gone
        out = relay.handle(bytes(view[:n]))
        if out:
            try:
                os.write(fd, out)
            except FileNotFoundError:  # its caller is gone
                pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the bench's terminate() is the normal end
    serve(*sys.argv[1:3])
