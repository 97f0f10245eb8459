# SPDX-License-Identifier: GPL-2.0-only
"""The guest figure's Python relays answer CUSE requests as the C relay does, on one thread
and on trio.  Here their target is a node's FUSE file, which runs a blocking write's command
in the write, as the kernel's /dev/tpmrm0 does (the guest run: test_bench's small guest
figure)."""

import errno
import functools
import os
import select
import socket
import threading
from pathlib import Path

import pytest
import trio

from cusetpm.frontends import cuse_proto as proto
from cusetpm.testing.py_cuse_relay import READY, WRITABLE, Relay, relay_loop, trio_relay_loop

GET_RANDOM_16 = bytes.fromhex("80010000000c0000017b0010")


def request(opcode: proto.Opcode, unique: int, body: bytes) -> bytes:
    return proto.build_request(int(opcode), unique, body, uid=os.getuid(), gid=os.getgid(), pid=os.getpid())


def answer(reply: bytes | None, unique: int) -> tuple[int, bytes]:
    """A reply's error (0 or -errno) and payload, checked against its header."""
    assert reply is not None
    length, error, got = proto.OUT_HEADER.unpack_from(reply)
    assert (length, got) == (len(reply), unique)
    return error, reply[proto.OUT_HEADER.size :]


def test_a_command_written_is_read_back_in_parts_and_polls_say_when(node: Path) -> None:
    relay = Relay(str(node))
    error, body = answer(relay.handle(request(proto.Opcode.OPEN, 1, proto.OPEN_IN.pack(os.O_RDWR, 0))), 1)
    fh = proto.OPEN_OUT.unpack(body)[0]
    assert error == 0 and list(relay.files) == [fh]

    def poll(unique: int) -> int:
        error, body = answer(relay.handle(request(proto.Opcode.POLL, unique, proto.POLL_IN.pack(fh, 0, 0, 0))), unique)
        assert error == 0
        return proto.POLL_OUT.unpack(body)[0]

    def read(unique: int, size: int) -> bytes:
        body = proto.READ_IN.pack(fh, 0, size, 0, 0, os.O_RDWR, 0)
        error, data = answer(relay.handle(request(proto.Opcode.READ, unique, body)), unique)
        assert error == 0
        return data

    assert poll(2) == WRITABLE and not WRITABLE & select.POLLIN
    write = proto.WRITE_IN.pack(fh, 0, len(GET_RANDOM_16), 0, 0, os.O_RDWR, 0) + GET_RANDOM_16
    error, body = answer(relay.handle(request(proto.Opcode.WRITE, 3, write)), 3)
    assert error == 0 and proto.WRITE_OUT.unpack(body)[0] == len(GET_RANDOM_16)
    assert poll(4) == READY and READY & select.POLLIN
    first, rest = read(5, 10), read(6, 4096)
    response = first + rest
    assert len(first) == 10 and len(response) == 10 + 2 + 16
    assert response[:10] == bytes.fromhex("80010000001c00000000")  # 28 bytes, TPM_RC_SUCCESS
    assert poll(7) == WRITABLE and read(8, 4096) == b""  # nothing pending: 0 bytes

    error, _ = answer(relay.handle(request(proto.Opcode.RELEASE, 9, proto.RELEASE_IN.pack(fh, 0, 0, 0))), 9)
    assert error == 0 and relay.files == {} and relay.pending == {}


def test_the_targets_errors_are_the_callers_errnos(tmp_path: Path) -> None:
    relay = Relay(str(tmp_path / "no-tpm"))
    error, _ = answer(relay.handle(request(proto.Opcode.OPEN, 1, proto.OPEN_IN.pack(os.O_RDWR, 0))), 1)
    assert error == -errno.ENOENT and relay.files == {}
    error, _ = answer(relay.handle(request(proto.Opcode.IOCTL, 2, b"\0" * 32)), 2)
    assert error == -errno.ENOTTY  # what the protocol layer answers for the rest


def _as_the_kernel(ours: socket.socket) -> None:
    """What the kernel sends a CUSE daemon, on our end of a channel: CUSE_INIT, then open,
    a command, its response read back, release; each reply checked."""
    ours.send(request(proto.Opcode.CUSE_INIT, 1, proto.CUSE_INIT_IN.pack(7, 31, 0, 0)))
    error, body = answer(ours.recv(65536), 1)
    assert error == 0 and b"DEVNAME=relayed\0" in body
    ours.send(request(proto.Opcode.OPEN, 2, proto.OPEN_IN.pack(os.O_RDWR, 0)))
    error, body = answer(ours.recv(65536), 2)
    fh = proto.OPEN_OUT.unpack(body)[0]
    write = proto.WRITE_IN.pack(fh, 0, len(GET_RANDOM_16), 0, 0, os.O_RDWR, 0) + GET_RANDOM_16
    ours.send(request(proto.Opcode.WRITE, 3, write))
    assert answer(ours.recv(65536), 3) == (0, proto.WRITE_OUT.pack(len(GET_RANDOM_16), 0))
    ours.send(request(proto.Opcode.READ, 4, proto.READ_IN.pack(fh, 0, 4096, 0, 0, os.O_RDWR, 0)))
    error, data = answer(ours.recv(65536), 4)
    assert error == 0 and data[:10] == bytes.fromhex("80010000001c00000000")
    ours.send(request(proto.Opcode.RELEASE, 5, proto.RELEASE_IN.pack(fh, 0, 0, 0)))
    assert answer(ours.recv(65536), 5) == (0, b"")


@pytest.mark.parametrize("loop", ["thread", "trio"])
def test_the_relay_loops_serve_a_channel_from_cuse_init_until_it_goes_away(node: Path, loop: str) -> None:
    """Both loops (one thread blocking in read(); trio, as the node's request loop) on a
    SEQPACKET pair standing in for /dev/cuse: they end when it does."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(30)
    if loop == "trio":
        theirs.setblocking(False)
        run = functools.partial(trio.run, trio_relay_loop, theirs.fileno(), "relayed", str(node), 100e-6)
    else:
        run = functools.partial(relay_loop, theirs.fileno(), "relayed", str(node))
    served = threading.Thread(target=run)
    served.start()
    try:
        _as_the_kernel(ours)
    finally:
        ours.close()
        served.join(30)
        theirs.close()
    assert not served.is_alive()
