# SPDX-License-Identifier: GPL-2.0-only
"""``cusetpm serve --sessions global`` against a real swtpm (64 session handles) through a
real FUSE node: eviction of idle sessions and what their owners see, a waiter served when a
file closes, a foreign flush refused, nothing left in the TPM at the end; and the same
exhaustion in the default ``--sessions kernel`` mode still giving the TPM's 0x905.

Files are plain blocking fds with raw commands, and tpm2-pytss ESAPI contexts on
``device:NODE`` (tpm2-tss opens the device O_NONBLOCK, so those commands take the daemon's
asynchronous path)."""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tpm2_pytss import ESYS_TR, TSS2_Exception
from tpm2_pytss.constants import TPM2_ALG, TPM2_CC, TPM2_RC, TPM2_SE

from conftest import Daemon, StartDaemon, esapi, settled_backend_handles, tpm2
from cusetpm.kernel.wire import be32, command, u32
from helpers import context_load, context_save, flush_context, rc, start_auth_session

ACTIVE = 64  # swtpm's TPM_PT_ACTIVE_SESSIONS_MAX
SESSION_HANDLES = int(TPM2_RC.SESSION_HANDLES)


class RawFile:
    """One open file of the node: blocking write of a command, read of its response."""

    def __init__(self, node: Path) -> None:
        self.fd = os.open(node, os.O_RDWR)

    def cmd(self, data: bytes) -> bytes:
        assert os.write(self.fd, data) == len(data)
        return os.read(self.fd, 4096)

    def start(self) -> int:
        rsp = self.cmd(start_auth_session(policy=True))
        assert rc(rsp) == 0, f"StartAuthSession: {rc(rsp):#x}"
        return be32(rsp, 10)

    def touch(self, h: int) -> int:
        """PolicyGetDigest(h): the rc."""
        return rc(self.cmd(command(int(TPM2_CC.PolicyGetDigest), u32(h))))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_STATUS: dict[int, Path] = {}


def _global(
    daemon: StartDaemon,
    idle: float,
    wait: float,
    tracking: str = "strict",
    status_dir: Path | None = None,
    swap: str = "kernel",
) -> Daemon:
    args = ["--sessions", "global", "--session-idle", str(idle), "--session-wait", str(wait)]
    args += ["--session-tracking", tracking, "--swap", swap]
    if status_dir is not None:
        args += ["--session-status", str(status_dir / "status.json")]
    d = daemon(extra_args=args, inspectable=True)
    if status_dir is not None:
        _STATUS[id(d)] = status_dir / "status.json"
    return d


