# SPDX-License-Identifier: GPL-2.0-only
"""The CUSE front end (cusetpm.cuse) at work.

Two layers:

* in-process: the request loop talks to a fake kernel over an AF_UNIX
  SOCK_SEQPACKET socket pair, which keeps message boundaries like /dev/cuse.
  This checks dispatch, concurrency, interrupts and poll notifications fast,
  on any host;
* real kernels: ``cuse_guest_check.py`` runs inside the rig's qemu guest
  (Debian 6.1 and 6.12, /dev/cuse present) against ``cuse_echo_server.py``,
  so every claim about what a client sees is checked with real syscalls.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from cuse_echo_server import EchoDevice

from cusetpm.daemon.node import Opener
from cusetpm.frontends import cuse_proto as p
from cusetpm.frontends.cuse import PROBE_FH, _Server

HERE = Path(__file__).resolve().parent


class FakeKernel:
    """The kernel's side of the channel: sends requests, routes replies by ``unique``."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.next_unique = 2  # the kernel steps by 2; bit 0 marks interrupts
        self.replies: dict[int, tuple[int, bytes]] = {}
        self.notifications: list[bytes] = []
        self.arrived = trio.Event()

    async def receive_loop(self) -> None:
        while True:
            data = await self.sock.recv(1 << 20)
            if not data:
                return
            length, error, unique = p.OUT_HEADER.unpack_from(data)
            assert length == len(data)
            if unique == 0:
                self.notifications.append(data)
            else:
                assert unique not in self.replies, f"second reply to {unique}"
                self.replies[unique] = (error, data[p.OUT_HEADER.size :])
            self.arrived.set()
            self.arrived = trio.Event()

    async def send(self, opcode: int, body: bytes = b"", *, pid: int = 1234, uid: int = 1000, gid: int = 100) -> int:
        unique = self.next_unique
        self.next_unique += 2
        await self.sock.send(p.build_request(opcode, unique, body, uid=uid, gid=gid, pid=pid))
        return unique

    async def result(self, unique: int, timeout: float = 5) -> tuple[int, bytes]:
        with trio.fail_after(timeout):
            while unique not in self.replies:
                await self.arrived.wait()
        return self.replies.pop(unique)

    async def call(self, opcode: int, body: bytes = b"", **kw: int) -> tuple[int, bytes]:
        return await self.result(await self.send(opcode, body, **kw))

    async def open(self, flags: int = os.O_RDWR) -> int:
        error, out = await self.call(p.Opcode.OPEN, struct.pack("=II", flags, 0))
        assert error == 0
        fh, open_flags, _ = p.OPEN_OUT.unpack(out)
        assert open_flags == p.FOPEN_DIRECT_IO | p.FOPEN_NONSEEKABLE
        return fh

    async def write(self, fh: int, data: bytes, flags: int = os.O_RDWR) -> tuple[int, bytes]:
        body = p.WRITE_IN.pack(fh, 0, len(data), 0, 0, flags, 0) + data
        return await self.call(p.Opcode.WRITE, body)

    def read_body(self, fh: int, size: int = 4096, flags: int = os.O_RDWR) -> bytes:
        return p.READ_IN.pack(fh, 0, size, 0, 0, flags, 0)

    async def release(self, fh: int) -> tuple[int, bytes]:
        return await self.call(p.Opcode.RELEASE, p.RELEASE_IN.pack(fh, os.O_RDWR, 0, 0))


Body = Callable[[FakeKernel, EchoDevice, _Server], Awaitable[None]]


def run_channel(body: Body, name: str = "echo0") -> bytes:
    """Run ``body`` against a served EchoDevice; returns the CUSE_INIT reply."""
    init_reply = b""

    async def main() -> None:
        nonlocal init_reply
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        with ours, theirs:
            kernel = FakeKernel(trio.socket.from_stdlib_socket(theirs))
            async with trio.open_nursery() as nursery:
                device = EchoDevice(nursery)
                server = _Server(ours.fileno(), device, name)
                await kernel.sock.send(p.build_request(p.Opcode.CUSE_INIT, 1, struct.pack("=IIII", 7, 41, 0, 1)))
                await server.handshake(0, 0)
                init_reply = await kernel.sock.recv(1 << 16)
                nursery.start_soon(kernel.receive_loop)
                nursery.start_soon(server.request_loop, nursery)
                await body(kernel, device, server)
                nursery.cancel_scope.cancel()

    trio.run(main)
    return init_reply


