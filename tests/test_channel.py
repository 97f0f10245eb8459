# SPDX-License-Identifier: GPL-2.0-only
"""The shared request loop (cusetpm.frontends.channel): its fast path and its slow one.

A fake kernel on an AF_UNIX SOCK_SEQPACKET pair (message boundaries, as /dev/fuse and
/dev/cuse keep them) sends requests; the files below say which path answered.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio

from cusetpm.frontends import cuse_proto as p
from cusetpm.frontends.channel import Channel, FileOps


class FastFile:
    """A file that answers everything at once; its async methods must never be called."""

    def __init__(self, pending: bytes = b"") -> None:
        self.pending = pending
        self.wakes: list[Callable[[], None]] = []

    def try_write(self, data: bytes, nonblock: bool) -> int | None:
        if not nonblock:
            return None
        if len(data) > 4096:
            raise OSError(errno.E2BIG, "too big")
        self.pending = data
        return len(data)

    def try_read(self, size: int) -> bytes | None:
        out, self.pending = self.pending[:size], b""
        return out

    def try_poll(self, wake: Callable[[], None] | None) -> int | None:
        if wake is not None:
            self.wakes.append(wake)
        return 1 if self.pending else 4

    async def write(self, data: bytes, nonblock: bool) -> int:
        self.pending = data[::-1]  # the slow path (a blocking write) answers differently
        await trio.sleep(0)
        return len(data)

    async def read(self, size: int, nonblock: bool) -> bytes:
        raise AssertionError("the fast path should have answered")

    async def poll(self, wake: Callable[[], None] | None) -> int:
        raise AssertionError("the fast path should have answered")

    async def release(self) -> None:
        return None


class BusyFile(FastFile):
    """A file whose lock is taken: every try_ says wait, and the slow read waits for an event."""

    def __init__(self) -> None:
        super().__init__()
        self.go = trio.Event()
        self.tries = 0

    def try_read(self, size: int) -> bytes | None:
        self.tries += 1
        return None

    def try_poll(self, wake: Callable[[], None] | None) -> int | None:
        self.tries += 1
        return None

    async def read(self, size: int, nonblock: bool) -> bytes:
        with trio.CancelScope(shield=False):
            await self.go.wait()
        return b"late"

    async def poll(self, wake: Callable[[], None] | None) -> int:
        await self.go.wait()
        return 1


class Server(Channel):
    def __init__(self, fd: int, make: Callable[[], FileOps]) -> None:
        super().__init__(fd, "test")
        self.make = make

    def open_file(self, req: p.Open) -> bytes:
        return p.reply_open(req.unique, self.add_file(self.make()))


Body = Callable[[trio.socket.SocketType, Server], Awaitable[None]]


async def call(sock: trio.socket.SocketType, opcode: int, body: bytes, unique: int) -> tuple[int, bytes]:
    await sock.send(p.build_request(opcode, unique, body))
    with trio.fail_after(5):
        data = await sock.recv(1 << 20)
    length, error, got = p.OUT_HEADER.unpack_from(data)
    assert got == unique and length == len(data)
    return error, data[p.OUT_HEADER.size :]


@contextlib.contextmanager
def served(make: Callable[[], FileOps], cls: type[Server] = Server) -> Iterator[tuple[Server, socket.socket]]:
    """A channel of class `cls` on one end of a socketpair (the kernel's side is the other)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    with ours, theirs:
        yield cls(ours.fileno(), make), theirs


def run(make: Callable[[], FileOps], body: Body) -> None:
    async def main() -> None:
        with served(make) as (server, theirs):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.request_loop, nursery)
                await body(trio.socket.from_stdlib_socket(theirs), server)
                nursery.cancel_scope.cancel()

    trio.run(main)


def read_in(fh: int, size: int = 4096, flags: int = os.O_RDWR) -> bytes:
    return p.READ_IN.pack(fh, 0, size, 0, 0, flags, 0)


def write_in(fh: int, data: bytes, flags: int = os.O_RDWR) -> bytes:
    return p.WRITE_IN.pack(fh, 0, len(data), 0, 0, flags, 0) + data