def status(d: Daemon) -> dict[str, Any]:
    """The registry's snapshot: SIGUSR1, then the JSON document the daemon writes."""
    path = _STATUS[id(d)]
    path.unlink(missing_ok=True)
    os.kill(d.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"no status after SIGUSR1; log:\n{d.log()}"
        time.sleep(0.01)
    out: dict[str, Any] = json.loads(path.read_text())
    return out


def _no_sessions_left(d: Daemon) -> None:
    left = settled_backend_handles(d)
    assert left.loaded_sessions == [] and left.saved_sessions == [], left


def _active(d: Daemon) -> int:
    """Sessions in the TPM: saved, and loaded (a resident file's under ``--swap lazy``)."""
    left = settled_backend_handles(d)
    return len(left.saved_sessions) + len(left.loaded_sessions)


@pytest.mark.parametrize("swap", ["kernel", "lazy"])
def test_66_sessions_on_a_64_session_tpm_all_start_and_the_evicted_owners_are_told(
    daemon: StartDaemon, tmp_path: Path, swap: str
) -> None:
    d = _global(daemon, idle=0.2, wait=3, status_dir=tmp_path, swap=swap)
    files = [RawFile(d.node) for _ in range(ACTIVE + 2)]
    try:
        handles = [f.start() for f in files[:ACTIVE]]
        assert len(set(handles)) == ACTIVE
        assert _active(d) == ACTIVE
        time.sleep(0.3)  # every session idle past --session-idle
        t0 = time.monotonic()
        late = [f.start() for f in files[ACTIVE:]]
        assert time.monotonic() - t0 < 1.0  # evicted, not waited for
        # The TPM hands out the two least recently used handles again, to the new files.
        assert sorted(late) == sorted(handles[:2])
        # Their first owners get the RM's answer (not sent: the handle is someone else's now).
        assert [f.touch(h) for f, h in zip(files[:2], handles[:2], strict=True)] == [0x000B0910] * 2
        # Everyone else's session works, the new ones too.
        assert {f.touch(h) for f, h in zip(files[2:], handles[2:] + late, strict=True)} == {0}
        assert _active(d) == ACTIVE
        st = status(d)
        assert st["known"] == ACTIVE == st["active_max"] and st["free"] == 0
        assert st["counters"]["evictions_attached"] == 2 and st["counters"]["tombstone_hits"] == 2
        assert "waits" not in st["counters"]
    finally:
        for f in files:
            f.close()
    _no_sessions_left(d)


class Waiter(threading.Thread):
    """A StartAuthSession through tpm2-pytss in a thread of its own: its rc and when it
    ended.  The file (and the session it got) stays open until :meth:`finish`."""

    def __init__(self, node: Path) -> None:
        super().__init__()
        self.node = node
        self.rc: int | None = None
        self.ended = 0.0
        self.answered = threading.Event()
        self._finish = threading.Event()

    def run(self) -> None:
        with esapi(self.node) as ectx:
            try:
                ectx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None, TPM2_ALG.SHA256)
                self.rc = 0
            except TSS2_Exception as exc:
                self.rc = int(exc.rc)
            self.ended = time.monotonic()
            self.answered.set()
            self._finish.wait(30)

    def finish(self) -> None:
        self._finish.set()
        self.join(30)


def test_a_waiter_with_every_session_busy_is_served_promptly_when_a_slot_frees(
    daemon: StartDaemon, tmp_path: Path
) -> None:
    d = _global(daemon, idle=60, wait=10, status_dir=tmp_path)  # nothing is evictable
    files = [RawFile(d.node) for _ in range(ACTIVE - 1)]
    waiters: list[Waiter] = []
    try:
        for f in files:
            f.start()
        with esapi(d.node) as holder:  # the 64th session, held through tpm2-pytss (O_NONBLOCK)
            session = holder.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None, TPM2_ALG.SHA256)
            assert len(settled_backend_handles(d).saved_sessions) == ACTIVE
            for free in ("flush", "close"):
                w = Waiter(d.node)
                waiters.append(w)
                started = time.monotonic()
                w.start()
                time.sleep(0.5)
                assert w.rc is None, f"{free}: the 65th StartAuthSession did not wait ({w.rc:#x})"
                # Other files' commands run while it waits: the chip is not held.
                assert rc(files[1].cmd(command(int(TPM2_CC.GetRandom), struct.pack(">H", 8)))) == 0
                freed = time.monotonic()
                if free == "flush":
                    # An O_NONBLOCK command frees the slot: it must not queue behind the waiter.
                    holder.flush_context(session)
                else:
                    files.pop(0).close()
                w.answered.wait(10)
                assert w.rc == 0, f"{free}: {w.rc}"
                assert w.ended - freed < 1.0, f"{free}: served {w.ended - freed:.3f} s after the slot was freed"
                assert w.ended - started >= 0.5
            st = status(d)
            assert st["counters"]["waits"] == 2 and "wait_timeouts" not in st["counters"]
            assert st["known"] == ACTIVE and st["queue"] == 0 and st["max_wait_ms"] >= 400
            assert "evictions_attached" not in st["counters"]
    finally:
        for w in waiters:
            w.finish()
        for f in files:
            f.close()
    _no_sessions_left(d)