def test_handshake_names_the_device() -> None:
    async def nothing(k: FakeKernel, d: EchoDevice, s: _Server) -> None:
        pass

    data = run_channel(nothing, name="tpmrm7")
    length, error, unique = p.OUT_HEADER.unpack_from(data)
    assert (length, error, unique) == (len(data), 0, 1)
    major, minor, _, flags, max_read, max_write, dev_major, dev_minor = struct.unpack_from("=8I", data, 16)
    assert (major, minor, flags) == (7, p.SUPPORTED_MINOR, p.CUSE_UNRESTRICTED_IOCTL)
    assert (dev_major, dev_minor) == (0, 0)
    assert data.endswith(b"DEVNAME=tpmrm7\0")


def test_open_write_read_release() -> None:
    async def body(k: FakeKernel, d: EchoDevice, s: _Server) -> None:
        fh = await k.open(os.O_RDWR | os.O_NONBLOCK)
        assert d.open_flags == [os.O_RDWR | os.O_NONBLOCK]
        assert d.openers == [Opener(uid=1000, gid=100, pid=1234)]  # who opened reaches the device
        assert await k.write(fh, b"hello") == (0, p.WRITE_OUT.pack(5, 0))
        assert await k.call(p.Opcode.READ, k.read_body(fh)) == (0, b"hello")
        assert await k.release(fh) == (0, b"")
        assert (d.opens, d.releases) == (1, 1)
        assert s.files == {}

    run_channel(body)


def test_nonblock_flag_is_passed_per_call() -> None:
    async def body(k: FakeKernel, d: EchoDevice, s: _Server) -> None:
        fh = await k.open()
        for flags, want in ((os.O_RDWR, b"nonblock=0"), (os.O_RDWR | os.O_NONBLOCK, b"nonblock=1")):
            assert (await k.write(fh, b"nonblock?", flags))[0] == 0
            assert await k.call(p.Opcode.READ, k.read_body(fh)) == (0, want)
        # Nothing pending: a non-blocking read fails at once.
        read = k.read_body(fh, flags=os.O_RDWR | os.O_NONBLOCK)
        assert await k.call(p.Opcode.READ, read) == (-errno.EAGAIN, b"")

    run_channel(body)


def test_device_errors_become_negative_errno() -> None:
    async def body(k: FakeKernel, d: EchoDevice, s: _Server) -> None:
        fh = await k.open()
        assert (await k.write(fh, b"one"))[0] == 0
        assert await k.write(fh, b"two") == (-errno.EBUSY, b"")
        assert await k.call(p.Opcode.READ, k.read_body(fh + 100)) == (-errno.EBADF, b"")

    run_channel(body)


def test_unexpected_exception_is_eio() -> None:
    async def body(k: FakeKernel, d: EchoDevice, s: _Server) -> None:
        fh = await k.open()

        async def broken(size: int, nonblock: bool) -> bytes:
            raise KeyError("bug")

        s.files[fh].read = broken  # type: ignore[method-assign]
        assert await k.call(p.Opcode.READ, k.read_body(fh)) == (-errno.EIO, b"")
        assert (await k.write(fh, b"still served"))[0] == 0

    run_channel(body)


def test_blocked_read_does_not_stall_other_files() -> None:
    async def body(k: FakeKernel, d: EchoDevice, s: _Server) -> None:
        slow, fast = await k.open(), await k.open()
        blocked = await k.send(p.Opcode.READ, k.read_body(slow))
        for i in range(10):
            msg = b"msg %d" % i
            assert (await k.write(fast, msg))[0] == 0
            assert await k.call(p.Opcode.READ, k.read_body(fast)) == (0, msg)
        assert blocked not in k.replies
        assert (await k.write(slow, b"at last"))[0] == 0
        assert await k.result(blocked) == (0, b"at last")

    run_channel(body)


def test_interrupt_cancels_the_request_with_eintr() -> None:
    async def body(k: FakeKernel, d: EchoDevice, s: _Server) -> None:
        fh = await k.open()
        blocked = await k.send(p.Opcode.READ, k.read_body(fh))
        await trio.sleep(0.05)
        assert blocked in s.inflight
        await k.sock.send(p.build_request(p.Opcode.INTERRUPT, blocked | p.FUSE_INT_REQ_BIT, struct.pack("=Q", blocked)))
        assert await k.result(blocked) == (-errno.EINTR, b"")
        assert d.cancelled_reads == 1
        assert s.inflight == {}
        # An interrupt for a request already answered is ignored (and not answered).
        await k.sock.send(p.build_request(p.Opcode.INTERRUPT, blocked | p.FUSE_INT_REQ_BIT, struct.pack("=Q", blocked)))
        # The file is intact.
        assert (await k.write(fh, b"again"))[0] == 0
        assert await k.call(p.Opcode.READ, k.read_body(fh)) == (0, b"again")
        assert k.replies == {}

    run_channel(body)


