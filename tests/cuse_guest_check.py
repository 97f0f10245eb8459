# SPDX-License-Identifier: GPL-2.0-only
"""Client-side checks of the CUSE front end against a real kernel (run inside the rig's guest).

Starts ``cuse_echo_server.py`` as a separate process and uses its ``/dev/<name>``
with plain syscalls, as any program would.  Prints ``ok <check>`` per check and
``ALL OK`` at the end; exits 1 with a traceback at the first failure.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "cuseecho0"
PATH = f"/dev/{NAME}"
TCGETS = 0x5401
#: A check that takes longer has hung (say, a client stuck in an unanswered request).
CHECK_TIMEOUT = 60.0

checks: list[tuple[str, Callable[[], None]]] = []


def check(fn: Callable[[], None]) -> Callable[[], None]:
    checks.append((fn.__name__, fn))
    return fn


def expect_errno(err: int, fn: Callable[[], object]) -> None:
    try:
        result = fn()
    except OSError as e:
        assert e.errno == err, f"expected {errno.errorcode[err]}, got {e!r}"
    else:
        raise AssertionError(f"expected {errno.errorcode[err]}, got result {result!r}")


def open_dev(flags: int = 0) -> int:
    return os.open(PATH, os.O_RDWR | flags)


def roundtrip(fd: int, data: bytes) -> bytes:
    assert os.write(fd, data) == len(data)
    return os.read(fd, 1 << 20)


def stats() -> dict[str, int]:
    fd = open_dev()
    try:
        text = roundtrip(fd, b"stats").decode()
    finally:
        os.close(fd)
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split())}


@check
def startup_probe_is_invisible() -> None:
    # serve_cuse opened the node once before READY; the device never saw it.
    assert stats() == {"opens": 1, "releases": 0, "cancelled_reads": 0, "blocked_reads": 0}


@check
def node_exists_with_mode() -> None:
    st = os.stat(PATH)
    assert stat.S_ISCHR(st.st_mode), oct(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o666, oct(st.st_mode)
    with open(f"/sys/class/cuse/{NAME}/dev") as f:
        major, minor = map(int, f.read().split(":"))
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor)


@check
def echo_on_several_fds() -> None:
    fds = [open_dev() for _ in range(4)]
    try:
        for i, fd in enumerate(fds):
            assert os.write(fd, b"hello %d" % i) == 7
        for i, fd in enumerate(reversed(fds)):
            assert os.read(fd, 4096) == b"hello %d" % (3 - i)
        expect_errno(errno.EBUSY, lambda: [os.write(fds[0], b"a"), os.write(fds[0], b"b")])
        assert os.read(fds[0], 4096) == b"a"
    finally:
        for fd in fds:
            os.close(fd)


@check
def short_read_and_large_write() -> None:
    fd = open_dev()
    try:
        assert os.write(fd, b"abcdef") == 6
        assert os.read(fd, 3) == b"abc"  # the rest is dropped, as tpmrm does per response
        big = bytes(range(256)) * 400  # 100 KiB: one FUSE_WRITE (max_write is 128 KiB)
        assert os.write(fd, big) == len(big)
        assert os.read(fd, 1 << 20) == big
    finally:
        os.close(fd)


@check
def nonblock_is_seen_per_call() -> None:
    fd = open_dev()
    try:
        assert roundtrip(fd, b"nonblock?") == b"nonblock=0"
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        assert roundtrip(fd, b"nonblock?") == b"nonblock=1"
        expect_errno(errno.EAGAIN, lambda: os.read(fd, 4096))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        assert roundtrip(fd, b"nonblock?") == b"nonblock=0"
    finally:
        os.close(fd)
    fd = open_dev(os.O_NONBLOCK)
    try:
        assert roundtrip(fd, b"nonblock?") == b"nonblock=1"
    finally:
        os.close(fd)


@check
def poll_is_woken_by_notify() -> None:
    fd = open_dev(os.O_NONBLOCK)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLOUT)
        assert p.poll(0) == [(fd, select.POLLOUT)], p.poll(0)
        assert os.write(fd, b"delay:0.5:late") == 14
        assert p.poll(0) == [], "response must not be ready yet"
        expect_errno(errno.EAGAIN, lambda: os.read(fd, 4096))
        p.register(fd, select.POLLIN)
        t0 = time.monotonic()
        events = p.poll(10_000)  # only a FUSE_NOTIFY_POLL can end this early
        waited = time.monotonic() - t0
        assert events == [(fd, select.POLLIN)], events
        assert 0.3 < waited < 5, waited
        assert os.read(fd, 4096) == b"late"
        # select() and epoll go through the same FUSE_POLL.
        assert os.write(fd, b"delay:0.3:again") == 15
        ep = select.epoll()
        ep.register(fd, select.EPOLLIN)
        assert ep.poll(0) == []
        assert ep.poll(10) == [(fd, select.EPOLLIN)]
        ep.close()
        assert os.read(fd, 4096) == b"again"
    finally:
        os.close(fd)


@check
def seek_is_a_noop_and_pread_reads() -> None:
    # cuse.c: .llseek = noop_llseek and FOPEN_NONSEEKABLE is ignored (no
    # fuse_finish_open), so unlike tpmrm (ESPIPE) lseek "succeeds" with 0 and
    # pread/pwrite behave as read/write.  Nothing the server replies changes it.
    fd = open_dev()
    try:
        assert os.lseek(fd, 100, os.SEEK_SET) == 0
        assert os.pwrite(fd, b"pw", 1234) == 2
        assert os.pread(fd, 4096, 99) == b"pw"
    finally:
        os.close(fd)


@check
def ioctl_is_enotty() -> None:
    fd = open_dev()
    try:
        expect_errno(errno.ENOTTY, lambda: fcntl.ioctl(fd, TCGETS, b"\0" * 64))
        assert not os.isatty(fd)
        # _IOW('T', 0x7f, 128 bytes) with a NULL pointer: tpmrm says ENOTTY, and
        # so do we (unrestricted ioctls reach us without the kernel copying).
        iow = (1 << 30) | (128 << 16) | (ord("T") << 8) | 0x7F
        expect_errno(errno.ENOTTY, lambda: fcntl.ioctl(fd, iow, 0))
        assert roundtrip(fd, b"still fine") == b"still fine"
    finally:
        os.close(fd)


@check
def blocked_read_does_not_stall_other_fds() -> None:
    slow, fast = open_dev(), open_dev()
    got: list[bytes] = []
    try:
        assert os.write(slow, b"delay:3:slow") == 12
        reader = threading.Thread(target=lambda: got.append(os.read(slow, 4096)))
        reader.start()
        time.sleep(0.2)  # the reader is now blocked in FUSE_READ
        t0 = time.monotonic()
        for i in range(20):
            assert roundtrip(fast, b"fast %d" % i) == b"fast %d" % i
        other = open_dev()  # open and close too
        os.close(other)
        elapsed = time.monotonic() - t0
        assert reader.is_alive(), "slow read finished too early"
        assert elapsed < 2.0, f"fast fd took {elapsed:.2f}s behind a blocked read"
        reader.join(10)
        assert got == [b"slow"]
    finally:
        os.close(slow)
        os.close(fast)


@check
def many_threads_in_parallel() -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            fd = open_dev()
            try:
                for i in range(30):
                    msg = b"t%d-%d" % (n, i)
                    assert roundtrip(fd, msg) == msg
            finally:
                os.close(fd)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    class Interrupted(Exception):
        pass
    def on_signal(sig, frame):
        raise Interrupted()
    signal.signal(signal.SIGUSR1, on_signal)
    fd = os.open(sys.argv[1], os.O_RDWR)
    print("reading", flush=True)
    try:
        os.read(fd, 4096)  # nothing written: blocks until the signal
    except Interrupted:
        print("interrupted")
    os.write(fd, b"after")
    print(os.read(fd, 4096).decode())
    if sys.argv[2] == "hang":
        print("hanging", flush=True)
        os.read(fd, 4096)
    """
)