async def open_file(sock: trio.socket.SocketType) -> int:
    error, out = await call(sock, p.Opcode.OPEN, struct.pack("=II", os.O_RDWR, 0), 2)
    assert error == 0
    return p.OPEN_OUT.unpack(out)[0]


def test_what_needs_no_waiting_is_answered_in_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """And the reads and polls (four of a command's five requests) straight from their bytes
    (cuse_proto.parse_read_or_poll), never through parse_request()."""
    parsed: list[int] = []
    real = p.parse_request

    def counting(buf: bytes) -> p.Request:
        req = real(buf)
        parsed.append(req.header.opcode)
        return req

    monkeypatch.setattr(p, "parse_request", counting)

    async def body(sock: trio.socket.SocketType, server: Server) -> None:
        fh = await open_file(sock)
        error, out = await call(sock, p.Opcode.WRITE, write_in(fh, b"abc", os.O_RDWR | os.O_NONBLOCK), 4)
        assert (error, p.WRITE_OUT.unpack(out)[0]) == (0, 3)
        error, out = await call(sock, p.Opcode.POLL, p.POLL_IN.pack(fh, 77, p.FUSE_POLL_SCHEDULE_NOTIFY, 1), 6)
        assert (error, p.POLL_OUT.unpack(out)[0]) == (0, 1)
        assert await call(sock, p.Opcode.READ, read_in(fh), 8) == (0, b"abc")
        assert await call(sock, p.Opcode.READ, read_in(fh), 10) == (0, b"")
        assert server.inflight == {}
        # The poll asked for a wake-up: the callback sends FUSE_NOTIFY_POLL for kh 77.
        (wake,) = server.files[fh].wakes  # type: ignore[attr-defined]
        wake()
        with trio.fail_after(5):
            assert await sock.recv(1 << 16) == p.notify_poll(77)
        # An unknown file is no fast-path answer: parsed, and a task answers EBADF.
        assert await call(sock, p.Opcode.READ, read_in(fh + 1), 12) == (-errno.EBADF, b"")

    run(FastFile, body)
    assert parsed == [p.Opcode.OPEN, p.Opcode.WRITE, p.Opcode.READ]


def test_a_blocking_write_takes_the_slow_path() -> None:
    async def body(sock: trio.socket.SocketType, server: Server) -> None:
        fh = await open_file(sock)
        error, out = await call(sock, p.Opcode.WRITE, write_in(fh, b"abc"), 4)
        assert (error, p.WRITE_OUT.unpack(out)[0]) == (0, 3)
        assert await call(sock, p.Opcode.READ, read_in(fh), 6) == (0, b"cba")

    run(FastFile, body)


def test_a_fast_path_error_is_the_reply_errno() -> None:
    async def body(sock: trio.socket.SocketType, server: Server) -> None:
        fh = await open_file(sock)
        error, _ = await call(sock, p.Opcode.WRITE, write_in(fh, bytes(5000), os.O_NONBLOCK), 4)
        assert error == -errno.E2BIG
        error, _ = await call(sock, p.Opcode.READ, read_in(fh + 1), 6)
        assert error == -errno.EBADF  # no such file: the slow path says so

    run(FastFile, body)


def test_a_read_that_must_wait_runs_in_a_task_and_can_be_interrupted() -> None:
    async def body(sock: trio.socket.SocketType, server: Server) -> None:
        fh = await open_file(sock)
        await sock.send(p.build_request(p.Opcode.READ, 4, read_in(fh)))
        # A second file's requests are answered while the first waits.
        fh2 = await open_file(sock)
        assert fh2 != fh
        with trio.fail_after(5):
            while 4 not in server.inflight:
                await trio.sleep(0.01)
        await sock.send(p.build_request(p.Opcode.INTERRUPT, 5, p.INTERRUPT_IN.pack(4)))
        with trio.fail_after(5):
            data = await sock.recv(1 << 16)
        assert p.OUT_HEADER.unpack_from(data) == (p.OUT_HEADER.size, -errno.EINTR, 4)
        assert server.inflight == {}

    run(BusyFile, body)