def test_poll_with_schedule_notify_gets_a_notification() -> None:
    async def body(k: FakeKernel, d: EchoDevice, s: _Server) -> None:
        fh = await k.open()
        kh = 0xFEED
        poll = p.POLL_IN.pack(fh, kh, p.FUSE_POLL_SCHEDULE_NOTIFY, select.POLLIN)
        error, out = await k.call(p.Opcode.POLL, poll)
        assert error == 0
        assert p.POLL_OUT.unpack(out)[0] == select.POLLOUT | select.POLLWRNORM
        assert k.notifications == []
        assert (await k.write(fh, b"delay:0.1:x"))[0] == 0
        # The write itself changed readiness (no more POLLOUT): the device woke us.
        assert k.notifications == [p.notify_poll(kh)]
        error, out = await k.call(p.Opcode.POLL, poll)
        assert p.POLL_OUT.unpack(out)[0] == 0
        with trio.fail_after(2):
            while len(k.notifications) < 2:
                await k.arrived.wait()
        assert k.notifications[1] == p.notify_poll(kh)
        error, out = await k.call(p.Opcode.POLL, poll)
        assert p.POLL_OUT.unpack(out)[0] == select.POLLIN | select.POLLRDNORM

    run_channel(body)


def test_poll_without_schedule_notify_gets_no_waker() -> None:
    async def body(k: FakeKernel, d: EchoDevice, s: _Server) -> None:
        fh = await k.open()
        error, _ = await k.call(p.Opcode.POLL, p.POLL_IN.pack(fh, 5, 0, select.POLLIN))
        assert error == 0
        assert s.files[fh].wakers == []  # type: ignore[attr-defined]
        assert (await k.write(fh, b"x"))[0] == 0
        await trio.sleep(0.05)
        assert k.notifications == []

    run_channel(body)


def test_requests_needing_no_device() -> None:
    async def body(k: FakeKernel, d: EchoDevice, s: _Server) -> None:
        fh = await k.open()
        ioctl = p.IOCTL_IN.pack(fh, p.FUSE_IOCTL_UNRESTRICTED, 0x5401, 0, 0, 0)
        assert await k.call(p.Opcode.IOCTL, ioctl) == (-errno.ENOTTY, b"")
        assert await k.call(p.Opcode.FSYNC, struct.pack("=QII", fh, 0, 0)) == (-errno.ENOSYS, b"")
        assert await k.call(p.Opcode.FLUSH, p.FLUSH_IN.pack(fh, 0, 0, 0)) == (0, b"")
        assert await k.call(777, b"") == (-errno.ENOSYS, b"")
        forget = await k.send(p.Opcode.FORGET, struct.pack("=Q", 1))
        assert await k.call(p.Opcode.CUSE_INIT, struct.pack("=IIII", 7, 41, 0, 0)) == (
            -errno.EPROTO,
            b"",
        )
        assert forget not in k.replies
        assert await k.call(p.Opcode.DESTROY) == (0, b"")

    run_channel(body)


def test_probe_open_never_reaches_the_device() -> None:
    async def body(k: FakeKernel, d: EchoDevice, s: _Server) -> None:
        s.probe_tids.add(4321)
        error, out = await k.call(p.Opcode.OPEN, struct.pack("=II", os.O_RDWR, 0), pid=4321)
        assert error == 0 and p.OPEN_OUT.unpack(out)[0] == PROBE_FH
        assert await k.release(PROBE_FH) == (0, b"")
        assert (d.opens, d.releases) == (0, 0)
        assert await k.open() != PROBE_FH

    run_channel(body)


def test_teardown_releases_files_left_open() -> None:
    async def body(k: FakeKernel, d: EchoDevice, s: _Server) -> None:
        await k.open()
        await k.open()
        await s.release_all()
        assert (d.opens, d.releases, s.files) == (2, 2, {})

    run_channel(body)


def test_request_loop_ends_when_the_channel_closes() -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        with ours:
            async with trio.open_nursery() as nursery:
                server = _Server(ours.fileno(), EchoDevice(nursery), "echo0")
                theirs.close()
                with trio.fail_after(2):
                    await server.request_loop(nursery)

    trio.run(main)


# ---------------------------------------------------------------------------
# Real kernels