@pytest.mark.parametrize("tracking", ["strict", "lazy"])
def test_the_registry_matches_the_tpm_at_every_step(daemon: StartDaemon, tmp_path: Path, tracking: str) -> None:
    """Research notes §8.2 S1 (without the HMAC step): per step the counts per state, and
    known - foreign equals what the TPM holds; lazy tracking notices the flush one save later."""
    d = _global(daemon, idle=2, wait=5, tracking=tracking, status_dir=tmp_path)
    a, b, c = RawFile(d.node), RawFile(d.node), RawFile(d.node)

    def check(attached: int, detached: int, abandoned: int, held: int) -> dict[str, Any]:
        tpm = settled_backend_handles(d)  # first: a close reaches the daemon a moment later
        st = status(d)
        states = st["states"]
        assert (states["attached"], states["detached"], states["abandoned"]) == (attached, detached, abandoned), st
        assert len(tpm.saved_sessions) + len(tpm.loaded_sessions) == held == st["known"] - states["foreign"]
        return st

    try:
        ha = [a.start() for _ in range(3)]
        check(3, 0, 0, 3)
        hb = [b.start() for _ in range(2)]
        check(5, 0, 0, 5)
        blob = b.cmd(context_save(hb[0]))
        assert rc(blob) == 0
        check(4, 1, 0, 5)
        assert rc(a.cmd(flush_context(ha[0]))) == 0
        st = check(3, 1, 0, 4)
        assert st["counters"].get("lazy_corrections_save_ref_h0", 0) == (1 if tracking == "lazy" else 0)
        rsp = c.cmd(context_load(blob[10:]))
        assert rc(rsp) == 0 and be32(rsp, 10) == hb[0]
        check(4, 0, 0, 4)
        b.close()
        check(3, 0, 0, 3)
        c.close()
        check(2, 0, 0, 2)
    finally:
        for f in (a, b, c):
            f.close()
    _no_sessions_left(d)


def test_sessions_the_daemon_did_not_create_are_found_and_spared(daemon: StartDaemon, tmp_path: Path) -> None:
    """Research notes §8.7 L1: another client of the TPM holds 5 sessions.  The registry
    thinks there is room, the TPM says 0x905: recalibration finds the 5 (FOREIGN, never
    evicted by default) and the least recently used idle session of ours is evicted."""
    d = _global(daemon, idle=0.3, wait=3, status_dir=tmp_path)
    assert d.mux is not None
    foreign = []
    for _ in range(5):  # straight to swtpm, bypassing the daemon; saved so no slot stays loaded
        h = be32(d.mux.transact(start_auth_session(policy=True)), 10)
        assert rc(d.mux.transact(context_save(h))) == 0
        foreign.append(h)
    files = [RawFile(d.node) for _ in range(ACTIVE - 5 + 1)]
    try:
        ours = [f.start() for f in files[:-1]]
        time.sleep(0.4)
        assert files[-1].start() == ours[0]
        st = status(d)
        assert st["states"]["foreign"] == 5 and st["counters"]["recalibrations"] == 1
        assert st["counters"]["evictions_attached"] == 1 and st["known"] == ACTIVE
        held = settled_backend_handles(d)
        assert {h & 0xFFFFFF for h in foreign} <= {h & 0xFFFFFF for h in held.saved_sessions}
    finally:
        for f in files:
            f.close()
    left = settled_backend_handles(d)
    assert len(left.saved_sessions) == 5 and left.loaded_sessions == []  # only the other client's
    for h in foreign:
        assert rc(d.mux.transact(flush_context(h))) == 0


def test_a_foreign_flush_is_refused(daemon: StartDaemon) -> None:
    d = _global(daemon, idle=2, wait=5)
    a, b = RawFile(d.node), RawFile(d.node)
    try:
        h = a.start()
        assert rc(b.cmd(flush_context(h))) == 0x000B01CB
        assert a.touch(h) == 0  # a's session survived
        assert rc(a.cmd(flush_context(h))) == 0  # its owner may
        assert a.touch(h) != 0
    finally:
        a.close()
        b.close()
    _no_sessions_left(d)


