# SPDX-License-Identifier: GPL-2.0-only
"""The CUSE wire protocol, checked byte by byte against include/uapi/linux/fuse.h.

Requests are built by hand with struct (not with cuse_proto's own builders) so a
wrong layout in the module cannot hide behind the same wrong layout here.
"""

from __future__ import annotations

import errno
import os
import select
import struct

import pytest

from cusetpm.frontends import cuse_proto as p

# fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
HDR = "=IIQQIIIHH"


def frame(opcode: int, unique: int, body: bytes, *, uid=1000, gid=100, pid=4242) -> bytes:
    return struct.pack(HDR, 40 + len(body), opcode, unique, 0, uid, gid, pid, 0, 0) + body


def out_header(data: bytes) -> tuple[int, int, int]:
    return struct.unpack_from("=IiQ", data)


def test_struct_sizes_match_fuse_h() -> None:
    assert p.IN_HEADER.size == 40
    assert p.OUT_HEADER.size == 16
    assert p.CUSE_INIT_IN.size == 16
    assert p.CUSE_INIT_OUT.size == 72  # 8 u32 + spare[10]
    assert p.OPEN_OUT.size == 16
    assert p.READ_IN.size == p.WRITE_IN.size == 40
    assert p.RELEASE_IN.size == p.FLUSH_IN.size == 24
    assert p.POLL_IN.size == 24
    assert p.IOCTL_IN.size == 32
    assert p.NOTIFY_POLL_WAKEUP_OUT.size == 8


def test_parse_header_fields() -> None:
    req = p.parse_request(frame(14, 0x1234, struct.pack("=II", os.O_RDWR, 0)))
    assert req.header == p.InHeader(48, 14, 0x1234, 0, 1000, 100, 4242)
    assert req.unique == 0x1234


def test_parse_cuse_init() -> None:
    req = p.parse_request(frame(4096, 2, struct.pack("=IIII", 7, 41, 0, 1)))
    assert req == p.CuseInit(req.header, major=7, minor=41, flags=p.CUSE_UNRESTRICTED_IOCTL)


def test_parse_open() -> None:
    flags = os.O_RDWR | os.O_NONBLOCK
    req = p.parse_request(frame(14, 4, struct.pack("=II", flags, 0)))
    assert isinstance(req, p.Open)
    assert (req.flags, req.open_flags) == (flags, 0)


@pytest.mark.parametrize("flags, nonblock", [(os.O_RDWR, False), (os.O_RDWR | os.O_NONBLOCK, True)])
def test_parse_read_exposes_per_call_nonblock(flags: int, nonblock: bool) -> None:
    body = struct.pack("=QQIIQII", 7, 0, 4096, 0, 0, flags, 0)
    req = p.parse_request(frame(15, 6, body))
    assert isinstance(req, p.Read)
    assert (req.fh, req.offset, req.size, req.flags) == (7, 0, 4096, flags)
    assert req.nonblock is nonblock


@pytest.mark.parametrize("flags, nonblock", [(os.O_RDWR, False), (os.O_RDWR | os.O_NONBLOCK, True)])
def test_parse_write_carries_data_and_nonblock(flags: int, nonblock: bool) -> None:
    data = bytes(range(10))
    body = struct.pack("=QQIIQII", 3, 0, len(data), 0, 0, flags, 0) + data
    req = p.parse_request(frame(16, 8, body))
    assert isinstance(req, p.Write)
    assert (req.fh, req.size, req.data, req.flags) == (3, 10, data, flags)
    assert req.nonblock is nonblock


def test_parse_write_with_wrong_size_is_rejected() -> None:
    body = struct.pack("=QQIIQII", 3, 0, 11, 0, 0, 0, 0) + b"short"
    with pytest.raises(p.ProtocolError):
        p.parse_request(frame(16, 8, body))


def test_parse_release_and_flush() -> None:
    rel = p.parse_request(frame(18, 10, struct.pack("=QIIQ", 5, os.O_RDWR, 0, 99)))
    assert isinstance(rel, p.Release)
    assert (rel.fh, rel.flags, rel.release_flags, rel.lock_owner) == (5, os.O_RDWR, 0, 99)
    fl = p.parse_request(frame(25, 12, struct.pack("=QIIQ", 5, 0, 0, 77)))
    assert isinstance(fl, p.Flush)
    assert (fl.fh, fl.lock_owner) == (5, 77)


