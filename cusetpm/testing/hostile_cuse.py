# SPDX-License-Identifier: GPL-2.0-only
"""Hostile FUSE/CUSE requests for the fuzz tests and ``make fuzz``: valid requests of every
opcode cuse.c sends (and some it never does), and mutations of them; with ``fuse=True`` also
the file-system requests a FUSE mount sends (lookups, attributes, the directory listing).

Both front ends parse requests themselves (:mod:`cusetpm.frontends.cuse_proto`, and
:mod:`cusetpm.frontends.fuse_proto` for the FUSE file's directory), on the same request loop
(:class:`cusetpm.frontends.channel.Channel`); both loops are fuzzed here on a socket pair.
(``--fuse-lib pyfuse3`` leaves parsing to libfuse: nothing of ours to fuzz there.)
Like :mod:`.hostile`, everything takes a :class:`random.Random`.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import cast

import trio

from ..daemon.file import Opener
from ..daemon.node import Node
from ..frontends import cuse_proto as p
from ..frontends import fuse_proto as fsp
from ..frontends.channel import Channel
from ..frontends.cuse import _Server
from ..frontends.fuse import FILE_INODE, TpmFuse

#: Opcodes to build: every one the parser names, FSYNC, and two it does not know.
OPCODES = (
    p.Opcode.CUSE_INIT, p.Opcode.OPEN, p.Opcode.READ, p.Opcode.WRITE, p.Opcode.RELEASE, p.Opcode.FLUSH,
    p.Opcode.POLL, p.Opcode.INTERRUPT, p.Opcode.IOCTL, p.Opcode.DESTROY, p.Opcode.FORGET,
    p.Opcode.BATCH_FORGET, p.Opcode.FSYNC, 1, 777,
)  # fmt: skip

#: ... and the FUSE file system's own (a FUSE node's directory).
FS_OPCODES = (*OPCODES[1:-2], *fsp.FsOpcode, 2, 999)
#: Inodes a FUSE request names: none, the directory, the node's file, one that never was.
NODEIDS = (0, fsp.ROOT_INODE, FILE_INODE, FILE_INODE + 1, (1 << 64) - 1)

_U64 = (0, 1, 2, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1)
_U32 = (0, 1, 6, 10, 4096, 4097, 0x7FFFFFFF, 0xFFFFFFFF)


def _u64(rng: random.Random, fhs: list[int]) -> int:
    return rng.choice(fhs) if fhs and rng.random() < 0.7 else rng.choice(_U64)


def _u32(rng: random.Random) -> int:
    return rng.getrandbits(32) if rng.random() < 0.2 else rng.choice(_U32)


def _tpm_bytes(rng: random.Random) -> bytes:
    """What a write carries: a small TPM command, often GetRandom, sometimes noise."""
    if rng.random() < 0.6:
        return bytes.fromhex("80010000000c0000017b0008")
    return rng.randbytes(rng.choice((0, 1, 6, 12, 100, 4096, 4097)))


def body_for(rng: random.Random, opcode: int, fhs: list[int]) -> bytes:
    """A well-formed body for ``opcode``, naming one of the file handles ``fhs``."""
    fh = _u64(rng, fhs)
    flags = rng.choice((os.O_RDWR, os.O_RDWR | os.O_NONBLOCK, os.O_RDONLY, os.O_WRONLY, _u32(rng)))
    if opcode == p.Opcode.CUSE_INIT:
        return p.CUSE_INIT_IN.pack(rng.choice((7, 8, 0)), rng.choice((11, 31, 41, 0)), 0, _u32(rng))
    if opcode == p.Opcode.OPEN:
        return p.OPEN_IN.pack(flags, 0)
    if opcode == p.Opcode.READ:
        return p.READ_IN.pack(fh, 0, rng.choice((0, 1, 10, 4096, 1 << 17, 0xFFFFFFFF)), 0, 0, flags, 0)
    if opcode == p.Opcode.WRITE:
        data = _tpm_bytes(rng)
        return p.WRITE_IN.pack(fh, 0, len(data), 0, 0, flags, 0) + data
    if opcode == p.Opcode.RELEASE:
        return p.RELEASE_IN.pack(fh, flags, rng.choice((0, p.FUSE_RELEASE_FLUSH)), 0)
    if opcode == p.Opcode.FLUSH:
        return p.FLUSH_IN.pack(fh, 0, 0, 0)
    if opcode == p.Opcode.POLL:
        return p.POLL_IN.pack(fh, rng.getrandbits(64), rng.choice((0, p.FUSE_POLL_SCHEDULE_NOTIFY)), _u32(rng))
    if opcode == p.Opcode.INTERRUPT:
        return p.INTERRUPT_IN.pack(rng.getrandbits(64))
    if opcode == p.Opcode.IOCTL:
        data = rng.randbytes(rng.choice((0, 4, 64)))
        return p.IOCTL_IN.pack(fh, p.FUSE_IOCTL_UNRESTRICTED, _u32(rng), rng.getrandbits(64), len(data), 0) + data
    if opcode in (p.Opcode.FORGET, p.Opcode.FSYNC):
        return struct.pack("=QII", fh, 0, 0)
    if opcode == fsp.FsOpcode.LOOKUP:
        return rng.choice((b"tpmrm0\0", b"\0", b"..\0", b"tpmrm0", b"", rng.randbytes(rng.choice((1, 255, 300)))))
    if opcode == fsp.FsOpcode.GETATTR:
        return struct.pack("=IIQ", rng.choice((0, 1)), 0, fh)
    if opcode == fsp.FsOpcode.OPENDIR:
        return p.OPEN_IN.pack(flags, 0)
    if opcode == fsp.FsOpcode.READDIR:
        return p.READ_IN.pack(fh, rng.choice((0, 1, 2, 3, 1 << 63)), rng.choice((0, 24, 4096, 0xFFFFFFFF)), 0, 0, 0, 0)
    if opcode == fsp.FsOpcode.RELEASEDIR:
        return p.RELEASE_IN.pack(fh, flags, 0, 0)
    if opcode == fsp.FsOpcode.INIT:
        return fsp.INIT_IN.pack(rng.choice((7, 8)), rng.choice((31, 38, 41, 0)), 1 << 17, _u32(rng))
    if opcode == fsp.FsOpcode.ACCESS:
        return struct.pack("=II", rng.choice((0, 1, 2, 4, 7)), 0)
    return rng.randbytes(rng.choice((0, 8, 40, 88)))


def valid_request(rng: random.Random, unique: int, fhs: list[int], fuse: bool = False) -> bytes:
    """A well-formed request: CUSE's opcodes, or with ``fuse`` a FUSE mount's (naming inodes)."""
    opcode = rng.choice(FS_OPCODES if fuse else OPCODES)
    nodeid = rng.choice(NODEIDS) if fuse else 0
    body = body_for(rng, opcode, fhs)
    return p.build_request(opcode, unique, body, nodeid=nodeid, uid=1000, gid=100, pid=rng.randrange(1, 1 << 22))


def mutate_request(rng: random.Random, frame: bytes, fuse: bool = False) -> bytes:
    """Bit flips, truncation, extension, a wrong length field, a wrong opcode, a body of another."""
    opcodes = FS_OPCODES if fuse else OPCODES
    b = bytearray(frame)
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.randrange(7)
        if kind == 0 and b:
            for _ in range(rng.choice((1, 2, 8))):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del b[rng.randrange(len(b) + 1) :]
        elif kind == 2:
            b += rng.randbytes(rng.choice((1, 4, 8, 64)))
        elif kind == 3 and len(b) >= 4:
            struct.pack_into("=I", b, 0, rng.choice((0, 1, 39, 40, len(b) - 1, len(b) + 1, 0xFFFFFFFF)))
        elif kind == 4 and len(b) >= 8:
            struct.pack_into("=I", b, 4, rng.choice((*opcodes, rng.getrandbits(32))))
        elif kind == 5 and len(b) >= 4:
            struct.pack_into("=I", b, 0, len(b))  # a consistent length after the others
        elif kind == 6 and len(b) >= 40:
            b[40:] = body_for(rng, rng.choice(opcodes), [])
    return bytes(b)


def hostile_request(rng: random.Random, unique: int, fhs: list[int], fuse: bool = False) -> bytes:
    """Mostly a mutated valid request, sometimes a valid one, sometimes noise."""
    r = rng.random()
    if r < 0.1:
        return valid_request(rng, unique, fhs, fuse)
    if r < 0.2:
        return rng.randbytes(rng.choice((0, 1, 16, 39, 40, 41, 80)))
    return mutate_request(rng, valid_request(rng, unique, fhs, fuse), fuse)


def check_parse(buf: bytes) -> p.Request | None:
    """parse_request(): a request, or ProtocolError (None here).  Anything else escapes.  And
    the request loop's lean parse of reads and polls agrees with it, field for field, or
    leaves the request to it."""
    lean = p.parse_read_or_poll(buf)
    try:
        req = p.parse_request(buf)
    except p.ProtocolError:
        assert lean is None, f"parse_read_or_poll took a malformed request: {lean}"
        return None
    # A read or poll with bytes after its struct (the kernel sends none) is left to parse_request.
    if isinstance(req, p.Read):
        assert lean in (None, (p.Opcode.READ, req.unique, req.fh, req.size, req.flags)), lean
    elif isinstance(req, p.Poll):
        assert lean in (None, (p.Opcode.POLL, req.unique, req.fh, req.kh, req.flags)), lean
    else:
        assert lean is None, f"parse_read_or_poll took a {type(req).__name__}: {lean}"
    return req


def check_reply(frame: bytes) -> str | None:
    """Why ``frame`` is no reply the kernel accepts, or None: fuse_out_header's length says the
    frame's own, and the error is 0, a notification code (unique 0) or a negated errno < 512."""
    if len(frame) < p.OUT_HEADER.size:
        return f"reply of {len(frame)} bytes"
    length, error, unique = p.OUT_HEADER.unpack_from(frame)
    if length != len(frame):
        return f"reply says {length} bytes, is {len(frame)}"
    if unique == 0:
        return None if error == p.FUSE_NOTIFY_POLL else f"notification code {error}"
    if not -512 < error <= 0:
        return f"reply error {error}"
    return None


