# SPDX-License-Identifier: GPL-2.0-only
"""The CUSE wire protocol, sans I/O: bytes read from /dev/cuse in, reply bytes out.

A CUSE server talks to the kernel over /dev/cuse with the FUSE protocol
(``include/uapi/linux/fuse.h``): each read() returns one request, each write()
sends one reply (or an unsolicited notification).  This module only turns bytes
into typed requests and replies into bytes, so it can be tested without a
kernel; :mod:`cusetpm.cuse` does the reading, writing and task handling.

What a CUSE character device receives (``fs/fuse/cuse.c``, kernels 6.1 and 6.12):
CUSE_INIT once, then FUSE_OPEN, FUSE_READ, FUSE_WRITE, FUSE_POLL, FUSE_IOCTL,
FUSE_RELEASE per open file, and FUSE_INTERRUPT when a caller blocked in one of
them gets a signal.  FUSE_FLUSH, FUSE_FSYNC and FUSE_DESTROY are never sent for
CUSE (cuse_frontend_fops has no flush/fsync), but are understood anyway.

Facts of cuse.c that shape what a client sees, and that no reply can change:

* cuse_open() calls fuse_do_open() but not fuse_finish_open(), so the
  FOPEN_NONSEEKABLE/FOPEN_STREAM open flags are ignored; ``.llseek`` is
  noop_llseek, so lseek() succeeds and returns 0, and pread()/pwrite() act
  like read()/write() (the offset is always sent as 0).  The kernel's tpmrm
  returns ESPIPE there; a CUSE device cannot.
* Reads and writes always go through fuse_direct_io(), whatever the open flags.
* A write() longer than ``max_write`` is split into several FUSE_WRITE requests.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

# ---------------------------------------------------------------------------
# Constants from include/uapi/linux/fuse.h

#: FUSE_KERNEL_VERSION: the major protocol version; the kernel rejects any other.
FUSE_KERNEL_VERSION = 7
#: The highest minor version whose layouts this module knows.  Kernel 6.1 speaks
#: 7.38 and 6.12 speaks 7.41; every struct used here has had its current size
#: since 7.31 (FOPEN_STREAM), and cuse.c needs at least 7.11.
SUPPORTED_MINOR = 31
#: cuse_process_init_reply() rejects minor versions below this.
CUSE_MIN_MINOR = 11

#: CUSE_INIT_INFO_MAX: the kernel's buffer for the "KEY=value\0..." info string.
CUSE_INIT_INFO_MAX = 4096
#: CUSE_UNRESTRICTED_IOCTL: pass every ioctl through without decoding its size.
CUSE_UNRESTRICTED_IOCTL = 1 << 0

FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_STREAM = 1 << 4

FUSE_POLL_SCHEDULE_NOTIFY = 1 << 0
FUSE_READ_LOCKOWNER = 1 << 1
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_RELEASE_FLUSH = 1 << 0

FUSE_IOCTL_COMPAT = 1 << 0
FUSE_IOCTL_UNRESTRICTED = 1 << 1

#: fs/fuse/dev.c: the bit set in the ``unique`` of a FUSE_INTERRUPT request.
FUSE_INT_REQ_BIT = 1
#: FUSE_MIN_READ_BUFFER: the kernel refuses smaller reads of /dev/cuse.
FUSE_MIN_READ_BUFFER = 8192

#: The largest write we let the kernel send in one request.  fs/fuse caps a
#: request at max_pages (32 pages, 128 KiB) anyway.
DEFAULT_MAX_WRITE = 128 * 1024
DEFAULT_MAX_READ = 128 * 1024


class Opcode(IntEnum):
    """enum fuse_opcode: the opcodes this module names (others stay plain ints)."""

    FORGET = 2
    OPEN = 14
    READ = 15
    WRITE = 16
    RELEASE = 18
    FSYNC = 20
    FLUSH = 25
    INTERRUPT = 36
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    BATCH_FORGET = 42
    CUSE_INIT = 4096


#: enum fuse_notify_code FUSE_NOTIFY_POLL: sent in the ``error`` field of a notification.
FUSE_NOTIFY_POLL = 1

# ---------------------------------------------------------------------------
# Struct layouts (native byte order: the kernel and we share one CPU)

IN_HEADER = struct.Struct("=IIQQIIIHH")  # fuse_in_header (40 bytes)
OUT_HEADER = struct.Struct("=IiQ")  # fuse_out_header (16 bytes)
CUSE_INIT_IN = struct.Struct("=IIII")  # cuse_init_in
CUSE_INIT_OUT = struct.Struct("=IIIIIIII40x")  # cuse_init_out, spare[10] zeroed
OPEN_IN = struct.Struct("=II")  # fuse_open_in
OPEN_OUT = struct.Struct("=QIi")  # fuse_open_out (backing_id was padding before 7.40)
READ_IN = struct.Struct("=QQIIQII")  # fuse_read_in
WRITE_IN = struct.Struct("=QQIIQII")  # fuse_write_in, data follows
WRITE_OUT = struct.Struct("=II")  # fuse_write_out
RELEASE_IN = struct.Struct("=QIIQ")  # fuse_release_in
FLUSH_IN = struct.Struct("=QIIQ")  # fuse_flush_in
INTERRUPT_IN = struct.Struct("=Q")  # fuse_interrupt_in
IOCTL_IN = struct.Struct("=QIIQII")  # fuse_ioctl_in, in data follows
POLL_IN = struct.Struct("=QQII")  # fuse_poll_in
POLL_OUT = struct.Struct("=II")  # fuse_poll_out
NOTIFY_POLL_WAKEUP_OUT = struct.Struct("=Q")  # fuse_notify_poll_wakeup_out

#: The smallest read buffer that can hold any request once max_write is set:
#: fs/fuse/dev.c refuses reads smaller than header + fuse_write_in + max_write.
READ_BUFFER_SIZE = 132 * 1024


class ProtocolError(ValueError):
    """The bytes are not a well-formed request; the kernel never sends such."""


# ---------------------------------------------------------------------------
# Requests
#
# Plain slotted dataclasses, not frozen ones: a frozen dataclass's __init__ sets each field
# through object.__setattr__, which made parsing a read or poll cost about 4 µs, a sixth of
# the daemon's Python time per request (issue 9).  Nothing changes a request once parsed.


@dataclass(slots=True)
class InHeader:
    """fuse_in_header: who asks (uid, gid, pid of the caller's thread) and which request."""

    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


@dataclass(slots=True)
class Request:
    """Base of every parsed request; ``header.unique`` is what the reply must carry."""

    header: InHeader

    @property
    def unique(self) -> int:
        return self.header.unique


@dataclass(slots=True)
class CuseInit(Request):
    """CUSE_INIT: the kernel's protocol version and the flags it offers."""

    major: int
    minor: int
    flags: int


@dataclass(slots=True)
class Open(Request):
    """FUSE_OPEN: ``flags`` are the open(2) flags less O_CREAT/O_EXCL/O_NOCTTY/O_TRUNC."""

    flags: int
    open_flags: int


@dataclass(slots=True)
class Read(Request):
    """FUSE_READ: ``flags`` are the file's flags *now* (fcntl(F_SETFL) may have changed them)."""

    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int

    @property
    def nonblock(self) -> bool:
        return bool(self.flags & os.O_NONBLOCK)


@dataclass(slots=True)
class Write(Request):
    """FUSE_WRITE: ``data`` is what the caller wrote (at most max_write bytes of it)."""

    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int
    data: bytes

    @property
    def nonblock(self) -> bool:
        return bool(self.flags & os.O_NONBLOCK)


@dataclass(slots=True)
class Release(Request):
    """FUSE_RELEASE: the last close() of an open file."""

    fh: int
    flags: int
    release_flags: int
    lock_owner: int


@dataclass(slots=True)
class Flush(Request):
    """FUSE_FLUSH: each close() of a descriptor (not sent by CUSE; answered with success)."""

    fh: int
    lock_owner: int


@dataclass(slots=True)
class Poll(Request):
    """FUSE_POLL: ``kh`` names the file in a later FUSE_NOTIFY_POLL."""

    fh: int
    kh: int
    flags: int
    events: int

    @property
    def schedule_notify(self) -> bool:
        """Whether someone is waiting: the kernel then wants a notification on change."""
        return bool(self.flags & FUSE_POLL_SCHEDULE_NOTIFY)


@dataclass(slots=True)
class Interrupt(Request):
    """FUSE_INTERRUPT: the caller of request ``target`` got a signal.  Never replied to."""

    target: int


@dataclass(slots=True)
class Ioctl(Request):
    """FUSE_IOCTL: answered ENOTTY, as the kernel's tpmrm has no ioctl."""

    fh: int
    flags: int
    cmd: int
    arg: int
    in_size: int
    out_size: int
    data: bytes


@dataclass(slots=True)
class Destroy(Request):
    """FUSE_DESTROY: the connection goes away (not sent by CUSE; answered with success)."""


@dataclass(slots=True)
class Unknown(Request):
    """Any other opcode (FUSE_FSYNC included): answered ENOSYS unless it takes no reply."""

    body: bytes


def _unpack(layout: struct.Struct, buf: bytes, what: str, at: int = 0) -> tuple[int, ...]:
    """The op's in struct at offset ``at`` of ``buf`` (a request's: after its header)."""
    if len(buf) - at < layout.size:
        raise ProtocolError(f"{what}: {len(buf) - at} bytes, need {layout.size}")
    return layout.unpack_from(buf, at)


def parse_header(buf: bytes) -> InHeader | None:
    """The fuse_in_header at the start of ``buf`` whatever follows it, or None if too short.

    What a malformed request is answered with needs its ``unique`` (and its opcode: some
    take no reply).
    """
    if len(buf) < IN_HEADER.size:
        return None
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(buf)
    return InHeader(length, opcode, unique, nodeid, uid, gid, pid)


_HEADER_SIZE = IN_HEADER.size


def _read(h: InHeader, buf: bytes) -> Request:
    fh, offset, size, read_flags, lock_owner, flags, _ = _unpack(READ_IN, buf, "fuse_read_in", _HEADER_SIZE)
    return Read(h, fh, offset, size, read_flags, lock_owner, flags)


def _write(h: InHeader, buf: bytes) -> Request:
    fh, offset, size, write_flags, lock_owner, flags, _ = _unpack(WRITE_IN, buf, "fuse_write_in", _HEADER_SIZE)
    data = bytes(buf[_HEADER_SIZE + WRITE_IN.size :])
    if len(data) != size:
        raise ProtocolError(f"write says {size} bytes, carries {len(data)}")
    return Write(h, fh, offset, size, write_flags, lock_owner, flags, data)


def _poll(h: InHeader, buf: bytes) -> Request:
    fh, kh, flags, events = _unpack(POLL_IN, buf, "fuse_poll_in", _HEADER_SIZE)
    return Poll(h, fh, kh, flags, events)


def _open(h: InHeader, buf: bytes) -> Request:
    flags, open_flags = _unpack(OPEN_IN, buf, "fuse_open_in", _HEADER_SIZE)
    return Open(h, flags, open_flags)


def _release(h: InHeader, buf: bytes) -> Request:
    fh, flags, release_flags, lock_owner = _unpack(RELEASE_IN, buf, "fuse_release_in", _HEADER_SIZE)
    return Release(h, fh, flags, release_flags, lock_owner)


def _flush(h: InHeader, buf: bytes) -> Request:
    fh, _unused, _pad2, lock_owner = _unpack(FLUSH_IN, buf, "fuse_flush_in", _HEADER_SIZE)
    return Flush(h, fh, lock_owner)


def _interrupt(h: InHeader, buf: bytes) -> Request:
    (target,) = _unpack(INTERRUPT_IN, buf, "fuse_interrupt_in", _HEADER_SIZE)
    return Interrupt(h, target)


def _ioctl(h: InHeader, buf: bytes) -> Request:
    fh, flags, cmd, arg, in_size, out_size = _unpack(IOCTL_IN, buf, "fuse_ioctl_in", _HEADER_SIZE)
    return Ioctl(h, fh, flags, cmd, arg, in_size, out_size, bytes(buf[_HEADER_SIZE + IOCTL_IN.size :]))


def _cuse_init(h: InHeader, buf: bytes) -> Request:
    major, minor, _unused, flags = _unpack(CUSE_INIT_IN, buf, "cuse_init_in", _HEADER_SIZE)
    return CuseInit(h, major, minor, flags)


def _destroy(h: InHeader, buf: bytes) -> Request:
    return Destroy(h)


#: opcode -> the parser of its body; any other opcode is an :class:`Unknown`.  Keyed by
#: plain ints: a dict lookup, not a chain of IntEnum comparisons, per request.
_PARSERS: dict[int, Callable[[InHeader, bytes], Request]] = {
    int(Opcode.READ): _read,
    int(Opcode.WRITE): _write,
    int(Opcode.POLL): _poll,
    int(Opcode.OPEN): _open,
    int(Opcode.RELEASE): _release,
    int(Opcode.FLUSH): _flush,
    int(Opcode.INTERRUPT): _interrupt,
    int(Opcode.IOCTL): _ioctl,
    int(Opcode.CUSE_INIT): _cuse_init,
    int(Opcode.DESTROY): _destroy,
}


def parse_request(buf: bytes) -> Request:
    """Parse one request as read from /dev/cuse (one read() returns exactly one).

    Raises :class:`ProtocolError` and nothing else for bytes that are no request.
    """
    if len(buf) < _HEADER_SIZE:
        raise ProtocolError(f"request of {len(buf)} bytes is shorter than fuse_in_header")
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(buf)
    if length != len(buf):
        raise ProtocolError(f"header says {length} bytes, read returned {len(buf)}")
    if unique == 0:
        # fs/fuse never numbers a request 0: a reply with unique 0 is a notification.
        raise ProtocolError("request with unique 0")
    h = InHeader(length, opcode, unique, nodeid, uid, gid, pid)
    parse = _PARSERS.get(opcode)
    if parse is None:
        return Unknown(h, bytes(buf[_HEADER_SIZE:]))
    return parse(h, buf)


#: FUSE_READ and FUSE_POLL with their header, each one unpack (four of a TCTI command's five
#: requests), and their opcodes as plain ints (an IntEnum comparison costs more).
READ_REQUEST = struct.Struct(IN_HEADER.format + READ_IN.format[1:])
POLL_REQUEST = struct.Struct(IN_HEADER.format + POLL_IN.format[1:])
OP_READ, OP_POLL = int(Opcode.READ), int(Opcode.POLL)


def parse_read_or_poll(buf: bytes) -> tuple[int, int, int, int, int] | None:
    """``(opcode, unique, fh, size, flags)`` of a FUSE_READ (the file's flags) or ``(opcode,
    unique, fh, kh, flags)`` of a FUSE_POLL (fuse_poll_in's), as :func:`parse_request` parses
    them, with no request object; None for anything else (:func:`parse_request` says what).
    Each of the two has one size, so the length picks the struct before the opcode is known."""
    n = len(buf)
    if n == READ_REQUEST.size:
        length, opcode, unique, _, _, _, _, _, _, fh, _, size, _, _, flags, _ = READ_REQUEST.unpack_from(buf)
        if opcode == OP_READ and length == n and unique:
            return opcode, unique, fh, size, flags
    elif n == POLL_REQUEST.size:
        length, opcode, unique, _, _, _, _, _, _, fh, kh, flags, _ = POLL_REQUEST.unpack_from(buf)
        if opcode == OP_POLL and length == n and unique:
            return opcode, unique, fh, kh, flags
    return None


# ---------------------------------------------------------------------------
# Replies


def reply(unique: int, payload: bytes = b"") -> bytes:
    """A successful reply: fuse_out_header with error 0, then the op's out struct."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def reply_error(unique: int, err: int) -> bytes:
    """An error reply; ``err`` is a positive errno (the kernel wants it negated, < 512)."""
    if not 0 < err < 512:
        raise ValueError(f"errno {err} out of range for a FUSE reply")
    return OUT_HEADER.pack(OUT_HEADER.size, -err, unique)


def reply_cuse_init(
    unique: int, devname: str, *, kernel_minor: int, kernel_flags: int = CUSE_UNRESTRICTED_IOCTL,
    dev_major: int = 0, dev_minor: int = 0, max_read: int = DEFAULT_MAX_READ, max_write: int = DEFAULT_MAX_WRITE,
) -> bytes:  # fmt: skip
    """The CUSE_INIT reply: cuse_init_out, then the info string ``DEVNAME=<devname>\\0``.

    ``dev_major`` 0 lets the kernel pick a free major.  We take
    CUSE_UNRESTRICTED_IOCTL when offered so every ioctl reaches us undecoded
    and gets ENOTTY, as on tpmrm, instead of the kernel first copying (and
    maybe faulting on) the argument that the ioctl number describes.
    """
    check_devname(devname)
    if kernel_minor < CUSE_MIN_MINOR:
        raise ValueError(f"kernel speaks FUSE 7.{kernel_minor}, CUSE needs 7.{CUSE_MIN_MINOR}")
    info = f"DEVNAME={devname}".encode() + b"\0"
    if len(info) > CUSE_INIT_INFO_MAX:
        raise ValueError("device info longer than CUSE_INIT_INFO_MAX")
    minor = min(kernel_minor, SUPPORTED_MINOR)
    flags = kernel_flags & CUSE_UNRESTRICTED_IOCTL
    out = CUSE_INIT_OUT.pack(FUSE_KERNEL_VERSION, minor, 0, flags, max_read, max_write, dev_major, dev_minor)
    return reply(unique, out + info)


def check_devname(devname: str) -> None:
    """Refuse names the kernel would mangle: it strips blanks, '/' makes a subdirectory."""
    bad_char = any(c in devname for c in "/\0=") or not (devname.isascii() and devname.isprintable())
    if not devname or devname != devname.strip() or bad_char:
        raise ValueError(f"bad CUSE device name {devname!r}")


#: Open flags for every CUSE open: direct I/O (as cuse_read_iter/cuse_write_iter
#: do anyway) and non-seekable.  cuse.c ignores FOPEN_NONSEEKABLE (see the
#: module docstring); it is set to say what the device means.
CUSE_OPEN_FLAGS = FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE


def reply_open(unique: int, fh: int, open_flags: int = CUSE_OPEN_FLAGS) -> bytes:
    """The FUSE_OPEN reply: the file handle the kernel will quote in later requests."""
    return reply(unique, OPEN_OUT.pack(fh, open_flags, 0))


def reply_read(unique: int, data: bytes) -> bytes:
    """The FUSE_READ reply: the data itself, fewer bytes than asked means a short read."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(data), 0, unique) + data


#: fuse_out_header and the op's out struct in one pack (on every command's path).
_WRITE_REPLY = struct.Struct(OUT_HEADER.format + WRITE_OUT.format[1:])
_POLL_REPLY = struct.Struct(OUT_HEADER.format + POLL_OUT.format[1:])


def reply_write(unique: int, size: int) -> bytes:
    """The FUSE_WRITE reply: how many bytes were accepted."""
    return _WRITE_REPLY.pack(_WRITE_REPLY.size, 0, unique, size, 0)


def reply_poll(unique: int, revents: int) -> bytes:
    """The FUSE_POLL reply: userspace POLL* bits (the kernel converts them)."""
    return _POLL_REPLY.pack(_POLL_REPLY.size, 0, unique, revents, 0)


def notify_poll(kh: int) -> bytes:
    """FUSE_NOTIFY_POLL: tells the kernel to re-poll file ``kh``; unique 0, error = the code."""
    payload = NOTIFY_POLL_WAKEUP_OUT.pack(kh)
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), FUSE_NOTIFY_POLL, 0) + payload


#: Requests the kernel sends without waiting for an answer: replying gets ENOENT.
NO_REPLY_OPCODES = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})


def default_reply(request: Request) -> bytes | None:
    """The reply for requests that need no device: None means send nothing.

    FUSE_INTERRUPT gets no reply here: answering it ENOSYS would make the
    kernel stop sending interrupts for good (fc->no_interrupt); the
    interrupted request itself is answered EINTR instead.
    """
    if isinstance(request, Ioctl):
        return reply_error(request.unique, _errno.ENOTTY)
    if isinstance(request, (Flush, Destroy)):
        return reply(request.unique)
    if request.header.opcode in NO_REPLY_OPCODES:
        return None
    return reply_error(request.unique, _errno.ENOSYS)


# ---------------------------------------------------------------------------
# Building requests: what the kernel would send.  Used by tests and fakes.


def build_request(
    opcode: int, unique: int, body: bytes = b"", *, nodeid: int = 0, uid: int = 0, gid: int = 0, pid: int = 0
) -> bytes:
    """Frame ``body`` with a fuse_in_header, as the kernel does."""
    length = IN_HEADER.size + len(body)
    return IN_HEADER.pack(length, opcode, unique, nodeid, uid, gid, pid, 0, 0) + body
