# SPDX-License-Identifier: GPL-2.0-only
"""Global session accounting (cusetpm.sessions.global_seam) on the fake TPM: admission,
eviction, what the owner of an evicted session sees, waiting, strict and lazy tracking,
isolation, quotas and continuation.  Bytes only and a fake clock, so every rule is exact; the
same scenarios against swtpm through a real node are in tests/test_sessions_global.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from tpm2_pytss.constants import TPM2_CC, TPM2_RC

from cusetpm.kernel.profiles import PROFILES
from cusetpm.kernel.request import Send, Sleep, Wait
from cusetpm.kernel.structs import Chip
from cusetpm.kernel.tpm2_cmd import auto_startup
from cusetpm.kernel.tpm_dev_common import tpm_dev_transmit
from cusetpm.kernel.wire import be32, command, u32
from cusetpm.sessions import GlobalSessions, Settings
from cusetpm.swap import LazySwap
from cusetpm.testing.fake_tpm import FakeTpm
from helpers import SyncFile, context_load, context_save, create_primary, flush_context, rc, start_auth_session

SAS = int(TPM2_CC.StartAuthSession)
FLUSH = int(TPM2_CC.FlushContext)
GETCAP = int(TPM2_CC.GetCapability)
TOUCH = int(TPM2_CC.PolicyGetDigest)
#: The same answers on the kernel's load and save and on ``--swap lazy`` (one and three
#: resident files), where the TPM sees fewer saves and other commands in between.
SWAP = pytest.mark.parametrize("swap", [0, 1, 3])


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Rig:
    """A fake TPM with ``active`` session handles, a chip with the seam, and files on it."""

    def __init__(
        self,
        active: int = 4,
        global_mode: bool = True,
        gap: int | None = None,
        swap: int = 0,
        loaded: int | None = None,
        **settings: Any,
    ) -> None:
        """``swap``: on ``--swap lazy`` with that many resident files (0: the kernel's load and
        save); ``loaded``: the TPM's MAX_LOADED_SESSIONS."""
        self.fake = FakeTpm(max_active=active, reuse_handles=True, context_gap=gap, max_loaded_sessions=loaded)
        self.chip = Chip(PROFILES["6.12"])
        self.fake.run(auto_startup(self.chip))
        self.clock = Clock()
        self.lazy = LazySwap(swap) if swap else None
        self.seam = GlobalSessions(Settings(**settings), clock=self.clock, swap=self.lazy) if global_mode else None
        self.chip.seam = self.seam
        self.fake.ccs.clear()

    def file(self, uid: int = 1000) -> SyncFile:
        f = SyncFile(self.chip, self.fake)
        f.state.space.owner = SimpleNamespace(uid=uid)
        return f

    def start(self, f: SyncFile, policy: bool = True) -> int:
        rsp = f.cmd(start_auth_session(policy))
        assert rc(rsp) == 0, hex(rc(rsp))
        return be32(rsp, 10)

    def sent(self) -> list[int]:
        out = list(self.fake.ccs)
        self.fake.ccs.clear()
        return out

    @property
    def snap(self) -> dict[str, Any]:
        assert self.seam is not None
        return self.seam.snapshot()


def touch(h: int) -> bytes:
    return command(TOUCH, u32(h))


def with_session(h: int, attrs: int = 1) -> bytes:
    """GetRandom(8) authorized by session ``h`` (attrs: continueSession by default)."""
    auth = u32(h) + b"\x00\x00" + bytes([attrs]) + b"\x00\x00"
    return command(int(TPM2_CC.GetRandom), u32(len(auth)) + auth + b"\x00\x08", tag=0x8002)


class Pending:
    """A command that may yield Wait: run it until it waits, let the test run others, then
    resume it with whether its event was signalled meanwhile (as TpmChip.run does)."""

    def __init__(self, rig: Rig, f: SyncFile, data: bytes) -> None:
        self.rig, self.f = rig, f
        f.state.accept_write(data)
        self.gen = tpm_dev_transmit(rig.chip, f.state.space, f.state.buf)
        self.wait: Wait | None = None
        self.result: int | None = None
        self._step(None)

    def _step(self, reply: Any) -> None:
        try:
            while True:
                req = self.gen.send(reply)
                if isinstance(req, Send):
                    reply = self.rig.fake.transport(req)
                elif isinstance(req, Sleep):
                    reply = None
                else:
                    self.wait = req
                    return
        except StopIteration as stop:
            self.wait, self.result = None, stop.value

    def resume(self) -> None:
        assert self.wait is not None
        signalled = self.wait.event in self.rig.chip.signals
        self.rig.chip.signals.clear()
        self._step(signalled)

    def rsp(self) -> bytes:
        assert self.result is not None and self.result > 0
        return bytes(self.f.state.buf[: self.result])