@pytest.mark.parametrize("flags, notify", [(0, False), (p.FUSE_POLL_SCHEDULE_NOTIFY, True)])
def test_parse_poll(flags: int, notify: bool) -> None:
    events = select.POLLIN | select.POLLOUT
    req = p.parse_request(frame(40, 14, struct.pack("=QQII", 5, 0xABCDEF, flags, events)))
    assert isinstance(req, p.Poll)
    assert (req.fh, req.kh, req.events) == (5, 0xABCDEF, events)
    assert req.schedule_notify is notify


def test_parse_interrupt_names_the_target() -> None:
    # The kernel sets FUSE_INT_REQ_BIT in the interrupt's own unique.
    req = p.parse_request(frame(36, 16 | 1, struct.pack("=Q", 16)))
    assert isinstance(req, p.Interrupt)
    assert req.target == 16
    assert p.default_reply(req) is None  # never answered, or interrupts stop for good


def test_parse_ioctl() -> None:
    body = struct.pack("=QIIQII", 5, p.FUSE_IOCTL_UNRESTRICTED, 0x5401, 0x7FFF0000, 0, 0)
    req = p.parse_request(frame(39, 18, body))
    assert isinstance(req, p.Ioctl)
    assert (req.fh, req.cmd, req.arg, req.in_size, req.out_size) == (5, 0x5401, 0x7FFF0000, 0, 0)
    assert req.data == b""


def test_parse_destroy_and_unknown() -> None:
    assert isinstance(p.parse_request(frame(38, 20, b"")), p.Destroy)
    fsync = p.parse_request(frame(20, 22, struct.pack("=QII", 5, 0, 0)))
    assert isinstance(fsync, p.Unknown)
    assert fsync.header.opcode == 20
    assert fsync.body == struct.pack("=QII", 5, 0, 0)


def test_parse_rejects_truncated_and_mislabelled_buffers() -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_request(b"\0" * 39)
    good = frame(15, 6, struct.pack("=QQIIQII", 7, 0, 10, 0, 0, 0, 0))
    with pytest.raises(p.ProtocolError):
        p.parse_request(good[:-1])  # header length no longer matches
    with pytest.raises(p.ProtocolError):
        p.parse_request(frame(15, 6, b"\0" * 8))  # body too short for fuse_read_in


def test_reads_and_polls_parse_lean_to_the_same_fields() -> None:
    """parse_read_or_poll() (the request loop's path for reads and polls) gives the fields
    parse_request() gives, and None for every other request and for malformed ones."""
    rd = frame(15, 6, struct.pack("=QQIIQII", 3, 0, 4096, 0, 0, os.O_RDWR | os.O_NONBLOCK, 0))
    pl = frame(40, 8, struct.pack("=QQII", 3, 77, p.FUSE_POLL_SCHEDULE_NOTIFY, select.POLLIN))
    assert p.parse_read_or_poll(rd) == (15, 6, 3, 4096, os.O_RDWR | os.O_NONBLOCK)
    assert p.parse_read_or_poll(pl) == (40, 8, 3, 77, p.FUSE_POLL_SCHEDULE_NOTIFY)
    write = frame(16, 10, struct.pack("=QQIIQII", 3, 0, 24, 0, 0, 0, 0) + bytes(24))  # 88 bytes
    release = frame(18, 12, struct.pack("=QIIQ", 3, 0, 0, 0))  # 64 bytes, as a poll
    open_ = frame(14, 14, struct.pack("=II", 0, 0) + bytes(32))  # 80 bytes, as a read
    zero_unique = frame(15, 0, struct.pack("=QQIIQII", 3, 0, 4096, 0, 0, 0, 0))
    liar = bytearray(rd)
    struct.pack_into("=I", liar, 0, 81)  # says 81 bytes
    trailing = frame(40, 16, struct.pack("=QQII", 3, 77, 0, select.POLLIN) + b"\0")
    for buf in (write, release, open_, zero_unique, bytes(liar), rd[:-1], trailing):
        assert p.parse_read_or_poll(buf) is None
    assert isinstance(p.parse_request(trailing), p.Poll)  # left to parse_request, which takes it


def test_reply_cuse_init_layout_and_devname() -> None:
    data = p.reply_cuse_init(2, "tpmrm0", kernel_minor=41, kernel_flags=1, dev_major=10, dev_minor=224)
    info = b"DEVNAME=tpmrm0\0"
    assert out_header(data) == (16 + 72 + len(info), 0, 2)
    fields = struct.unpack_from("=8I", data, 16)
    # major, minor (capped to what we know), unused, flags, max_read, max_write, dev_major, dev_minor
    assert fields == (7, p.SUPPORTED_MINOR, 0, 1, 128 * 1024, 128 * 1024, 10, 224)
    assert data[16 + 32 : 16 + 72] == b"\0" * 40  # spare[10]
    assert data[16 + 72 :] == info


