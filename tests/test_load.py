# SPDX-License-Identifier: GPL-2.0-only
"""Load on one daemon (part of issue 10): many files at once, and clients killed by the thousand.

Short runs in ``make test``; ``make soak`` runs them long (``CUSETPM_SOAK_SECONDS``,
``CUSETPM_SOAK_CYCLES``) and prints the figures.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from conftest import BackendHandles, settled_backend_handles
from helpers import create_primary, flush_context, get_cap_handles, get_random, rc, read_public, start_auth_session
from helpers import transact as _cmd

SECONDS = float(os.environ.get("CUSETPM_SOAK_SECONDS", "6"))
CYCLES = int(os.environ.get("CUSETPM_SOAK_CYCLES", "300"))
FILES = 256
#: Files that also start and flush a session each round: swtpm holds 64 active sessions, so
#: more at once would get the TPM's own 0x905 (with the kernel's RM too).
SESSION_FILES = 48
VIRTUAL = 0x80FFFFFF


def _round(fd: int, with_session: bool) -> None:
    """One mixed round; every command succeeds when the file is alone on the TPM."""
    assert rc(_cmd(fd, create_primary())) == 0
    assert rc(_cmd(fd, read_public(VIRTUAL))) == 0
    assert rc(_cmd(fd, get_random(16))) == 0
    assert rc(_cmd(fd, get_cap_handles())) == 0
    assert rc(_cmd(fd, flush_context(VIRTUAL))) == 0
    if with_session:
        rsp = _cmd(fd, start_auth_session())
        assert rc(rsp) == 0
        assert rc(_cmd(fd, flush_context(int.from_bytes(rsp[10:14], "big")))) == 0


def test_256_files_at_once_get_no_error_and_none_starves(daemon):
    d = daemon(inspectable=True)
    rounds = [0] * FILES
    errors: list[str] = []
    start = threading.Barrier(FILES + 1)
    deadline = [0.0]

    def client(i: int) -> None:
        fd = os.open(d.node, os.O_RDWR)
        try:
            start.wait()
            while time.monotonic() < deadline[0]:
                _round(fd, i < SESSION_FILES)
                rounds[i] += 1
        except BaseException as exc:
            errors.append(f"file {i}: {exc!r}")
        finally:
            os.close(fd)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(FILES)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + SECONDS
    start.wait()
    for t in threads:
        t.join(SECONDS + 120)
    assert not errors, errors[:5]
    slowest, fastest = min(rounds), max(rounds)
    print(f"\nload: {FILES} files for {SECONDS:.0f} s: {sum(rounds)} rounds, slowest {slowest}, fastest {fastest}")
    assert slowest >= 1 and slowest * 2 >= fastest, rounds
    assert settled_backend_handles(d) == BackendHandles([], [], [])


_CHILD_OPS = [create_primary(), start_auth_session(), get_random()]


def _daemon_figures(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open file descriptors) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _kill_cycles(node: str, n: int) -> None:
    """n times: a child opens the node, makes a key and a session, and is killed -9."""
    for _ in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no Python-level clean-up, just the calls
            try:
                fd = os.open(node, os.O_RDWR)
                for c in _CHILD_OPS:
                    os.write(fd, c)
                    os.read(fd, 4096)
                os.write(w, b"x")
                time.sleep(60)
            finally:
                os._exit(0)
        os.close(w)
        os.read(r, 1)
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_clients_killed_by_the_thousand_leak_no_handle_memory_or_descriptor(daemon):
    d = daemon(inspectable=True)
    pid = d.served.proc.pid
    warm = min(100, CYCLES)
    _kill_cycles(str(d.node), warm)  # caches, allocator arenas
    settled_backend_handles(d)
    rss0, fds0 = _daemon_figures(pid)
    t0 = time.monotonic()
    _kill_cycles(str(d.node), CYCLES)
    seconds = time.monotonic() - t0
    assert settled_backend_handles(d, quiet=0.5) == BackendHandles([], [], [])
    rss1, fds1 = _daemon_figures(pid)
    print(f"\nkill cycles: {CYCLES} in {seconds:.0f} s; daemon RSS {rss0} -> {rss1} KiB, fds {fds0} -> {fds1}")
    assert fds1 == fds0
    assert rss1 - rss0 < 5 * 1024