def full(rig: Rig) -> tuple[SyncFile, SyncFile, list[int], list[int]]:
    """Two files with two sessions each on a 4-handle TPM, a's first the least recently used."""
    a, b = rig.file(), rig.file()
    ha = [rig.start(a)]
    rig.clock.t += 1
    hb = [rig.start(b), rig.start(b)]
    rig.clock.t += 1
    ha.append(rig.start(a))
    rig.sent()
    return a, b, ha, hb


# --- admission and eviction ------------------------------------------------------------------


def test_with_free_slots_the_only_extra_command_is_one_capability_read():
    kernel, glob = Rig(global_mode=False), Rig()
    for rig in (kernel, glob):
        f = rig.file()
        h = rig.start(f)
        assert rc(f.cmd(touch(h))) == 0
        rig.start(f)
        f.close()
    k, g = kernel.sent(), glob.sent()
    assert g[0] == GETCAP and g[1:] == k
    assert glob.fake.sessions == {} and glob.snap["known"] == 0


def test_exhaustion_evicts_the_lru_idle_session_of_another_file_right_before_the_command():
    rig = Rig(evict_min_idle=2.0)
    a, b, ha, hb = full(rig)
    c = rig.file()
    rig.clock.t += 2.5  # everything idle now; a's first session is the least recently used
    h = rig.start(c)
    assert rig.sent() == [FLUSH, SAS, int(TPM2_CC.ContextSave)]
    assert h == ha[0]  # the TPM hands the freed index out again at once
    snap = rig.snap
    assert snap["counters"]["evictions_attached"] == 1 and snap["known"] == 4
    assert a.state.space.session_tbl.count(0) == 2  # a keeps only its second session
    # a's next use of the evicted handle is answered by the RM, not sent (it is c's now).
    assert rc(a.cmd(touch(ha[0]))) == 0x000B0910
    assert FLUSH not in rig.sent() and TOUCH not in rig.fake.ccs
    # The tombstone answers once; the next use goes to the TPM (0x910: c's saved session).
    assert rc(a.cmd(touch(ha[0]))) == int(TPM2_RC.REFERENCE_H0)
    assert rc(a.cmd(touch(ha[1]))) == 0  # the other session works


@SWAP
def test_an_evicted_session_in_the_auth_area_and_its_flush(swap: int):
    rig = Rig(swap=swap, evict_min_idle=2.0)
    a, b, ha, hb = full(rig)
    c = rig.file()
    rig.clock.t += 2.5
    rig.start(c)
    rig.clock.t += 0.1
    rig.start(c)  # second victim: b's first session
    rig.sent()
    assert rc(a.cmd(with_session(ha[0]))) == 0x000B0918
    assert rc(b.cmd(flush_context(hb[0]))) == 0  # synthesized
    assert rig.sent() == []
    assert rig.snap["counters"]["tombstone_hits"] == 2


@SWAP
def test_the_requester_never_evicts_its_own_session(swap: int):
    rig = Rig(swap=swap, evict_min_idle=2.0)
    a, b, ha, hb = full(rig)
    rig.clock.t += 5
    assert rig.start(a) == hb[0]  # a holds the globally LRU session; b's LRU one goes
    assert rc(a.cmd(touch(ha[0]))) == 0
    assert rc(b.cmd(touch(hb[0]))) == 0x000B0910


@SWAP
def test_sessions_used_within_the_idle_time_are_not_evicted(swap: int):
    rig = Rig(swap=swap, evict_min_idle=2.0, session_wait=0)
    a, b, ha, hb = full(rig)
    for f, hs in ((a, ha), (b, hb)):
        for h in hs:
            assert rc(f.cmd(touch(h))) == 0
    rig.clock.t += 1.9
    c = rig.file()
    assert rc(c.cmd(start_auth_session(True))) == int(TPM2_RC.SESSION_HANDLES)  # no waiting: the TPM's answer
    assert "evictions_attached" not in rig.snap["counters"]
    assert rig.snap["counters"]["waits_refused"] == 1
    rig.clock.t += 0.2
    assert rig.start(c) == ha[0]


@SWAP
def test_a_full_table_is_answered_by_the_rm(swap: int):
    rig = Rig(swap=swap, active=8)
    f = rig.file()
    for _ in range(3):
        rig.start(f)
    rig.sent()
    assert rc(f.cmd(start_auth_session(True))) == 0x000B0903
    assert rig.sent() == [] and rig.snap["counters"]["quota_rejections_table"] == 1