# --- the CUSE request loop, on a socket pair -------------------------------------------------


class NullFile:
    """A file that takes every write of at most 4096 bytes and has nothing to read."""

    def __init__(self, device: NullDevice) -> None:
        self.device = device

    async def write(self, data: bytes, nonblock: bool) -> int:
        if len(data) > 4096:
            raise OSError(errno.E2BIG, os.strerror(errno.E2BIG))
        self.device.writes += 1
        return len(data)

    async def read(self, size: int, nonblock: bool) -> bytes:
        return b""

    async def poll(self, wake: Callable[[], None] | None) -> int:
        return select.POLLOUT

    async def release(self) -> None:
        self.device.releases += 1


class NullDevice:
    """The device behind the fuzzed loop: what reaches it is counted, nothing else."""

    def __init__(self) -> None:
        self.opens = self.writes = self.releases = 0

    def open(self, flags: int, opener: Opener) -> NullFile:
        self.opens += 1
        return NullFile(self)


def wants_reply(frame: bytes) -> bool:
    """A frame whose header can be read, numbered, and whose opcode takes a reply."""
    header = p.parse_header(frame)
    return header is not None and header.unique != 0 and header.opcode not in p.NO_REPLY_OPCODES


class LoopRig:
    """A request loop (the CUSE device's :class:`~cusetpm.frontends.cuse._Server`, or a FUSE
    node's :class:`~cusetpm.frontends.fuse.TpmFuse`) on one end of a SEQPACKET pair (which
    keeps message boundaries, like /dev/cuse and /dev/fuse) and a kernel on the other that
    checks every reply: well-formed, at most one per unique, and one for every frame that
    wants one.  ``nodeid``: the inode a file operation names (FUSE: the node's file)."""

    def __init__(self, kernel: trio.socket.SocketType, server: Channel, nodeid: int = 0) -> None:
        self.kernel = kernel
        self.server = server
        self.nodeid = nodeid
        self.replies: dict[int, bytes] = {}
        self.problems: list[str] = []
        self.next_unique = 1000
        self.sent = 0

    async def receive(self) -> None:
        while data := await self.kernel.recv(1 << 20):
            problem = check_reply(data)
            _, _, unique = p.OUT_HEADER.unpack_from(data) if len(data) >= 16 else (0, 0, 0)
            if problem is None and unique and unique in self.replies:
                problem = f"second reply to {unique}"
            if problem:
                self.problems.append(problem)
            elif unique:
                self.replies[unique] = data

    async def feed(self, frames: list[bytes], timeout: float = 3.0) -> None:
        """Send the frames, each renumbered where it has a unique (0 stays: it is refused),
        and wait for every reply due."""
        due = []
        for frame in frames:
            if not frame:
                continue  # a read of /dev/cuse never returns 0 bytes (here it would mean EOF)
            if len(frame) >= 16 and frame[8:16] != bytes(8):
                self.next_unique += 2
                frame = frame[:8] + struct.pack("=Q", self.next_unique) + frame[16:]
            await self.kernel.send(frame)
            self.sent += 1
            if wants_reply(frame):
                due.append(self.next_unique)
        with trio.move_on_after(timeout):
            while not all(u in self.replies for u in due):
                await trio.sleep(0.001)
        missing = [u for u in due if u not in self.replies]
        if missing:
            self.problems.append(f"no reply to {len(missing)} requests, the first {missing[0]}")
        for u in due:
            self.replies.pop(u, None)

    async def call(self, opcode: int, body: bytes, nodeid: int | None = None) -> tuple[int, bytes]:
        """One request (naming ``nodeid``, by default the file's) and its (error, body)."""
        self.next_unique += 2
        unique = self.next_unique
        await self.kernel.send(p.build_request(opcode, unique, body, nodeid=self.nodeid if nodeid is None else nodeid))
        with trio.fail_after(3):
            while unique not in self.replies:
                await trio.sleep(0.001)
        data = self.replies.pop(unique)
        return p.OUT_HEADER.unpack_from(data)[1], data[p.OUT_HEADER.size :]

    async def still_serves(self) -> None:
        """A plain open, write, release gets its answers (on FUSE, a lookup of the file
        first): the loop is alive."""
        if self.nodeid:
            error, _ = await self.call(fsp.FsOpcode.LOOKUP, b"tpmrm0\0", fsp.ROOT_INODE)
            if error:
                raise AssertionError(f"lookup after hostile requests: {error}")
        error, out = await self.call(p.Opcode.OPEN, p.OPEN_IN.pack(os.O_RDWR, 0))
        if error:
            raise AssertionError(f"open after hostile requests: {error}")
        fh = p.OPEN_OUT.unpack(out)[0]
        error, _ = await self.call(p.Opcode.WRITE, p.WRITE_IN.pack(fh, 0, 12, 0, 0, os.O_RDWR, 0) + bytes(12))
        if error:
            raise AssertionError(f"write after hostile requests: {error}")
        error, _ = await self.call(p.Opcode.RELEASE, p.RELEASE_IN.pack(fh, os.O_RDWR, 0, 0))
        if error:
            raise AssertionError(f"release after hostile requests: {error}")


def run_loop(body: Callable[[LoopRig], Awaitable[None]], fuse: bool = False) -> None:
    """Run ``body`` with a fresh :class:`LoopRig` (on trio), then stop the loop.  ``fuse``:
    a FUSE node's loop (a directory holding ``tpmrm0``), else the CUSE device's."""

    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        with ours, theirs:
            async with trio.open_nursery() as nursery:
                server: Channel
                if fuse:
                    server = TpmFuse(cast(Node, NullDevice()), "tpmrm0")
                    server.fd = ours.fileno()
                else:
                    server = _Server(ours.fileno(), NullDevice(), "fuzz0")
                rig = LoopRig(trio.socket.from_stdlib_socket(theirs), server, FILE_INODE if fuse else 0)
                nursery.start_soon(server.request_loop, nursery)
                nursery.start_soon(rig.receive)
                await body(rig)
                nursery.cancel_scope.cancel()

    trio.run(main)
