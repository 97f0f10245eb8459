# SPDX-License-Identifier: GPL-2.0-only
"""Every bad-input row of the spec's section 13 through the node: the kernel's answer, and
afterwards the daemon, a bystander space and the backing TPM unharmed (no leaked handles)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import termios
from dataclasses import dataclass
from typing import Callable

import pytest

from conftest import settled_backend_handles, swtpm_backend_handles
from helpers import create_primary, get_cap_handles, get_random, handles_of, rc, read_public, start_auth_session

libc = ctypes.CDLL(None, use_errno=True)
SYNTHESIZED = bytes.fromhex("80010000000a000b0143")


def syscall_errno(ret: int) -> int:
    return ctypes.get_errno() if ret < 0 else 0


class Node:
    """Raw file operations on the node, as a program would do them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fds: list[int] = []

    def open(self, flags: int = os.O_RDWR) -> int:
        fd = os.open(self.path, flags)
        self.fds.append(fd)
        return fd

    def cmd(self, fd: int, data: bytes) -> bytes:
        assert os.write(fd, data) == len(data)
        return os.read(fd, 4096)

    def close_all(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as exc:
        assert exc.errno is not None
        return exc.errno
    return 0


@dataclass
class Row:
    name: str
    run: Callable[[Node], object]
    #: expected result per kernel: an errno (int), or bytes compared with the result.
    want: dict[str, object]


def both(value: object) -> dict[str, object]:
    return {"6.1": value, "6.12": value}


def _write_big(n: Node) -> int:
    return errno_of(lambda: os.write(n.open(), b"\x80\x01" + b"\x00" * 4095))


def _short(n: Node) -> int:
    return errno_of(lambda: os.write(n.open(), b"\x80\x01\x00\x00\x00"))


def _header_too_big(n: Node) -> int:
    return errno_of(lambda: os.write(n.open(), get_random()[:11]))


def _zero_write(n: Node) -> int:
    return os.write(n.open(), b"")


def _ebusy(n: Node) -> int:
    fd = n.open()
    os.write(fd, get_random())
    return errno_of(lambda: os.write(fd, get_random()))


def _bad_vhandle(n: Node) -> int:
    return errno_of(lambda: os.write(n.open(), read_public(0x80FFFFFF)))


def _header_zero(n: Node) -> int:
    cmd = bytearray(get_random())
    cmd[2:6] = bytes(4)
    return errno_of(lambda: os.write(n.open(), bytes(cmd)))


def _unknown_cc(n: Node) -> bytes:
    return n.cmd(n.open(), struct.pack(">HII", 0x8001, 10, 0xFFFF))


def _tpm_error_passes(n: Node) -> int:
    return rc(n.cmd(n.open(), read_public(0x81000042)))


def _fourth_object(n: Node) -> int:
    fd = n.open()
    for _ in range(3):
        assert rc(n.cmd(fd, create_primary())) == 0
    return rc(n.cmd(fd, create_primary()))


def _fourth_session(n: Node) -> int:
    fd = n.open()
    for _ in range(3):
        assert rc(n.cmd(fd, start_auth_session())) == 0
    return rc(n.cmd(fd, start_auth_session()))


def _stuck_after_error(n: Node) -> object:
    fd = n.open()
    assert rc(n.cmd(fd, start_auth_session())) == 0
    assert errno_of(lambda: os.write(fd, read_public(0x80FFFFFE))) == errno.EINVAL
    return errno_of(lambda: n.cmd(fd, get_random())) or rc(n.cmd(fd, get_random()))


def _bad_write_pointer(n: Node) -> int:
    return syscall_errno(libc.write(n.open(), ctypes.c_void_p(4096), 12))


def _bad_read_pointer(n: Node) -> int:
    fd = n.open()
    os.write(fd, get_random())
    return syscall_errno(libc.read(fd, ctypes.c_void_p(4096), 4096))


def _write_rdonly(n: Node) -> int:
    return errno_of(lambda: os.write(n.open(os.O_RDONLY), get_random()))


def _read_wronly(n: Node) -> int:
    return errno_of(lambda: os.read(n.open(os.O_WRONLY), 4096))


def _read_idle(n: Node) -> bytes:
    return os.read(n.open(), 4096)


def _seek(n: Node) -> int:
    return errno_of(lambda: os.lseek(n.open(), 0, os.SEEK_SET))


def _pread(n: Node) -> int:
    return errno_of(lambda: os.pread(n.open(), 10, 0))


def _pwrite(n: Node) -> int:
    return errno_of(lambda: os.pwrite(n.open(), get_random(), 0))


def _ioctl(n: Node) -> int:
    return errno_of(lambda: fcntl.ioctl(n.open(), termios.TCGETS, bytes(64)))


def _close(n: Node) -> int:
    fd = n.open()
    os.write(fd, get_random())
    n.fds.remove(fd)
    os.close(fd)
    return 0


ROWS = [
    Row("write > 4096 bytes: E2BIG", _write_big, both(errno.E2BIG)),
    Row("write < 6 bytes: EINVAL", _short, both(errno.EINVAL)),
    Row("header size > write size: EINVAL", _header_too_big, both(errno.EINVAL)),
    # FUSE answers a zero-length write itself (the kernel's tpmrm says EINVAL): README.
    Row("write of 0 bytes (FUSE: 0)", _zero_write, both(0)),
    Row("unread response: EBUSY", _ebusy, both(errno.EBUSY)),
    Row("empty vhandle in the handle area: EINVAL", _bad_vhandle, both(errno.EINVAL)),
    Row("header size 0: ENODATA", _header_zero, both(errno.ENODATA)),
    Row("unknown command code: synthesized response", _unknown_cc, both(SYNTHESIZED)),
    Row("TPM error rc passes through", _tpm_error_passes, both(0x18B)),
    Row("fourth object: the TPM's OBJECT_MEMORY", _fourth_object, both(0x902)),
    Row("fourth session: the TPM's SESSION_HANDLES", _fourth_session, both(0x903)),
    Row(
        "after an error with a session: 6.1 EFAULT, 6.12 forgets", _stuck_after_error, {"6.1": errno.EFAULT, "6.12": 0}
    ),  # fmt: skip
    Row("unreadable write buffer: EFAULT", _bad_write_pointer, both(errno.EFAULT)),
    Row("unwritable read buffer: EFAULT", _bad_read_pointer, both(errno.EFAULT)),
    Row("write on O_RDONLY: EBADF", _write_rdonly, both(errno.EBADF)),
    Row("read on O_WRONLY: EBADF", _read_wronly, both(errno.EBADF)),
    Row("read with nothing pending: 0 bytes", _read_idle, both(b"")),
    Row("lseek: ESPIPE", _seek, both(errno.ESPIPE)),
    Row("pread: ESPIPE", _pread, both(errno.ESPIPE)),
    Row("pwrite: ESPIPE", _pwrite, both(errno.ESPIPE)),
    Row("ioctl: ENOTTY", _ioctl, both(errno.ENOTTY)),
    Row("close with a response pending: 0", _close, both(0)),
]


@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_bad_input_table(daemon, kernel):
    d = daemon(kernel, inspectable=True)
    node = Node(str(d.node))
    baseline = settled_backend_handles(d)
    assert baseline.transient == [] and baseline.loaded_sessions == [] and baseline.saved_sessions == []

    # A bystander space with an object and a session, open through all the bad input.
    bystander = os.open(d.node, os.O_RDWR)
    assert rc(node.cmd(bystander, create_primary())) == 0
    session = struct.unpack(">I", node.cmd(bystander, start_auth_session())[10:14])[0]

    failures = []
    for row in ROWS:
        try:
            got = row.run(node)
        except Exception as exc:  # a row must not raise: record it as a failure
            got = f"raised {exc!r}"
        finally:
            node.close_all()
        if got != row.want[kernel]:
            failures.append(f"{row.name}: want {row.want[kernel]!r}, got {got!r}")
    assert not failures, "\n".join(failures)

    # The daemon still serves, and the bystander still has its object and its session.
    fresh = node.open()
    assert rc(node.cmd(fresh, get_random())) == 0
    assert handles_of(node.cmd(bystander, get_cap_handles())) == [0x80FFFFFF]
    assert rc(node.cmd(bystander, read_public(0x80FFFFFF))) == 0
    assert session in handles_of(node.cmd(bystander, get_cap_handles(0x02000000)))
    node.close_all()
    os.close(bystander)

    # The backing TPM is back to its baseline: nothing leaked by any row.
    assert settled_backend_handles(d) == baseline
    assert swtpm_backend_handles(d) == baseline
