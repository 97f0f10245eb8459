# SPDX-License-Identifier: GPL-2.0-only
"""Backends against real swtpm processes."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from cusetpm.backends import BackendError, SocketBackend, TctiBackend, managed_swtpm, unframeable
from cusetpm.kernel import wire as tpm
from cusetpm.kernel.wire import be32
from helpers import RawTpm, get_random


def test_managed_swtpm_starts_answers_and_stops(tmp_path):
    async def main():
        async with managed_swtpm(tmp_path) as backend:
            rsp = await backend.transmit(tpm.command(tpm.CC_STARTUP, b"\x00\x00"), 1.0)
            assert be32(rsp, 6) == 0
            rsp = await backend.transmit(get_random(8), 2.0)
            assert be32(rsp, 6) == 0 and len(rsp) == 20
            address = backend.unix
            assert address is not None and address.startswith("\0")  # abstract: no file to remove
            assert backend.port == 0  # no TCP port at all
        with pytest.raises(ConnectionRefusedError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(address)  # swtpm is gone, and its socket with it

    trio.run(main)


def test_unreachable_socket_is_a_backend_error():
    async def main():
        with pytest.raises(BackendError):
            await SocketBackend("127.0.0.1", 1).connect()

    trio.run(main)


def test_a_connection_to_itself_is_no_tpm(monkeypatch):
    """A loopback connect() whose source port is the port it connects to (which Linux may pick
    while nobody listens there) reaches itself: that is no TPM, but 'not listening yet'."""
    from cusetpm.backends import socket as backend_socket
    from cusetpm.backends.swtpm import free_port_pair

    port = free_port_pair()

    class SourcePortIsTarget:
        """The socket module, but its sockets are bound to ``port`` before they connect."""

        def __getattr__(self, name: str) -> object:
            return getattr(socket, name)

        def socket(self, *args: int) -> socket.socket:
            s = socket.socket(*args)
            s.bind(("127.0.0.1", port))
            return s

    monkeypatch.setattr(backend_socket, "socket", SourcePortIsTarget())
    with pytest.raises(BackendError, match="connected to itself"):
        trio.run(backend_socket.connect_tcp, "127.0.0.1", port)
    monkeypatch.undo()
    with socket.socket() as listener:  # a real listener is still connected to
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        sock = trio.run(backend_socket.connect_tcp, "127.0.0.1", listener.getsockname()[1])
        sock.close()


def test_timeout_is_etime_and_the_stream_recovers():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    async def main():
        backend = SocketBackend("127.0.0.1", listener.getsockname()[1])
        assert await backend.transmit(get_random(), 0.2) == -errno.ETIME  # nobody answers
        conn, _ = listener.accept()
        conn.close()
        assert await backend.transmit(get_random(), 0.5) in (-errno.EPIPE, -errno.ETIME)

    trio.run(main)
    listener.close()


@asynccontextmanager
async def watched(listener: socket.socket, tpm: Callable[[], None]) -> AsyncIterator[SocketBackend]:
    """A socket backend connected to ``listener``, timed by its watch, with ``tpm`` (what
    answers on the listener's side) running in a thread."""
    backend = SocketBackend("127.0.0.1", listener.getsockname()[1])
    await backend.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.watch)
        nursery.start_soon(trio.to_thread.run_sync, tpm)
        await trio.sleep(0.01)
        yield backend
        nursery.cancel_scope.cancel()


def test_under_its_watch_a_late_answer_is_etime_and_the_next_connection_answers():
    """With ``watch()`` running (as the chip runs it), an exchange times out without a cancel
    scope of its own: -ETIME after its timeout, and the next command gets a new connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(5)  # the thread ends even if the test fails
    answer = bytes.fromhex("80010000000a00000000")

    def second_connection_answers() -> None:
        silent, _ = listener.accept()
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(answer)
        conn.close()
        silent.close()

    async def main():
        async with watched(listener, second_connection_answers) as backend:
            start = trio.current_time()
            with trio.fail_after(5):
                assert await backend.transmit(get_random(), 0.2) == -errno.ETIME  # nobody answers
            assert 0.2 <= trio.current_time() - start < 2
            await backend.connect()
            assert await backend.transmit(get_random(), 2) == answer

    trio.run(main)
    listener.close()


def test_an_exchange_in_flight_when_the_watch_stops_still_times_out():
    """At shutdown the chip's tasks are cancelled, the watch too: the exchange it was timing
    (a queued command still runs to its end) keeps its deadline instead of waiting for ever."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    async def main():
        backend = SocketBackend("127.0.0.1", listener.getsockname()[1])
        await backend.connect()
        results = []

        async def command():
            results.append(await backend.transmit(get_random(), 0.3))

        with trio.fail_after(5):
            async with trio.open_nursery() as outer:
                async with trio.open_nursery() as watching:
                    watching.start_soon(backend.watch)
                    await trio.sleep(0.01)
                    outer.start_soon(command)
                    await trio.sleep(0.05)
                    watching.cancel_scope.cancel()
        assert results == [-errno.ETIME]
        assert await backend.transmit(get_random(), 0.1) == -errno.ETIME  # its own scope now

    trio.run(main)
    listener.close()