def wait_until_read_reaches_server() -> None:
    """Wait until a FUSE_READ waits in the device.

    Being inside read(2) is not enough: a signal that comes before the kernel
    queued the request ends it without the server ever seeing it.
    """
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if stats()["blocked_reads"] == 1:
            return
        time.sleep(0.01)
    raise AssertionError("the child's read never reached the device")


def start_child(mode: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, PATH, mode], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "reading"
    wait_until_read_reaches_server()
    child.send_signal(signal.SIGUSR1)
    lines = [child.stdout.readline().strip() for _ in range(2)]
    assert lines == ["interrupted", "after"], lines
    return child


@check
def signal_interrupts_a_blocked_read() -> None:
    before = stats()
    child = start_child("exit")
    assert child.wait(30) == 0
    after = stats()
    assert after["cancelled_reads"] == before["cancelled_reads"] + 1, (before, after)


@check
def sigkill_of_a_blocked_reader_is_prompt() -> None:
    before = stats()
    child = start_child("hang")
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "hanging"
    wait_until_read_reaches_server()
    t0 = time.monotonic()
    child.kill()
    child.wait(10)
    assert time.monotonic() - t0 < 5
    after = stats()
    assert after["cancelled_reads"] == before["cancelled_reads"] + 2, (before, after)
    # The killed child's file was closed by the kernel: released like any other.
    assert after["opens"] - after["releases"] == 1, after  # only the stats fd is open