def test_reply_cuse_init_keeps_older_minor_and_drops_unknown_flags() -> None:
    data = p.reply_cuse_init(2, "x", kernel_minor=23, kernel_flags=0xFF)
    major, minor, _, flags = struct.unpack_from("=4I", data, 16)
    assert (major, minor, flags) == (7, 23, p.CUSE_UNRESTRICTED_IOCTL)
    with pytest.raises(ValueError):
        p.reply_cuse_init(2, "x", kernel_minor=10)


@pytest.mark.parametrize("name", ["", " tpm", "a/b", "a\0b", "a=b", "t\u00e9"])
def test_bad_devnames_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        p.reply_cuse_init(2, name, kernel_minor=41)


def test_reply_open_is_nonseekable_direct_io() -> None:
    data = p.reply_open(4, 9)
    assert out_header(data) == (32, 0, 4)
    fh, open_flags, backing_id = struct.unpack_from("=QIi", data, 16)
    assert (fh, backing_id) == (9, 0)
    assert open_flags == p.FOPEN_DIRECT_IO | p.FOPEN_NONSEEKABLE == 0b101


def test_reply_read_write_poll() -> None:
    assert p.reply_read(6, b"abc") == struct.pack("=IiQ", 19, 0, 6) + b"abc"
    assert p.reply_read(6, b"") == struct.pack("=IiQ", 16, 0, 6)
    assert p.reply_write(8, 10) == struct.pack("=IiQII", 24, 0, 8, 10, 0)
    mask = select.POLLIN | select.POLLRDNORM
    assert p.reply_poll(14, mask) == struct.pack("=IiQII", 24, 0, 14, mask, 0)
    assert p.reply(10) == struct.pack("=IiQ", 16, 0, 10)


def test_reply_error_negates_errno() -> None:
    assert p.reply_error(6, errno.EAGAIN) == struct.pack("=IiQ", 16, -errno.EAGAIN, 6)
    assert p.reply_error(6, errno.EINTR) == struct.pack("=IiQ", 16, -errno.EINTR, 6)
    for bad in (0, -5, 512):
        with pytest.raises(ValueError):
            p.reply_error(6, bad)


def test_notify_poll_layout() -> None:
    data = p.notify_poll(0x1122334455667788)
    # unique 0 marks a notification; the error field carries FUSE_NOTIFY_POLL (1)
    assert data == struct.pack("=IiQQ", 24, 1, 0, 0x1122334455667788)


def test_ioctl_is_answered_enotty() -> None:
    req = p.parse_request(frame(39, 18, struct.pack("=QIIQII", 5, 2, 0x5401, 0, 0, 0)))
    assert p.default_reply(req) == struct.pack("=IiQ", 16, -errno.ENOTTY, 18)


@pytest.mark.parametrize("opcode", [20, 1, 3, 46, 999])  # FSYNC, LOOKUP, SETATTR, LSEEK, bogus
def test_unknown_opcodes_are_answered_enosys(opcode: int) -> None:
    req = p.parse_request(frame(opcode, 22, b"\0" * 16))
    assert p.default_reply(req) == struct.pack("=IiQ", 16, -errno.ENOSYS, 22)


def test_forget_gets_no_reply_flush_and_destroy_succeed() -> None:
    assert p.default_reply(p.parse_request(frame(2, 24, struct.pack("=Q", 1)))) is None
    assert p.default_reply(p.parse_request(frame(42, 26, b"\0" * 8))) is None
    flush = p.parse_request(frame(25, 28, struct.pack("=QIIQ", 5, 0, 0, 0)))
    assert p.default_reply(flush) == struct.pack("=IiQ", 16, 0, 28)
    assert p.default_reply(p.parse_request(frame(38, 30, b""))) == struct.pack("=IiQ", 16, 0, 30)


def test_build_request_round_trips() -> None:
    raw = p.build_request(p.Opcode.POLL, 40, struct.pack("=QQII", 1, 2, 1, 1), pid=7)
    req = p.parse_request(raw)
    assert isinstance(req, p.Poll)
    assert (req.unique, req.header.pid, req.kh) == (40, 7, 2)


def test_read_buffer_holds_the_largest_write() -> None:
    assert p.READ_BUFFER_SIZE >= p.IN_HEADER.size + p.WRITE_IN.size + p.DEFAULT_MAX_WRITE
    assert p.READ_BUFFER_SIZE >= p.FUSE_MIN_READ_BUFFER