def test_short_frames_are_answered_command_size():
    assert be32(unframeable(b"\x80\x01\x00\x00\x00\x07\x00"), 6) == 0x142
    assert unframeable(get_random()) is None


def test_tcti_backend_talks_to_swtpm():
    raw = RawTpm.start()
    port = raw.port
    raw.sock.close()  # swtpm serves one client at a time

    async def main():
        backend = TctiBackend(f"swtpm:host=127.0.0.1,port={port}")
        rsp = await backend.transmit(get_random(8), 2.0)
        assert be32(rsp, 6) == 0 and len(rsp) == 20
        assert backend.commands_sent == 1
        await backend.aclose()

    try:
        trio.run(main)
    finally:
        raw.close()  # stops swtpm and removes its state directory


def test_tcti_backend_bad_conf_is_a_backend_error():
    with pytest.raises(BackendError):
        TctiBackend("nosuchtcti:x")


def test_a_killed_daemon_leaves_no_managed_swtpm_behind(tmp_path):
    """kill -9 of the daemon: its swtpm dies with it (PR_SET_PDEATHSIG), nothing is orphaned."""
    import os
    import signal
    import time

    from cusetpm.testing.daemon import start_serve, unmount

    served = start_serve(
        ["--fuse", str(tmp_path / "mnt"), "--state-dir", str(tmp_path / "state")],
        log_path=tmp_path / "log",
        mount=tmp_path / "mnt",
    )
    try:
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == served.proc.pid]
        swtpm = [p for p in children if b"swtpm" in _cmdline(p)]
        assert len(swtpm) == 1
        os.kill(served.proc.pid, signal.SIGKILL)
        served.proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{swtpm[0]}") and _state(swtpm[0]) != "Z":
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{swtpm[0]}") or _state(swtpm[0]) == "Z"
    finally:
        unmount(tmp_path / "mnt")


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _late(rsp: bytes) -> bytes:
    import time

    time.sleep(2.3)  # GetRandom's duration is 2 s
    return rsp


#: What a broken transport hands back instead of GetRandom(8)'s 20-byte answer, and the errno
#: the kernel's tpm_try_transmit() gives for it (a stream cannot tell a short answer from a
#: late one: both wait for the header's size, then ETIME).
MISBEHAVIOUR = {
    "no-answer": (lambda rsp: None, errno.ETIME),
    "late": (_late, errno.ETIME),
    "truncated": (lambda rsp: rsp[:8], errno.ETIME),
    "size-too-big": (lambda rsp: rsp[:2] + (30).to_bytes(4, "big") + rsp[6:], errno.ETIME),
    "size-too-small": (lambda rsp: rsp[:2] + (12).to_bytes(4, "big") + rsp[6:], errno.EFAULT),
    "garbage-header": (lambda rsp: bytes.fromhex("dead00000000beef") + rsp[8:], errno.EFAULT),
    "oversized": (lambda rsp: rsp[:2] + (5000).to_bytes(4, "big") + rsp[6:] + bytes(5000 - len(rsp)), errno.EIO),
}