def test_kernel_mode_still_answers_0x905(daemon: StartDaemon) -> None:
    d = daemon(inspectable=True)  # --sessions kernel, the default
    files = [RawFile(d.node) for _ in range(ACTIVE + 1)]
    try:
        for f in files[:ACTIVE]:
            f.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        assert rc(files[ACTIVE].cmd(start_auth_session(policy=True))) == SESSION_HANDLES
        assert time.monotonic() - t0 < 1.0
    finally:
        for f in files:
            f.close()
    _no_sessions_left(d)


def test_kernel_mode_lets_a_foreign_flush_through(daemon: StartDaemon) -> None:
    d = daemon(inspectable=True)
    a, b = RawFile(d.node), RawFile(d.node)
    try:
        h = a.start()
        assert rc(b.cmd(flush_context(h))) == 0  # the kernel allows it (U10)
        assert a.touch(h) == int(TPM2_RC.REFERENCE_H0)
    finally:
        a.close()
        b.close()
    _no_sessions_left(d)


@pytest.mark.parametrize("swap", ["kernel", "lazy"])
def test_tpm2_tools_sessions_across_processes_keep_working(daemon: StartDaemon, tmp_path: Path, swap: str) -> None:
    """tpm2-tools keep a policy session in a context file from one run to the next (each run
    is a file that closes): under global accounting such a session is client-saved, then
    abandoned, and the next run loads it.  Seal to a policy, unseal through the session.
    The same on lazy swapping, where each run's objects stay loaded until it closes."""
    d = _global(daemon, idle=2, wait=5, swap=swap)
    secret = b"sealed under --sessions global\n"
    run = functools.partial(tpm2, d.node, cwd=tmp_path)
    run("tpm2_createprimary", "-C", "o", "-c", "primary.ctx")
    run("tpm2_pcrread", "sha256:0", "-o", "pcr.bin")
    run("tpm2_createpolicy", "--policy-pcr", "-l", "sha256:0", "-f", "pcr.bin", "-L", "pcr.policy")
    run("tpm2_create", "-C", "primary.ctx", "-L", "pcr.policy", "-i", "-", "-u", "seal.pub", "-r", "seal.priv",
        input=secret)  # fmt: skip
    run("tpm2_load", "-C", "primary.ctx", "-u", "seal.pub", "-r", "seal.priv", "-c", "seal.ctx")
    run("tpm2_startauthsession", "--policy-session", "-S", "session.ctx")
    assert len(settled_backend_handles(d).saved_sessions) == 1  # kept after the run's close
    run("tpm2_policypcr", "-S", "session.ctx", "-l", "sha256:0")
    assert run("tpm2_unseal", "-p", "session:session.ctx", "-c", "seal.ctx").stdout == secret
    run("tpm2_flushcontext", "session.ctx")
    _no_sessions_left(d)


def session_seam(argv: list[str]) -> object:
    """The seam the command line's one node gets (cusetpm.serve.Tenants.seam_for)."""
    from cusetpm.cli import build_parser
    from cusetpm.serve import Tenants
    from cusetpm.tenants.config import from_args

    config = from_args(build_parser().parse_args(argv), "fuse", "/nonexistent")
    return Tenants(None, config, "fuse").seam_for(config.nodes[0])  # type: ignore[arg-type]


def test_the_session_options_build_the_seam() -> None:
    from cusetpm.sessions import GlobalSessions

    def parse(argv: list[str]) -> list[str]:
        return argv

    assert session_seam(parse(["serve"])) is None  # kernel, the default: no seam at all
    seam = session_seam(
        parse(["serve", "--sessions", "global", "--session-tracking", "lazy", "--session-idle", "0.5",
               "--session-wait", "0"])
    )  # fmt: skip
    assert isinstance(seam, GlobalSessions)
    s = seam.settings
    assert (s.strict_tracking, s.evict_min_idle, s.session_wait) == (False, 0.5, 0.0)
    defaults = session_seam(parse(["serve", "--sessions", "global"]))
    assert isinstance(defaults, GlobalSessions)
    assert (defaults.settings.strict_tracking, defaults.settings.evict_min_idle) == (True, 2.0)
    assert defaults.settings.session_wait == 5.0