def test_a_poll_that_must_wait_is_answered_when_the_file_is_free() -> None:
    async def body(sock: trio.socket.SocketType, server: Server) -> None:
        fh = await open_file(sock)
        await sock.send(p.build_request(p.Opcode.POLL, 4, p.POLL_IN.pack(fh, 1, 0, 1)))
        with trio.move_on_after(0.1):
            await sock.recv(1 << 16)
            raise AssertionError("answered before the file was free")
        f = server.files[fh]
        assert f.tries == 1  # type: ignore[attr-defined]  # the fast path is tried once, then a task
        f.go.set()  # type: ignore[attr-defined]
        with trio.fail_after(5):
            data = await sock.recv(1 << 16)
        assert p.POLL_OUT.unpack_from(data, p.OUT_HEADER.size)[0] == 1

    run(BusyFile, body)


class WorkingFile(FastFile):
    """A file whose O_NONBLOCK command is running: polls and reads wait for it, queued on the
    file (as DeviceFile's poll_after_work/read_after_work) until ``finish()``; so do blocking
    writes (write_after_work)."""

    def __init__(self) -> None:
        super().__init__()
        self.after: list[Callable[[], None]] = []

    def try_read(self, size: int) -> bytes | None:
        return None

    def try_poll(self, wake: Callable[[], None] | None) -> int | None:
        return None

    def poll_after_work(self, wake: Callable[[], None] | None, reply: Callable[[int], None]) -> bool:
        self.after.append(lambda: reply(1))
        return True

    def read_after_work(self, size: int, reply: Callable[[bytes | OSError], None]) -> bool:
        self.after.append(lambda: reply(b"done"))
        self.after.append(lambda: reply(OSError(errno.EIO, "second read fails")))
        return True

    def write_after_work(self, data: bytes, reply: Callable[[int | OSError], None]) -> bool:
        """A blocking write its worker runs: the first is answered its size, the next EPIPE."""
        first = not self.after
        self.after.append(lambda: reply(len(data) if first else OSError(errno.EPIPE, "gone")))
        return True

    def finish(self) -> None:
        for then in self.after:
            then()


def test_a_call_waiting_for_the_files_command_needs_no_task() -> None:
    async def body(sock: trio.socket.SocketType, server: Server) -> None:
        fh = await open_file(sock)
        await sock.send(p.build_request(p.Opcode.POLL, 4, p.POLL_IN.pack(fh, 1, 0, 1)))
        await sock.send(p.build_request(p.Opcode.READ, 6, read_in(fh)))
        with trio.move_on_after(0.1):
            await sock.recv(1 << 16)
            raise AssertionError("answered before the command ended")
        f = server.files[fh]
        assert server.inflight == {} and len(f.after) == 3  # type: ignore[attr-defined]
        f.finish()  # type: ignore[attr-defined]
        with trio.fail_after(5):
            replies = [await sock.recv(1 << 16) for _ in range(3)]
        assert p.OUT_HEADER.unpack_from(replies[0])[1:] == (0, 4)
        assert p.POLL_OUT.unpack_from(replies[0], p.OUT_HEADER.size)[0] == 1
        assert replies[1] == p.reply_read(6, b"done")
        assert p.OUT_HEADER.unpack_from(replies[2]) == (p.OUT_HEADER.size, -errno.EIO, 6)

    run(WorkingFile, body)


def test_a_blocking_write_the_worker_runs_needs_no_task() -> None:
    async def body(sock: trio.socket.SocketType, server: Server) -> None:
        fh = await open_file(sock)
        await sock.send(p.build_request(p.Opcode.WRITE, 4, write_in(fh, b"abcdef")))
        await sock.send(p.build_request(p.Opcode.WRITE, 6, write_in(fh, b"gh")))
        await trio.sleep(0.05)
        assert server.inflight == {}  # no task waits for them
        with pytest.raises(trio.TooSlowError), trio.fail_after(0.05):
            await sock.recv(1 << 16)  # nor are they answered before their commands end
        server.files[fh].finish()  # type: ignore[attr-defined]
        with trio.fail_after(5):
            first, second = await sock.recv(1 << 16), await sock.recv(1 << 16)
        assert p.OUT_HEADER.unpack_from(first) == (24, 0, 4)
        assert p.WRITE_OUT.unpack_from(first, p.OUT_HEADER.size) == (6, 0)
        assert p.OUT_HEADER.unpack_from(second) == (16, -errno.EPIPE, 6)

    run(WorkingFile, body)