@pytest.mark.guest
@pytest.mark.parametrize("version", ["6.1", "6.12"])
def test_cuse_in_real_kernel(version: str) -> None:
    """Everything a client sees through a real /dev/cuse: see cuse_guest_check.py."""
    from cusetpm.rig import run_in_guest

    check = HERE / "cuse_guest_check.py"
    result = run_in_guest(version, f"{sys.executable} {check}", timeout=400)
    assert result.returncode == 0, result.output
    assert "ALL OK" in result.output
    for name in (
        "startup_probe_is_invisible",
        "poll_is_woken_by_notify",
        "blocked_read_does_not_stall_other_fds",
        "signal_interrupts_a_blocked_read",
        "sigkill_of_a_blocked_reader_is_prompt",
        "close_releases",
        "server_stops_cleanly",
        "fixed_major_minor",
    ):
        assert f"ok {name}" in result.output, result.output


@pytest.mark.guest
def test_signals_leave_the_tpm_node_consistent() -> None:
    """The real TPM device behind CUSE, in a 6.12 guest: slow commands interrupted by a
    signal every millisecond still return their real results (tpmrm's operations cannot be
    interrupted), and the space holds exactly the objects created."""
    from cusetpm.rig import run_in_guest

    here = Path(__file__).resolve().parent
    script = (
        f"{sys.executable} -m cusetpm serve --cuse tpmrmsig --state-dir /tmp/st --ready-fd 3 3>/tmp/ready >/tmp/d.log 2>&1 & "
        "for i in $(seq 150); do [ -s /tmp/ready ] && break; sleep 0.2; done; "
        f"{sys.executable} {here / 'cuse_signal_check.py'} /dev/tpmrmsig; rc=$?; "
        "kill -TERM %1 2>/dev/null || kill -TERM $(pgrep -f 'serve --cuse tpmrmsig'); wait; cat /tmp/d.log; exit $rc"
    )
    result = run_in_guest("6.12", script, timeout=600)
    assert result.returncode == 0 and "OK " in result.output, result.output + result.console[-2000:]


@pytest.mark.guest
def test_mode_owner_and_group_decide_who_may_open_the_cuse_node(tmp_path: Path) -> None:
    """In a 6.12 guest: /dev/NAME gets --mode/--owner/--group, and the kernel checks them,
    so ``nobody`` gets EACCES unless the node lets it in."""
    from cusetpm.rig import run_in_guest

    client = tmp_path / "client.py"
    client.write_text(
        "import errno, os, sys\n"
        "try:\n"
        "    fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "    os.write(fd, bytes.fromhex('80010000000c0000017b0008'))\n"
        "    print('got', len(os.read(fd, 4096)))\n"
        "except OSError as exc:\n"
        "    print('got', errno.errorcode[exc.errno])\n"
    )
    runs = [
        ("p0", ""),
        ("p1", "--owner nobody --mode 0600"),
        ("p2", "--group nogroup"),
        ("p3", "--group nogroup --mode 0600"),
    ]
    script = f"cp {client} /tmp/client.py && chmod 644 /tmp/client.py; "  # nobody cannot reach tmp_path
    for name, opts in runs:
        script += (
            f"rm -f /tmp/ready; {sys.executable} -m cusetpm serve --cuse {name} {opts} --state-dir /tmp/st-{name} "
            f"--ready-fd 3 3>/tmp/ready >/tmp/{name}.log 2>&1 & "
            "for i in $(seq 150); do [ -s /tmp/ready ] && break; sleep 0.2; done; "
            f"echo {name} $(stat -c '%a %U %G' /dev/{name}) "
            f"$(setpriv --reuid=nobody --regid=nogroup --clear-groups {sys.executable} /tmp/client.py /dev/{name}); "
            "kill -TERM $!; wait; "
        )
    # kill -9 leaves nothing that blocks the next start on the same name
    serve = f"{sys.executable} -m cusetpm serve --cuse p4 --state-dir /tmp/st-p4 --ready-fd 3 3>/tmp/ready"
    wait = "for i in $(seq 150); do [ -s /tmp/ready ] && break; sleep 0.2; done; "
    script += (
        f"rm -f /tmp/ready; {serve} >/tmp/p4a.log 2>&1 & {wait} kill -KILL $!; wait; "
        f"rm -f /tmp/ready; {serve} >/tmp/p4b.log 2>&1 & {wait} "
        f"echo p4 again $({sys.executable} /tmp/client.py /dev/p4); kill -TERM $!; wait; "
    )
    result = run_in_guest("6.12", script, timeout=600, share=str(tmp_path))
    assert result.returncode == 0, result.output
    for line in (
        "p4 again got 20",
        "p0 660 root root got EACCES",
        "p1 600 nobody root got 20",
        "p2 660 root nogroup got 20",
        "p3 600 root nogroup got EACCES",
    ):
        assert line in result.output, result.output