def test_a_negative_session_time_is_a_one_line_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "cusetpm", "serve", "--fuse", str(tmp_path / "mnt"), "--sessions", "global",
         "--session-wait", "-1", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == "cusetpm: error: session_wait must not be negative"


def _clients(d: Daemon, clients: int, seconds: float) -> list[int]:
    """``clients`` threads, each looping open, start, use, then flush or close, for
    ``seconds``; returns the rounds each completed.  Fails on any unexpected answer."""
    stop = time.monotonic() + seconds
    rounds = [0] * clients
    errors: list[str] = []

    def client(n: int) -> None:
        f = RawFile(d.node)
        try:
            while time.monotonic() < stop and not errors:
                rsp = f.cmd(start_auth_session(policy=True))
                if rc(rsp) != 0:
                    errors.append(f"client {n}: StartAuthSession {rc(rsp):#x}")
                    return
                h = be32(rsp, 10)
                if f.touch(h) not in (0, 0x000B0910):  # evicted meanwhile: the RM says so
                    errors.append(f"client {n}: use of {h:#x}")
                    return
                if rounds[n] % 2:
                    f.close()
                    f = RawFile(d.node)
                elif (got := rc(f.cmd(flush_context(h)))) not in (0, 0x000B01CB, 0x1CB):
                    # 0: flushed (or evicted: synthesized); after an eviction whose tombstone
                    # the use consumed, the handle is someone else's (refused) or nobody's.
                    errors.append(f"client {n}: flush of {h:#x}: {got:#x}")
                    return
                rounds[n] += 1
        finally:
            f.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    assert not errors, errors[:5]
    return rounds


@pytest.mark.parametrize("swap", ["kernel", "lazy"])
def test_more_clients_than_session_handles_all_make_progress(daemon: StartDaemon, swap: str) -> None:
    d = _global(daemon, idle=0.05, wait=5, swap=swap)
    rounds = _clients(d, ACTIVE + 8, 4.0)
    assert min(rounds) >= 1, rounds
    _no_sessions_left(d)


@pytest.mark.soak
@pytest.mark.parametrize("swap", ["kernel", "lazy"])
def test_100_clients_on_64_handles_no_starvation_no_leak(daemon: StartDaemon, swap: str) -> None:
    d = _global(daemon, idle=0.2, wait=5, swap=swap)
    rounds = _clients(d, 100, 60.0)
    assert min(rounds) * 2 >= max(rounds), rounds
    _no_sessions_left(d)


USES = 100_000


@pytest.mark.soak
@pytest.mark.parametrize("sessions", ["global", "kernel"])
def test_100000_uses_of_a_session_while_another_file_holds_an_idle_one(daemon: StartDaemon, sessions: str) -> None:
    """Past the context gap (65 531 session saves on swtpm): the kernel's RM fails the busy
    file with EFAULT there and destroys its session; global mode regaps the idle one."""
    d = _global(daemon, idle=2, wait=5) if sessions == "global" else daemon(inspectable=True)
    a, b = RawFile(d.node), RawFile(d.node)
    try:
        ha = a.start()
        assert a.touch(ha) == 0
        hb = b.start()
        random = command(int(TPM2_CC.GetRandom), struct.pack(">H", 8))
        for i in range(USES):
            try:
                rsp = b.cmd(random)  # the RM loads and saves b's session around each one
            except OSError as exc:
                assert sessions == "kernel", f"use {i}: {exc}"
                assert exc.errno == errno.EFAULT and 65_525 <= i <= 65_536, (i, exc)
                break
            assert rc(rsp) == 0, f"use {i}: {rc(rsp):#x}"
        else:
            assert sessions == "global", "the kernel's RM did not fail at the context gap"
        assert a.touch(ha) == 0
        if sessions == "global":
            assert b.touch(hb) == 0
            assert len(settled_backend_handles(d).saved_sessions) == 2
        else:
            assert len(settled_backend_handles(d).saved_sessions) == 1  # b's is gone
    finally:
        a.close()
        b.close()
    _no_sessions_left(d)