@pytest.mark.parametrize(
    "kind,keyed",
    [(k, False) for k in sorted(MISBEHAVIOUR)]
    # ContextLoad's duration is the default 120 s: only answers that fail at once, here.
    + [(k, True) for k in ("garbage-header", "oversized", "size-too-small")],
)
def test_a_misbehaving_backend_gets_the_kernels_errno_and_spares_other_files(daemon, relayed_tpm, kind, keyed):
    """A file with an empty space gets the errno of tpm_try_transmit() for its command; one
    holding a key gets EFAULT, because the broken answer is its key's ContextLoad's
    (tpm2_load_context(): any system error is EFAULT).  What the TPM loaded meanwhile is
    flushed; the other file is untouched; the stream is in step again."""
    import os

    from conftest import HR_LOADED_SESSION, HR_SAVED_SESSION, HR_TRANSIENT, get_cap_handles
    from helpers import create_primary, get_random, rc, read_public
    from helpers import transact as cmd

    mux, relay = relayed_tpm.mux, relayed_tpm.relay
    d = daemon(extra_args=relayed_tpm.args)
    bystander, victim = os.open(d.node, os.O_RDWR), os.open(d.node, os.O_RDWR)
    assert rc(cmd(bystander, create_primary())) == 0
    if keyed:
        assert rc(cmd(victim, create_primary())) == 0
    rewrite, code = MISBEHAVIOUR[kind]
    relay.rewrite_next_response(rewrite)
    with pytest.raises(OSError) as exc:
        cmd(victim, get_random())
    assert exc.value.errno == (errno.EFAULT if keyed else code)
    # The victim's key reloads from its space, as the kernel's would (its saved context
    # stays in the space); the bystander's too.
    for fd in (victim, bystander) if keyed else (victim,):
        assert rc(cmd(fd, get_random())) == 0
    for fd in (victim, bystander) if keyed else (bystander,):
        assert rc(cmd(fd, read_public(0x80FFFFFF))) == 0
    os.close(bystander)
    os.close(victim)
    assert d.served.proc.poll() is None
    for first in (HR_TRANSIENT, HR_LOADED_SESSION, HR_SAVED_SESSION):
        assert get_cap_handles(mux.transact, first) == [], d.log()


def test_device_backend_on_a_character_device_file(daemon, tmp_path):
    """``--tcti device:PATH`` takes the native path (no TCTI thread): here a cusetpm served on
    another cusetpm's node, which behaves like /dev/tpmrm0 (write, poll, read)."""
    from conftest import tpm2
    from cusetpm.backends import DeviceBackend, open_backend

    lower = daemon()
    upper = daemon(extra_args=["--tcti", f"device:{lower.node}"])
    out = tpm2(upper.node, "tpm2_getrandom", "--hex", "8", cwd=tmp_path)
    assert len(out.stdout.strip()) == 16
    tpm2(upper.node, "tpm2_createprimary", "-c", str(tmp_path / "p.ctx"), cwd=tmp_path)
    tpm2(upper.node, "tpm2_readpublic", "-c", str(tmp_path / "p.ctx"), cwd=tmp_path)

    async def direct() -> None:
        async with open_backend(f"device:{lower.node}") as backend:
            assert isinstance(backend, DeviceBackend)
            rsp = await backend.transmit(bytes.fromhex("80010000000c0000017b0008"), 2.0)
            assert isinstance(rsp, bytes) and len(rsp) == 20 and rsp[6:10] == bytes(4)

    trio.run(direct)
    assert os.path.exists(lower.node)
    assert upper.stop() == 0, upper.log()  # before the TPM it stands on


def test_a_device_that_cannot_be_opened_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "cusetpm", "serve", "--fuse", str(tmp_path / "mnt"), "--tcti", "device:/nonexistent/tpm9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip() == (
        "cusetpm: error: cannot open TPM device /nonexistent/tpm9: No such file or directory"
    ), r.stderr


