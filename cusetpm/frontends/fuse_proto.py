# SPDX-License-Identifier: GPL-2.0-only
"""The FUSE file system's own requests, sans I/O: what a mount needs beyond CUSE's file ops.

:mod:`.cuse_proto` has the wire format both channels share (headers, open/read/write/poll/
release, errors).  A FUSE mount also asks for FUSE_INIT, lookups, attributes, a directory
listing and statfs; this module parses those bodies and builds their replies and the
notifications a reload sends (``include/uapi/linux/fuse.h``, kernels 6.1 and 6.12).
"""

from __future__ import annotations

import errno
import stat
import struct
from dataclasses import dataclass
from enum import IntEnum

from . import cuse_proto as proto


class FsOpcode(IntEnum):
    """The file-system opcodes of enum fuse_opcode that the node answers."""

    LOOKUP = 1
    GETATTR = 3
    SETATTR = 4
    STATFS = 17
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    ACCESS = 34


#: FUSE_INIT flags the node takes when offered: reads may be sent in parallel, open(O_TRUNC)
#: is passed to open (no SETATTR after it), and a write is one request up to max_write.
FUSE_ASYNC_READ = 1 << 0
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_BIG_WRITES = 1 << 5
WANTED_INIT_FLAGS = FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES

INIT_IN = struct.Struct("=IIII")  # fuse_init_in, the part every minor version has
INIT_OUT = struct.Struct("=IIIIHHIIHHII24x")  # fuse_init_out (64 bytes)
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")  # fuse_attr (88 bytes)
ENTRY_OUT = struct.Struct("=QQQQII")  # fuse_entry_out before its fuse_attr
ATTR_OUT = struct.Struct("=QII")  # fuse_attr_out before its fuse_attr
DIRENT = struct.Struct("=QQII")  # fuse_dirent before its name
KSTATFS = struct.Struct("=QQQQQIIII24x")  # fuse_kstatfs (80 bytes)
NOTIFY_INVAL_INODE = struct.Struct("=Qqq")
NOTIFY_INVAL_ENTRY = struct.Struct("=QII")
NOTIFY_DELETE = struct.Struct("=QQII")

FUSE_NOTIFY_INVAL_INODE = 2
FUSE_NOTIFY_INVAL_ENTRY = 3
FUSE_NOTIFY_DELETE = 6

ROOT_INODE = 1
#: Attributes and names are valid this long: nothing changes but through a notification.
VALID_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class Attr:
    """What stat() shows of an inode."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int

    def pack(self) -> bytes:
        return ATTR.pack(self.ino, 0, 0, 0, 0, 0, 0, 0, 0, self.mode, self.nlink, self.uid, self.gid, 0, 4096, 0)


def parse_init(body: bytes) -> tuple[int, int, int, int]:
    """fuse_init_in: (major, minor, max_readahead, flags)."""
    if len(body) < INIT_IN.size:
        raise proto.ProtocolError(f"fuse_init_in: {len(body)} bytes, need {INIT_IN.size}")
    major, minor, readahead, flags = INIT_IN.unpack_from(body)
    return major, minor, readahead, flags


def reply_init(unique: int, *, kernel_minor: int, readahead: int, kernel_flags: int) -> bytes:
    """The FUSE_INIT reply: our version (at most what we know), the flags we take, max_write."""
    out = INIT_OUT.pack(
        proto.FUSE_KERNEL_VERSION, min(kernel_minor, proto.SUPPORTED_MINOR), readahead,
        kernel_flags & WANTED_INIT_FLAGS, 16, 12, proto.DEFAULT_MAX_WRITE, 1, 0, 0, 0, 0,
    )  # fmt: skip
    return proto.reply(unique, out)


def parse_name(body: bytes) -> bytes:
    """A LOOKUP's name (NUL-terminated)."""
    end = body.find(b"\0")
    if end < 0:
        raise proto.ProtocolError("name without its NUL")
    return body[:end]


def parse_readdir(body: bytes) -> tuple[int, int]:
    """READDIR's fuse_read_in: (offset, size)."""
    _fh, offset, size, *_ = proto._unpack(proto.READ_IN, body, "fuse_read_in")
    return offset, size


def reply_entry(unique: int, attr: Attr) -> bytes:
    return proto.reply(unique, ENTRY_OUT.pack(attr.ino, 0, VALID_SECONDS, VALID_SECONDS, 0, 0) + attr.pack())


def reply_attr(unique: int, attr: Attr) -> bytes:
    return proto.reply(unique, ATTR_OUT.pack(VALID_SECONDS, 0, 0) + attr.pack())


def reply_readdir(unique: int, entries: list[tuple[bytes, Attr]], offset: int, size: int) -> bytes:
    """Directory entries from index ``offset`` on, as many as fit in ``size`` bytes; each
    entry's ``off`` is where the next listing starts."""
    out = bytearray()
    for i, (name, attr) in enumerate(entries[offset:], offset + 1):
        entry = DIRENT.pack(attr.ino, i, len(name), stat.S_IFMT(attr.mode) >> 12) + name
        entry += bytes(-len(entry) % 8)
        if len(out) + len(entry) > size:
            break
        out += entry
    return proto.reply(unique, bytes(out))


def reply_statfs(unique: int) -> bytes:
    """statfs(): libfuse's answer for a file system without one (512-byte blocks, names to 255)."""
    return proto.reply(unique, KSTATFS.pack(0, 0, 0, 0, 0, 512, 255, 512, 0))


def reply_error(unique: int, err: int = errno.ENOSYS) -> bytes:
    return proto.reply_error(unique, err)


def _notification(code: int, payload: bytes) -> bytes:
    return proto.OUT_HEADER.pack(proto.OUT_HEADER.size + len(payload), code, 0) + payload


def notify_inval_inode(ino: int) -> bytes:
    """Forget an inode's cached attributes (offset -1: no data to drop)."""
    return _notification(FUSE_NOTIFY_INVAL_INODE, NOTIFY_INVAL_INODE.pack(ino, -1, 0))


def notify_inval_entry(parent: int, name: bytes) -> bytes:
    """Forget a cached name."""
    return _notification(FUSE_NOTIFY_INVAL_ENTRY, NOTIFY_INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0")


def notify_delete(parent: int, child: int, name: bytes) -> bytes:
    """A name is gone (as unlink would tell the kernel's dentry cache)."""
    return _notification(FUSE_NOTIFY_DELETE, NOTIFY_DELETE.pack(parent, child, len(name), 0) + name + b"\0")