@SWAP
def test_abandoned_sessions_go_first(swap: int):
    rig = Rig(swap=swap, evict_min_idle=2.0)
    a, b, ha, hb = full(rig)
    rig.clock.t += 5
    saved = b.cmd(context_save(hb[1]))  # b's newest use, then b closes
    assert rc(saved) == 0
    b.close()
    assert rig.snap["states"] == {"attached": 2, "detached": 0, "abandoned": 1, "foreign": 0}
    rig.start(rig.file())  # full again
    rig.sent()
    assert rig.start(rig.file()) == hb[1]
    assert rig.sent()[0] == FLUSH and rig.snap["counters"]["evictions_abandoned"] == 1
    assert rc(rig.file().cmd(context_load(saved[10:]))) == 0x000B01CB  # its blob is refused
    assert rc(a.cmd(touch(ha[0]))) == 0 and rc(a.cmd(touch(ha[1]))) == 0


# --- waiting -----------------------------------------------------------------------------------


@SWAP
def test_a_waiter_is_served_by_a_flush_and_sends_once(swap: int):
    rig = Rig(swap=swap, evict_min_idle=60, session_wait=5)
    a, b, ha, hb = full(rig)
    w = Pending(rig, rig.file(), start_auth_session(True))
    assert w.wait is not None and rig.sent() == []  # queued, nothing sent
    assert rig.snap["queue"] == 1
    rig.clock.t += 0.5
    assert rc(b.cmd(flush_context(hb[0]))) == 0
    assert w.wait.event in rig.chip.signals  # the flush itself wakes it (strict)
    w.resume()
    assert rc(w.rsp()) == 0 and be32(w.rsp(), 10) == hb[0]
    assert rig.sent().count(SAS) == 1
    snap = rig.snap
    assert snap["counters"]["waits"] == 1 and snap["queue"] == 0 and snap["max_wait_ms"] == 500.0


@SWAP
def test_a_waiter_is_served_by_a_session_ended_with_continue_session_clear(swap: int):
    rig = Rig(swap=swap, evict_min_idle=60)
    a, b, ha, hb = full(rig)
    w = Pending(rig, rig.file(), start_auth_session(True))
    assert rc(b.cmd(with_session(hb[1], attrs=0))) == 0  # the TPM ends the session
    assert hb[1] not in rig.fake.sessions and rig.snap["known"] == 3
    assert w.wait is not None and w.wait.event in rig.chip.signals
    w.resume()
    assert rc(w.rsp()) == 0
    assert "lazy_corrections_save_ref_h0" not in rig.snap["counters"]


@SWAP
def test_waiters_are_served_in_order_and_a_close_frees_slots(swap: int):
    rig = Rig(swap=swap, evict_min_idle=60)
    a, b, ha, hb = full(rig)
    w1 = Pending(rig, rig.file(), start_auth_session(True))
    rig.clock.t += 0.1
    w2 = Pending(rig, rig.file(), start_auth_session(True))
    rig.clock.t += 0.1
    w3 = Pending(rig, rig.file(), start_auth_session(True))
    assert rig.snap["queue"] == 3
    assert w1.wait is not None and w2.wait is not None and w3.wait is not None
    assert rc(b.cmd(flush_context(hb[0]))) == 0  # one slot: w1's, not w3's nor a newcomer's
    assert w1.wait.event in rig.chip.signals and w2.wait.event not in rig.chip.signals
    late = rig.file()
    assert Pending(rig, late, start_auth_session(True)).wait is not None  # no barging
    w1.resume()
    assert rc(w1.rsp()) == 0
    a.close()  # two slots: w2 and w3
    assert {w2.wait.event, w3.wait.event} <= set(rig.chip.signals)
    signals = list(rig.chip.signals)
    w2.resume()
    rig.chip.signals[:] = signals
    w3.resume()
    assert rc(w2.rsp()) == 0 and rc(w3.rsp()) == 0


def test_a_waiter_times_out_with_the_tpms_own_answer():
    rig = Rig(evict_min_idle=60, session_wait=3)
    full(rig)
    w = Pending(rig, rig.file(), start_auth_session(True))
    assert w.wait is not None and w.wait.timeout == pytest.approx(3)
    rig.clock.t += 3.01
    w.resume()
    assert rc(w.rsp()) == int(TPM2_RC.SESSION_HANDLES)
    assert rig.sent() == [SAS]  # sent once, at the deadline
    assert rig.snap["counters"]["wait_timeouts"] == 1 and rig.snap["queue"] == 0