def test_mssim_backend_speaks_the_simulators_protocol(daemon, tmp_path):
    """``--tcti mssim:`` takes the native path: two ports, power-on and NV-on at connection,
    framed commands.  The simulator's protocol is served by a front on a swtpm, which
    tpm2-tss's own mssim TCTI accepts too (so the front is the protocol, not our reading of it)."""
    from conftest import tpm2
    from cusetpm.backends import MssimBackend, open_backend
    from cusetpm.testing.relay import MssimFront

    front = MssimFront(tmp_path / "sim")
    try:
        tss = subprocess.run(
            ["tpm2_getrandom", "-T", f"mssim:host=127.0.0.1,port={front.port}", "--hex", "8"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert tss.returncode == 0 and len(tss.stdout) == 16, tss.stderr
        front.signals.clear()
        d = daemon(extra_args=["--tcti", f"mssim:host=127.0.0.1,port={front.port}"])
        assert front.signals[:2] == [1, 11]  # power on, NV on
        assert len(tpm2(d.node, "tpm2_getrandom", "--hex", "8", cwd=tmp_path).stdout.strip()) == 16
        tpm2(d.node, "tpm2_createprimary", "-c", str(tmp_path / "p.ctx"), cwd=tmp_path)
        tpm2(d.node, "tpm2_readpublic", "-c", str(tmp_path / "p.ctx"), cwd=tmp_path)

        async def direct() -> None:
            async with open_backend(f"mssim:host=127.0.0.1,port={front.port}") as backend:
                assert isinstance(backend, MssimBackend)
                rsp = await backend.transmit(bytes.fromhex("80010000000c0000017b0008"), 2.0)
                assert isinstance(rsp, bytes) and len(rsp) == 20 and rsp[6:10] == bytes(4)

        trio.run(direct)
    finally:
        front.close()


def test_an_abstract_unix_socket_nobody_listens_on_is_a_backend_error_that_names_it():
    async def main():
        with pytest.raises(BackendError, match=r"cannot connect to TPM at @cusetpm-nobody-here: Connection refused"):
            await SocketBackend("127.0.0.1", 0, unix="\0cusetpm-nobody-here").connect()

    trio.run(main)


def test_send_now_answers_within_the_spin_or_leaves_the_answer_to_answer():
    """The exchange the chip begins in the request loop: send_now() returns swtpm's answer if
    it came within the spin, else None, and answer() awaits it; the spin learns how long each
    command code's answer took, either way, and does not spin for one that took too long;
    under the watch, an answer that never comes is -ETIME and the next command gets a new
    connection."""
    from cusetpm.backends.spin import SpinWait

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(5)
    answer = bytes.fromhex("80010000000a00000000")

    def tpm_cc(command: bytes) -> int:
        return be32(command, 6)

    def tpm() -> None:
        conn, _ = listener.accept()
        for _ in range(2):
            conn.recv(4096)
            conn.sendall(answer)
        conn.settimeout(10)  # the thread ends even if the test fails
        conn.recv(4096)  # and says nothing
        second, _ = listener.accept()
        second.recv(4096)
        second.sendall(answer[:4])  # a response in two pieces
        second.sendall(answer[4:])
        conn.close()
        second.close()

    async def main():
        async with watched(listener, tpm) as backend:
            assert backend.ready_now()
            spin = backend.spin_wait = SpinWait(5.0)
            assert backend.send_now(get_random(), 2) == answer
            cc = tpm_cc(get_random())
            assert 0 < spin.took[cc] < 5.0  # the spin learns how long it took
            spin.took[cc] = 10.0  # too slow to spin for (over the cap and 5 s): answer() waits
            assert backend.send_now(get_random(), 2) is None
            assert await backend.answer() == answer
            assert spin.took[cc] < 5.0  # answered in trio, and timed too
            backend.spin_wait = None
            assert backend.send_now(get_random(), 0.2) is None
            with trio.fail_after(5):
                assert await backend.answer() == -errno.ETIME
            assert not backend.ready_now()  # the stream was dropped
            await backend.connect()
            assert backend.send_now(get_random(), 2) is None
            assert await backend.answer() == answer
            assert backend.commands_sent == 4

    trio.run(main)
    listener.close()


def test_the_simulators_framing():
    """mssim: ``u32 size, bytes, u32 0`` back; the response once all of it is in."""
    from cusetpm.backends.mssim import LOCALITY, SEND_COMMAND, MssimBackend

    backend = MssimBackend("localhost", 2321)
    command = get_random()
    assert (
        backend._frame(command)
        == SEND_COMMAND.to_bytes(4, "big") + bytes([LOCALITY]) + len(command).to_bytes(4, "big") + command
    )
    rsp = bytes.fromhex("80010000000a00000000")
    framed = len(rsp).to_bytes(4, "big") + rsp + bytes(4)
    assert [backend._take(framed[:n]) for n in (0, 3, 4, 13, 17)] == [None, None, None, None, None]
    assert backend._take(framed) == rsp


def test_a_device_is_written_without_awaiting_and_answered_when_readable():
    """A device that is not the kernel's (a stand-in here, a FUSE or CUSE node in use):
    DeviceBackend.send_now writes the command O_NONBLOCK and returns None, never reading at
    once and never spinning; answer() waits for the file to be readable; no answer in time
    is -ETIME and the file is closed; a device gone (EPIPE) is -EPIPE."""
    from cusetpm.backends.device import DeviceBackend
    from cusetpm.backends.spin import SpinWait

    answer = bytes.fromhex("80010000000a00000000")

    async def main():
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        backend = DeviceBackend("/dev/tpm-test")
        assert not backend.ready_now()
        backend._adopt(ours.detach(), kernel_tpm=False)
        assert backend.ready_now()
        backend.spin_wait = SpinWait(2.0)
        command = get_random()
        theirs.send(answer)  # already there: still not read at once
        assert backend.send_now(command, 2) is None
        assert theirs.recv(4096) == command
        assert await backend.answer() == answer
        assert backend.send_now(command, 0.1) is None
        with trio.fail_after(5):
            assert await backend.answer() == -errno.ETIME
        assert not backend.ready_now()  # the late answer must not be the next command's
        mine, gone = socket.socketpair()
        gone.close()
        backend._adopt(mine.detach(), kernel_tpm=False)
        assert backend.send_now(command, 2) == -errno.EPIPE and not backend.ready_now()
        assert backend.commands_sent == 3
        theirs.close()

    trio.run(main)


def test_a_kernel_tpm_is_written_blocking_for_a_client_alone_and_else_waited_for_in_its_epoll():
    """On a kernel TPM device a command for a client alone is written without O_NONBLOCK (the
    kernel's write runs it) and read at once, if it is known to be quick: its answer took at
    most BLOCKING_CAP last time (learned either way), and it makes no key.  Any other command,
    and any for a client not alone, is written O_NONBLOCK, and answer() waits on the file's own
    epoll.  A stand-in plays the kernel's part (the real one: the guest test below)."""
    from cusetpm.backends.device import BLOCKING_CAP, DeviceBackend
    from cusetpm.backends.spin import SpinWait
    from cusetpm.testing.hostile import create_primary

    answer = bytes.fromhex("80010000000a00000000")
    alone = [True]

    async def main():
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        backend = DeviceBackend("/dev/tpm-test")
        backend._adopt(ours.detach(), kernel_tpm=True)
        fd = backend._fd
        spin = backend.spin_wait = SpinWait(1e-4, alone=lambda: alone[0])

        async def way(command: bytes) -> str:
            """Which way ``command`` went; the stand-in answers it either way."""

            def tpm() -> None:  # the kernel answers as its write ends, or as its work does
                assert theirs.recv(4096) == command
                theirs.send(answer)

            kernel = threading.Thread(target=tpm)
            kernel.start()
            rsp = backend.send_now(command, 2)
            blocking = os.get_blocking(fd)
            if rsp is None:
                rsp = await backend.answer()
            kernel.join()
            assert rsp == answer
            return "blocking" if blocking else "epoll"

        command = get_random()
        assert await way(command) == "epoll"  # never seen: its time is learned
        assert 0 < spin.took[0x17B] < 1
        assert await way(command) == "blocking"
        alone[0] = False
        assert await way(command) == "epoll"
        alone[0] = True
        spin.took[0x17B] = BLOCKING_CAP * 1.5  # slow last time
        assert await way(command) == "epoll"
        assert spin.took[0x17B] < BLOCKING_CAP  # quick this time: blocking again next time
        assert await way(command) == "blocking"
        assert [await way(create_primary()) for _ in range(2)] == ["epoll", "epoll"]  # however quick
        theirs.close()
        await backend.aclose()

    trio.run(main)


def test_only_the_kernels_tpm_devices_count_as_kernel_tpms(tmp_path):
    """is_kernel_tpm: a character device whose sysfs subsystem is ``tpm`` or ``tpmrm``; not a
    socket, not another character device (a CUSE node is one)."""
    from cusetpm.backends.device import is_kernel_tpm

    a, b = socket.socketpair()
    with a, b:
        assert not is_kernel_tpm(a.fileno())
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        st = os.fstat(fd)
        assert not is_kernel_tpm(fd)
        for subsystem, want in (("tpm", True), ("tpmrm", True), ("mem", False), ("cuse", False)):
            sysfs = tmp_path / subsystem
            dev = sysfs / "dev" / "char" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            dev.mkdir(parents=True)
            (sysfs / "class" / subsystem).mkdir(parents=True)
            (dev / "subsystem").symlink_to(sysfs / "class" / subsystem)
            assert is_kernel_tpm(fd, sysfs=str(sysfs)) is want, subsystem
    finally:
        os.close(fd)


#: The guest side of the test below: prints one JSON line.
_GUEST_DEVICE = r"""
import json, os, time
import trio
from cusetpm.backends.device import DeviceBackend, is_kernel_tpm
from cusetpm.backends.spin import SpinWait
from cusetpm.kernel.wire import be32
from cusetpm.testing.hostile import create_primary
from helpers import flush_context, get_random

out = {"kinds": {}}
for path in ("/dev/tpm0", "/dev/tpmrm0", "/dev/null", "/dev/cuse"):
    fd = os.open(path, os.O_RDWR)
    out["kinds"][path] = is_kernel_tpm(fd)
    os.close(fd)


async def main():
    backend = DeviceBackend("/dev/tpm0")
    backend.open()
    fd = backend._fd
    backend.spin_wait = SpinWait(1e-4)  # a client alone
    out["alone"] = []
    for command in (get_random(), get_random(), create_primary()):
        rsp = backend.send_now(command, 30)
        if rsp is None:  # the O_NONBLOCK way: never seen, or it may make a key
            way, rsp = "epoll", await backend.answer()
        else:
            way = "blocking"
        out["alone"].append([way, rsp[6:10].hex() if isinstance(rsp, bytes) else rsp, os.get_blocking(fd)])
        if command[6:10] == create_primary()[6:10]:
            assert backend.send_now(flush_context(be32(rsp, 10)), 30) is None
            await backend.answer()
    backend.spin_wait = None  # the O_NONBLOCK way: the loop runs on while the TPM works
    ticks, done, waits = 0, False, []

    async def ticker():
        nonlocal ticks
        while not done:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        for _ in range(5):
            before, t = ticks, time.monotonic()
            assert backend.send_now(create_primary(), 30) is None
            rsp = await backend.answer()
            waits.append([ticks - before, round(time.monotonic() - t, 4), rsp[6:10].hex()])
            assert backend.send_now(flush_context(be32(rsp, 10)), 30) is None
            await backend.answer()
        done = True
    out["waits"] = waits
    out["blocking_after"] = os.get_blocking(fd)
    await backend.aclose()


trio.run(main)
print("DEVICE=" + json.dumps(out))
"""


@pytest.mark.guest
@pytest.mark.parametrize("version", ["6.1", "6.12"])
def test_on_the_kernels_dev_tpm0_the_loop_runs_while_the_tpm_works(version, tmp_path):
    """On a real kernel's /dev/tpm0 (swtpm behind vtpm_proxy): /dev/tpm0 and /dev/tpmrm0 are
    kernel TPMs, /dev/null and /dev/cuse are not; a client alone's command is written
    blocking and answered at once once its time is known, but a CreatePrimary never is; and while an O_NONBLOCK command runs, the event loop
    keeps running (waiting never touches the file, whose poll takes the mutex the kernel's
    async work holds for the whole command)."""
    import json
    import sys

    from cusetpm import rig

    script = tmp_path / "device_check.py"
    script.write_text(_GUEST_DEVICE)
    tests = os.path.dirname(os.path.abspath(__file__))
    cmd = f"{rig.guest_swtpm_prelude()} && PYTHONPATH={tests} {sys.executable} {script}"
    res = rig.run_in_guest(version, cmd, timeout=300)
    line = next((ln for ln in res.output.splitlines() if ln.startswith("DEVICE=")), None)
    assert line is not None, res.output[-3000:]
    out = json.loads(line[len("DEVICE=") :])
    assert out["kinds"] == {"/dev/tpm0": True, "/dev/tpmrm0": True, "/dev/null": False, "/dev/cuse": False}
    assert out["alone"] == [["epoll", "00000000", False], ["blocking", "00000000", True], ["epoll", "00000000", False]]
    assert not out["blocking_after"]
    assert [w[2] for w in out["waits"]] == ["00000000"] * 5, out
    assert sum(w[0] for w in out["waits"]) >= 20, out  # the ticker ran while the TPM worked