@check
def close_releases() -> None:
    before = stats()
    fds = [open_dev() for _ in range(5)]
    dup = os.dup(fds[0])
    middle = stats()
    assert middle["opens"] == before["opens"] + 5 + 1, (before, middle)
    assert middle["releases"] == before["releases"] + 1, (before, middle)
    for fd in fds:
        os.close(fd)
    after_close = stats()
    # fds[0] is still open through its dup: a release comes only with the last close.
    assert after_close["releases"] == middle["releases"] + 1 + 4, (middle, after_close)
    os.close(dup)
    final = stats()
    assert final["releases"] == after_close["releases"] + 1 + 1, (after_close, final)


def start_server(*extra: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "cuse_echo_server.py"), NAME, "--mode", "0666", *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline().strip()
    assert line == "READY", f"server said {line!r}, exit {server.poll()}"
    return server


def stop_server(server: subprocess.Popen[str]) -> None:
    """SIGTERM: the node must go away and open files must fail, not hang."""
    fd = open_dev()
    server.send_signal(signal.SIGTERM)
    assert server.wait(10) == 0, server.returncode
    for _ in range(100):
        if not os.path.exists(PATH):
            break
        time.sleep(0.05)
    assert not os.path.exists(PATH), "node still there after the server stopped"
    expect_errno(errno.ENOTCONN, lambda: os.write(fd, b"x"))
    os.close(fd)
    print("ok server_stops_cleanly", flush=True)


def hung(name: str) -> None:
    """Fail fast and loudly instead of waiting for the rig's timeout."""
    print(f"FAIL {name}: still running after {CHECK_TIMEOUT}s", flush=True)
    os._exit(3)


def main() -> int:
    if not os.path.exists("/dev/cuse"):
        print("no /dev/cuse in this kernel", flush=True)
        return 1
    server = start_server()
    try:
        for name, fn in checks:
            t0 = time.monotonic()
            watchdog = threading.Timer(CHECK_TIMEOUT, hung, args=(name,))
            watchdog.daemon = True
            watchdog.start()
            try:
                fn()
            finally:
                watchdog.cancel()
            print(f"ok {name} ({time.monotonic() - t0:.2f}s)", flush=True)
        stop_server(server)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        return 1
    finally:
        if server.poll() is None:
            server.kill()
    # A second server may take the same name once the first is gone, here with
    # a fixed device number (240-254 are for local/experimental use).
    server = start_server("--major", "240", "--minor", "7")
    rdev = os.stat(PATH).st_rdev
    assert (os.major(rdev), os.minor(rdev)) == (240, 7), (os.major(rdev), os.minor(rdev))
    print("ok fixed_major_minor", flush=True)
    stop_server(server)
    print("ALL OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