def test_the_head_waiter_evicts_once_a_session_becomes_idle():
    rig = Rig(evict_min_idle=3.0, session_wait=5)
    a, b, ha, hb = full(rig)
    w = Pending(rig, rig.file(), start_auth_session(True))
    assert w.wait is not None and w.wait.timeout == pytest.approx(1.001)  # a's first: 3 s after its use
    rig.clock.t += w.wait.timeout
    w.resume()
    assert rc(w.rsp()) == 0 and be32(w.rsp(), 10) == ha[0]
    assert rig.sent() == [FLUSH, SAS, int(TPM2_CC.ContextSave)]


# --- tracking, isolation, continuation, quotas ---------------------------------------------------


@SWAP
def test_lazy_tracking_notices_a_flush_at_the_rms_save(swap: int):
    for strict in (True, False):
        rig = Rig(swap=swap, strict_tracking=strict)
        f = rig.file()
        h = rig.start(f)
        rig.start(f)
        assert rc(f.cmd(flush_context(h))) == 0
        assert rc(f.cmd(with_session(rig.start(f), attrs=0))) == 0
        snap = rig.snap
        assert snap["known"] == 1 == len(rig.fake.sessions)
        assert snap["counters"].get("lazy_corrections_save_ref_h0", 0) == (0 if strict else 2)


@SWAP
def test_a_foreign_flush_is_refused_and_allowed_only_when_isolation_is_off(swap: int):
    rig = Rig(swap=swap)
    a, b = rig.file(), rig.file()
    h = rig.start(a)
    rig.sent()
    assert rc(b.cmd(flush_context(h))) == 0x000B01CB and rig.sent() == []
    assert rc(a.cmd(touch(h))) == 0
    rig = Rig(swap=swap, isolate_session_flush=False)
    a, b = rig.file(), rig.file()
    h = rig.start(a)
    assert rc(b.cmd(flush_context(h))) == 0
    assert rc(a.cmd(touch(h))) == 0x000B0910  # a is told it lost it
    assert rig.snap["known"] == 0


@SWAP
def test_a_client_saved_session_is_detached_abandoned_and_loadable_by_a_later_file(swap: int):
    rig = Rig(swap=swap)
    a = rig.file()
    h = rig.start(a)
    blob = a.cmd(context_save(h))[10:]
    assert rig.snap["states"]["detached"] == 1 and a.state.space.session_tbl == [0, 0, 0]
    a.close()
    assert rig.snap["states"]["abandoned"] == 1 and list(rig.fake.sessions) == [h]
    c = rig.file(uid=2000)
    rsp = c.cmd(context_load(blob))
    assert rc(rsp) == 0 and be32(rsp, 10) == h
    assert rig.snap["states"]["attached"] == 1 and rc(c.cmd(touch(h))) == 0
    c.close()
    assert rig.fake.sessions == {} and rig.snap["known"] == 0


@SWAP
def test_abandoned_sessions_are_bounded(swap: int):
    rig = Rig(swap=swap, active=8, max_abandoned=2)
    blobs = []
    for _ in range(4):
        f = rig.file()
        blobs.append(f.cmd(context_save(rig.start(f)))[10:])
        rig.clock.t += 1
        f.close()
    assert len(rig.fake.sessions) == 2 and rig.snap["counters"]["abandoned_pruned"] == 2
    g = rig.file()
    assert [rc(g.cmd(context_load(b))) for b in blobs[:2]] == [0x000B01CB] * 2
    assert rc(g.cmd(context_load(blobs[3]))) == 0


@SWAP
def test_quotas_are_answered_by_the_rm(swap: int):
    rig = Rig(swap=swap, active=16, max_sessions_per_space=2, max_sessions_per_uid=3, max_detached_per_space=1)
    a = rig.file()
    h, h2 = rig.start(a), rig.start(a)
    rig.sent()
    assert rc(a.cmd(start_auth_session(True))) == 0x000B0905  # per file
    b = rig.file()
    rig.start(b)
    rig.sent()
    assert rc(b.cmd(start_auth_session(True))) == 0x000B0905  # per uid: 3 over a and b
    assert rig.sent() == []
    assert rig.start(rig.file(uid=7)) > 0  # another uid
    assert rc(a.cmd(context_save(h))) == 0
    rig.sent()
    assert rc(a.cmd(context_save(h2))) == 0x000B0905  # a second detached session
    assert rig.sent() == []
    counters = rig.snap["counters"]
    assert counters["quota_rejections_space"] == 1 and counters["quota_rejections_uid"] == 1
    assert counters["quota_rejections_detached"] == 1