def test_files_without_a_fast_path_still_work() -> None:
    """A FileOps with only the async methods (the test devices) goes the slow way."""

    class Plain:
        async def write(self, data: bytes, nonblock: bool) -> int:
            return len(data)

        async def read(self, size: int, nonblock: bool) -> bytes:
            return b"x"

        async def poll(self, wake: Callable[[], None] | None) -> int:
            return 4

        async def release(self) -> None:
            return None

    async def body(sock: trio.socket.SocketType, server: Server) -> None:
        fh = await open_file(sock)
        assert await call(sock, p.Opcode.READ, read_in(fh), 4) == (0, b"x")
        error, out = await call(sock, p.Opcode.POLL, p.POLL_IN.pack(fh, 1, 0, 1), 6)
        assert p.POLL_OUT.unpack(out)[0] == 4

    run(Plain, body)


def test_release_forgets_the_file() -> None:
    """Channel.add_file numbers files from 1 and keeps them until release."""

    async def body(sock: trio.socket.SocketType, server: Server) -> None:
        fh = await open_file(sock)
        assert fh == 1 and set(server.files) == {1}
        error, _ = await call(sock, p.Opcode.RELEASE, p.RELEASE_IN.pack(fh, 0, 0, 0), 4)
        assert error == 0 and server.files == {}

    run(FastFile, body)


def test_an_open_after_a_close_waits_for_its_release() -> None:
    """The kernel's close() has released the file before the next open() starts (a node's
    max_open counts on it); FUSE sends RELEASE asynchronously, so the loop keeps that order."""
    gate = trio.Event()
    log: list[str] = []

    class SlowRelease(FastFile):
        async def release(self) -> None:
            await gate.wait()
            log.append("released")

    def make() -> FileOps:
        log.append("opened")
        return SlowRelease()

    async def body(sock: trio.socket.SocketType, server: Server) -> None:
        fh = await open_file(sock)
        await sock.send(p.build_request(p.Opcode.RELEASE, 4, p.RELEASE_IN.pack(fh, 0, 0, 0)))
        await sock.send(p.build_request(p.Opcode.OPEN, 6, struct.pack("=II", os.O_RDWR, 0)))
        with trio.move_on_after(0.1):
            await sock.recv(1 << 16)
            raise AssertionError("answered while the release was running")
        gate.set()
        with trio.fail_after(5):
            first, second = await sock.recv(1 << 16), await sock.recv(1 << 16)
        assert [p.OUT_HEADER.unpack_from(m)[2] for m in (first, second)] == [4, 6]
        assert log == ["opened", "released", "opened"]

    run(make, body)


async def spin_reads_a_request_sent_later(server: Server, theirs: socket.socket) -> None:
    """spin_read() returns the request the other end sends 50 ms in, within the spin (0.5 s)."""
    server.spin = 0.5
    request = p.build_request(p.Opcode.FLUSH, 2, p.FLUSH_IN.pack(1, 0, 0, 0))

    async def later() -> None:
        await trio.sleep(0.05)
        theirs.send(request)

    async with trio.open_nursery() as n:
        n.start_soon(later)
        t0 = trio.current_time()
        assert await server.spin_read() == request
        assert trio.current_time() - t0 < 0.4


def test_the_loop_spins_for_the_next_request_then_sleeps() -> None:
    """spin_read: a request that comes within the spin is read without sleeping in epoll; none
    in time is None (the loop then waits as before)."""

    async def main() -> None:
        with served(FastFile) as (server, theirs):
            await spin_reads_a_request_sent_later(server, theirs)
            server.spin = 0.02
            t0 = trio.current_time()
            assert await server.spin_read() is None
            assert trio.current_time() - t0 >= 0.02

    trio.run(main)


def test_the_spin_pauses_while_the_tpm_works_when_asked() -> None:
    """pause_spin (--cpu: the managed swtpm on the loop's own CPU): while it says so, spin_read
    gives up at once instead of taking the TPM's CPU time; once it no longer does, the loop
    spins as before."""

    async def main() -> None:
        with served(FastFile) as (server, theirs):
            server.spin = 0.5
            busy = [True]
            server.pause_spin = lambda: busy[0]
            t0 = trio.current_time()
            assert await server.spin_read() is None
            assert trio.current_time() - t0 < 0.25
            busy[0] = False
            await spin_reads_a_request_sent_later(server, theirs)

    trio.run(main)


