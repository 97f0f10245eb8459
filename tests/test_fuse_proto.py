# SPDX-License-Identifier: GPL-2.0-only
"""The FUSE file system's own wire format (cusetpm.frontends.fuse_proto), byte for byte."""

import errno
import stat
import struct

import pytest

from cusetpm.frontends import cuse_proto as p
from cusetpm.frontends import fuse_proto as f


def header(data: bytes) -> tuple[int, int, int]:
    return p.OUT_HEADER.unpack_from(data)


def test_init_reply_takes_only_the_flags_we_want_of_those_offered() -> None:
    offered = f.FUSE_ASYNC_READ | f.FUSE_BIG_WRITES | (1 << 12)  # and one we do not want
    out = f.reply_init(9, kernel_minor=41, readahead=131072, kernel_flags=offered)
    assert header(out) == (16 + 64, 0, 9)
    major, minor, readahead, flags, _bg, _cong, max_write = struct.unpack_from("=IIIIHHI", out, 16)
    assert (major, minor, readahead) == (7, p.SUPPORTED_MINOR, 131072)
    assert flags == f.FUSE_ASYNC_READ | f.FUSE_BIG_WRITES
    assert max_write == p.DEFAULT_MAX_WRITE
    # A kernel older than the layouts we know is told its own minor (it refused it anyway).
    assert struct.unpack_from("=I", f.reply_init(1, kernel_minor=30, readahead=0, kernel_flags=0), 20)[0] == 30


def test_parse_init_and_names() -> None:
    assert f.parse_init(struct.pack("=IIIII", 7, 38, 4096, 5, 0)) == (7, 38, 4096, 5)
    with pytest.raises(p.ProtocolError):
        f.parse_init(b"\0" * 8)
    assert f.parse_name(b"tpmrm0\0") == b"tpmrm0"
    with pytest.raises(p.ProtocolError):
        f.parse_name(b"no-nul")


def test_entry_and_attr_replies_carry_the_attributes() -> None:
    attr = f.Attr(2, stat.S_IFREG | 0o660, 1, 1000, 100)
    entry = f.reply_entry(4, attr)
    assert header(entry) == (16 + 128, 0, 4)
    nodeid, _gen, entry_valid, attr_valid = struct.unpack_from("=QQQQ", entry, 16)
    assert (nodeid, entry_valid, attr_valid) == (2, f.VALID_SECONDS, f.VALID_SECONDS)
    fields = f.ATTR.unpack_from(entry, 16 + 40)
    assert (fields[0], fields[9], fields[10], fields[11], fields[12]) == (2, stat.S_IFREG | 0o660, 1, 1000, 100)
    got = f.reply_attr(6, attr)
    assert header(got) == (16 + 104, 0, 6) and f.ATTR.unpack_from(got, 32)[9] == stat.S_IFREG | 0o660


def test_readdir_pads_entries_and_stops_at_the_size_asked() -> None:
    root = f.Attr(1, stat.S_IFDIR | 0o755, 2, 0, 0)
    node = f.Attr(2, stat.S_IFREG | 0o660, 1, 0, 0)
    listing = [(b".", root), (b"..", root), (b"tpmrm0", node)]
    whole = f.reply_readdir(8, listing, 0, 4096)[16:]
    assert len(whole) == 3 * 32  # 24 bytes of fuse_dirent + a name of at most 8, padded to 8
    ino, off, namelen, kind = f.DIRENT.unpack_from(whole, 64)
    assert (ino, off, namelen, kind) == (2, 3, 6, stat.S_IFREG >> 12)
    assert whole[64 + 24 : 64 + 30] == b"tpmrm0"
    # From offset 2 on only the file; 40 bytes hold one entry of 32.
    assert f.reply_readdir(8, listing, 2, 40)[16:] == whole[64:]
    assert f.reply_readdir(8, listing, 0, 40)[16:] == whole[:32]
    assert f.reply_readdir(8, listing, 3, 4096)[16:] == b""


def test_statfs_and_errors() -> None:
    out = f.reply_statfs(3)
    assert header(out) == (16 + 80, 0, 3)
    assert struct.unpack_from("=II", out, 16 + 40) == (512, 255)
    assert header(f.reply_error(5)) == (16, -errno.ENOSYS, 5)


def test_notifications_are_unique_zero_with_the_code_in_error() -> None:
    inval = f.notify_inval_inode(2)
    assert header(inval) == (16 + 24, f.FUSE_NOTIFY_INVAL_INODE, 0)
    assert struct.unpack_from("=Qqq", inval, 16) == (2, -1, 0)
    entry = f.notify_inval_entry(1, b"a")
    assert header(entry) == (16 + 16 + 2, f.FUSE_NOTIFY_INVAL_ENTRY, 0) and entry.endswith(b"a\0")
    gone = f.notify_delete(1, 3, b"t1")
    assert header(gone) == (16 + 24 + 3, f.FUSE_NOTIFY_DELETE, 0)
    assert struct.unpack_from("=QQII", gone, 16) == (1, 3, 2, 0) and gone.endswith(b"t1\0")