def test_unknown_sessions_are_found_by_recalibration_and_then_someone_idle_is_evicted():
    rig = Rig(active=4, evict_min_idle=1.0)
    foreign = rig.fake.execute(start_auth_session(True))  # not through the RM
    assert rc(foreign) == 0
    a, b = rig.file(), rig.file()
    rig.start(a)
    rig.start(a)
    rig.start(b)  # the TPM is full; the registry believes 3 of 4
    rig.clock.t += 2
    rig.sent()
    h = rig.start(rig.file())
    assert rig.sent()[:4] == [SAS, GETCAP, GETCAP, FLUSH]  # 0x905, recalibrate, evict
    snap = rig.snap
    assert snap["counters"]["recalibrations"] == 1 and snap["states"]["foreign"] == 1
    assert be32(foreign, 10) in rig.fake.sessions and h in rig.fake.sessions


@SWAP
def test_an_error_path_that_flushes_the_space_leaves_tombstones(swap: int):
    rig = Rig(swap=swap)
    a = rig.file()
    h = rig.start(a)
    with pytest.raises(OSError):  # no such transient handle: the kernel flushes the space
        a.write(command(int(TPM2_CC.ReadPublic), u32(0x80FFFFFE)))
    assert rig.fake.sessions == {} and rig.snap["known"] == 0
    assert rc(a.cmd(touch(h))) == 0x000B0910


def test_settings_are_checked():
    with pytest.raises(ValueError):
        Settings(max_sessions_per_space=4)
    with pytest.raises(ValueError):
        Settings(session_wait=-1)
    assert Settings().evict_min_idle == 2.0 and Settings().session_wait == 5.0


def test_kernel_mode_still_gets_the_tpms_0x905():
    rig = Rig(global_mode=False)
    full(rig)
    assert rc(rig.file().cmd(start_auth_session(True))) == int(TPM2_RC.SESSION_HANDLES)


# --- on lazy swapping (--swap lazy --sessions global) -------------------------------------


def test_a_resident_files_session_is_evicted_loaded_and_its_owner_is_told():
    """The victim's owner holds the TPM (its sessions loaded, its buffer stale): the session
    is flushed where it is, the owner put away with the rest, and told on its next use."""
    rig = Rig(swap=1, evict_min_idle=2.0)
    a, b, ha, hb = full(rig)
    assert rig.lazy is not None and rig.lazy.is_resident(a.state.space)
    assert rig.fake.loaded_sessions() == sorted(ha)  # a's, loaded between commands
    rig.clock.t += 2.5
    c = rig.file()
    assert rig.start(c) == ha[0]
    # Evicted loaded, then a (resident) put away, then the command: no save of a's victim.
    assert rig.sent() == [FLUSH, int(TPM2_CC.ContextSave), SAS]
    assert a.state.space.session_tbl.count(0) == 2
    assert rc(a.cmd(touch(ha[0]))) == 0x000B0910
    assert rc(a.cmd(touch(ha[1]))) == 0
    assert {rc(b.cmd(touch(h))) for h in hb} == {0}
    for f in (a, b, c):
        f.close()
    assert rig.fake.sessions == {} and rig.fake.objects == {} and rig.snap["known"] == 0


def test_a_closing_resident_file_leaves_nothing_loaded():
    rig = Rig(swap=1)
    a = rig.file()
    rig.start(a)
    assert rc(a.cmd(create_primary())) == 0
    assert rig.fake.objects and rig.fake.loaded_sessions()  # resident: loaded, never saved
    a.close()
    assert rig.fake.sessions == {} and rig.fake.objects == {} and rig.snap["known"] == 0


def test_what_the_daemon_flushed_is_told_to_the_resident_owner():
    """After a lost answer the daemon flushes everything loaded: a resident file's sessions
    go with it, and its next use of one is the RM's tombstone, not a reused handle."""
    rig = Rig(swap=1)
    a = rig.file()
    h = rig.start(a)
    rig.fake.sessions.clear()  # what the daemon's flush of everything loaded did
    assert rig.seam is not None
    rig.seam.loaded_flushed()
    assert rig.lazy is not None and not rig.lazy.residents and rig.snap["known"] == 0
    assert rc(a.cmd(touch(h))) == 0x000B0910


def test_both_features_are_reported_and_told():
    rig = Rig(swap=2)
    assert rig.seam is not None and rig.seam.features == (rig.seam, rig.lazy)
    alone = Rig().seam
    assert alone is not None and alone.features == (alone,)