def test_the_loop_spins_on_while_an_answer_is_due() -> None:
    """With the backend's spin watching (``Channel.watch``), spin_read goes on past its own
    spin until the answer a client alone waits for is due (``spin_until``), and no longer."""
    import time

    class Due:
        until = 0.0

        def watch(self, fd: int) -> None: ...

        def forget(self, fd: int) -> None: ...

        def spin_until(self) -> float:
            return self.until

    async def main() -> None:
        with served(FastFile) as (server, theirs):
            due = Due()
            server.spin, server.watch = 0.001, due
            due.until = time.perf_counter() + 0.1
            t0 = trio.current_time()
            assert await server.spin_read() is None
            assert 0.09 <= trio.current_time() - t0 < 1.0
            due.until = 0.0  # nothing due: the loop's own spin only
            t0 = trio.current_time()
            assert await server.spin_read() is None
            assert trio.current_time() - t0 < 0.05

    trio.run(main)


def test_the_default_spin_is_the_configs() -> None:
    from cusetpm.frontends.channel import DEFAULT_SPIN
    from cusetpm.tenants.config import DEFAULT_SPIN_US

    assert DEFAULT_SPIN == DEFAULT_SPIN_US / 1e6


def test_without_spinning_an_idle_loop_reads_once_per_request() -> None:
    """spin 0: the loop finds the channel empty once, then sleeps until a request comes; it
    does not read again before sleeping (each read of /dev/fuse is a syscall)."""
    reads: list[str] = []

    class Counting(Server):
        def read_now(self) -> bytes:
            try:
                buf = super().read_now()
            except BlockingIOError:
                reads.append("empty")
                raise
            reads.append("request")
            return buf

    async def main() -> None:
        with served(FastFile, Counting) as (server, theirs):
            server.spin = 0
            async with trio.open_nursery() as n:
                n.start_soon(server.request_loop, n)
                sock = trio.socket.from_stdlib_socket(theirs)
                for unique in (2, 4, 6):
                    await trio.sleep(0.02)  # the loop is asleep
                    error, _ = await call(sock, p.Opcode.OPEN, struct.pack("=II", os.O_RDWR, 0), unique)
                    assert error == 0
                await trio.sleep(0.02)
                n.cancel_scope.cancel()
        assert reads == ["empty"] + ["request", "empty"] * 3

    trio.run(main)


class AfterReplyFile(FastFile):
    """A fast file that notes when ``after_reply`` runs: whether the write's reply was out."""

    def __init__(self, kernel: socket.socket) -> None:
        super().__init__()
        self.kernel = kernel
        self.seen: list[bytes] = []

    def after_reply(self) -> None:
        self.kernel.setblocking(False)
        try:
            self.seen.append(self.kernel.recv(1 << 16))  # the reply is already there
        except BlockingIOError:
            self.seen.append(b"")


def test_a_fast_write_is_answered_before_the_file_runs_its_command() -> None:
    """The loop answers an O_NONBLOCK write the file took, then calls ``after_reply`` (where
    a DeviceFile runs the command while nobody else needs the TPM): the client's write()
    returns first, as the kernel's does before its async work runs."""

    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        with ours, theirs:
            files: list[AfterReplyFile] = []

            def make() -> FileOps:
                files.append(AfterReplyFile(theirs))
                return files[-1]

            server = Server(ours.fileno(), make)
            sock = trio.socket.from_stdlib_socket(theirs)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.request_loop, nursery)
                fh = await open_file(sock)
                await sock.send(p.build_request(p.Opcode.WRITE, 4, write_in(fh, b"abcdef", os.O_RDWR | os.O_NONBLOCK)))
                with trio.fail_after(5):
                    while not files[0].seen:
                        await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
        (reply,) = files[0].seen
        assert p.OUT_HEADER.unpack_from(reply) == (24, 0, 4) and p.WRITE_OUT.unpack_from(reply, p.OUT_HEADER.size) == (
            6,
            0,
        )

    trio.run(main)