def test_quotas_from_the_command_line_are_answered_by_the_rm(daemon: StartDaemon) -> None:
    """--session-quota-uid closes the many-files loophole: the sessions of one uid over all
    its files; --session-quota-file bounds one file.  Refusals are 0x000B0905 and reach no TPM."""
    d = daemon(extra_args=["--sessions", "global", "--session-quota-uid", "3", "--session-quota-file", "2"])
    files = [os.open(d.node, os.O_RDWR) for _ in range(3)]

    def start(fd: int) -> int:
        os.write(fd, start_auth_session())
        return rc(os.read(fd, 4096))

    try:
        assert [start(files[0]), start(files[0]), start(files[0])] == [0, 0, 0x000B0905]  # 2 per file
        assert [start(files[1]), start(files[2])] == [0, 0x000B0905]  # 3 for the uid, over all its files
        os.write(files[1], flush_context(0x02000002))  # the uid's third session, freed
        assert rc(os.read(files[1], 4096)) == 0
        assert start(files[2]) == 0
    finally:
        for fd in files:
            os.close(fd)


def test_the_quota_options_build_the_settings() -> None:
    from cusetpm.sessions import GlobalSessions

    args = ["serve", "--sessions", "global", "--session-quota-uid", "5", "--session-quota-file", "1",
            "--session-quota-detached", "0"]  # fmt: skip
    seam = session_seam(args)
    assert isinstance(seam, GlobalSessions)
    s = seam.settings
    assert (s.max_sessions_per_uid, s.max_sessions_per_space, s.max_detached_per_space) == (5, 1, 0)


@pytest.mark.parametrize("tracking", ["strict", "lazy"])
def test_a_session_used_without_continue_session_leaves_the_registry(
    daemon: StartDaemon, tmp_path: Path, tracking: str
) -> None:
    """Research notes §8.2 S1, the HMAC step, through tpm2-pytss: a successful command whose
    response clears continueSession makes the TPM flush the session; strict tracking drops it
    from the registry at once, lazy tracking when the RM's next save of it fails."""
    from tpm2_pytss.constants import TPMA_SESSION

    d = _global(daemon, idle=2, wait=5, tracking=tracking, status_dir=tmp_path)
    with esapi(d.node) as ectx:
        keep = ectx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.HMAC, None, TPM2_ALG.SHA256)
        once = ectx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.HMAC, None, TPM2_ALG.SHA256)
        ectx.trsess_set_attributes(keep, TPMA_SESSION.CONTINUESESSION)
        ectx.trsess_set_attributes(once, TPMA_SESSION(0))  # the TPM ends it after one use
        assert status(d)["known"] == 2
        primary, *_ = ectx.create_primary(None, "ecc256", session1=once)  # the owner hierarchy's HMAC auth
        ectx.flush_context(primary)
        st = status(d)
        tpm = settled_backend_handles(d)
        assert len(tpm.saved_sessions) + len(tpm.loaded_sessions) == 1
        assert st["known"] == 1  # lazy: the RM's save right after the command already failed
        key = "lazy_corrections_save_ref_h0"
        assert st["counters"].get(key, 0) == (1 if tracking == "lazy" else 0), st["counters"]
        primary, *_ = ectx.create_primary(None, "ecc256", session1=keep)
        ectx.flush_context(primary)
        assert status(d)["known"] == 1
    _no_sessions_left(d)
