# SPDX-License-Identifier: GPL-2.0-only
"""The context gap under ``--sessions global`` (cusetpm.sessions.gap) on the fake TPM with a
short gap (300 session saves instead of swtpm's 65 531): the kernel's RM fails there, the
proactive and the reactive regap do not, and a blob a file saved itself keeps loading.  The
full-size run against swtpm is ``test_sessions_global.py``'s soak test."""

from __future__ import annotations

import errno

import pytest
from test_global_seam import Rig, touch

from cusetpm.kernel.wire import be32
from helpers import SyncFile, context_load, context_save, get_random, rc

GAP = 300
CONTEXT_SAVE = 0x162
USES = 1000


def _workload(rig: Rig) -> tuple[SyncFile, int, list[int]]:
    """A holds one idle session (the oldest saved); B uses its own USES times.  Returns A,
    its handle and the results of B's commands (rc, or -errno)."""
    a, b = rig.file(), rig.file()
    ha = rig.start(a)
    assert rc(a.cmd(touch(ha))) == 0
    rig.start(b)
    out = []
    for _ in range(USES):
        try:
            out.append(rc(b.cmd(get_random(8))))
        except OSError as exc:
            assert exc.errno is not None
            out.append(-exc.errno)
    return a, ha, out


def test_the_kernel_fails_at_the_gap():
    rig = Rig(global_mode=False, gap=GAP)
    _, _, out = _workload(rig)
    first = next(i for i, r in enumerate(out) if r)
    assert out[first] == -errno.EFAULT and GAP - 5 <= first <= GAP + 5


@pytest.mark.parametrize("proactive", [True, False])
def test_global_mode_regaps_and_nothing_fails(proactive: bool):
    rig = Rig(gap=GAP, gap_proactive=proactive, gap_margin=16)
    a, ha, out = _workload(rig)
    assert set(out) == {0}
    assert rc(a.cmd(touch(ha))) == 0
    counters = rig.snap["counters"]
    if proactive:
        assert counters["regaps_proactive"] >= 1 and "gap_rc_seen" not in counters
    else:
        assert counters["gap_rc_seen"] >= 1 and counters["regaps_reactive"] >= 1
    assert rig.snap["known"] == len(rig.fake.sessions) == 2
    gap = rig.snap["gap"]
    assert gap["gap_max"] == GAP and gap["gap_eff"] == GAP - 4
    assert gap["next_seq"] - gap["oldest_seq"] < GAP


def test_a_client_saved_blob_is_served_refreshed_after_a_regap():
    rig = Rig(gap=GAP, gap_margin=16)
    c = rig.file()
    hc = rig.start(c)
    blob = c.cmd(context_save(hc))[10:]  # C's detached session is the oldest saved one
    _, _, out = _workload(rig)
    assert set(out) == {0}
    assert rig.snap["counters"]["regaps_proactive"] >= 1
    rsp = c.cmd(context_load(blob))  # the TPM would refuse these bytes now
    assert rc(rsp) == 0 and be32(rsp, 10) == hc
    assert rig.snap["counters"]["blob_substitutions"] == 1
    assert rc(c.cmd(touch(hc))) == 0


def test_the_file_that_meets_the_gap_on_its_own_save_is_repaired():
    """Reactive case (d): a client ContextSave answered 0x901 is regapped and resent."""
    rig = Rig(gap=GAP, gap_proactive=False)
    a, b = rig.file(), rig.file()
    rig.start(a)
    hb = rig.start(b)
    # A's save was the first (sequence 1), B's the second; each GetRandom saves B once more.
    # After GAP - 1 of them the next session save is one too many.
    for _ in range(GAP - 1):
        assert rc(b.cmd(get_random(8))) == 0
    assert "gap_rc_seen" not in rig.snap["counters"]
    saved = b.cmd(context_save(hb))
    assert rc(saved) == 0
    assert rig.snap["states"]["detached"] == 1
    counters = rig.snap["counters"]
    assert counters["gap_rc_seen"] >= 1 and counters["regaps_reactive"] >= 1
    assert rc(b.cmd(context_load(saved[10:]))) == 0


def test_a_resident_file_saves_nothing_so_its_uses_never_reach_the_gap():
    """``--swap lazy``: B stays resident (its session loaded) through all its uses, so the
    TPM's counter does not move and nothing needs regapping."""
    rig = Rig(swap=1, gap=GAP, gap_margin=16)
    a, ha, out = _workload(rig)
    assert set(out) == {0}
    assert rc(a.cmd(touch(ha))) == 0
    counters = rig.snap["counters"]
    assert not {k for k in counters if k.startswith(("regaps", "gap_rc"))}
    assert rig.snap["gap"]["next_seq"] < 10


@pytest.mark.parametrize("proactive", [True, False])
def test_files_taking_turns_on_lazy_swapping_are_regapped_and_nothing_fails(proactive: bool):
    """Each turn puts the other file away (a session save), so the counter moves as under
    the kernel: A's idle session is regapped, either ahead of time (every resident file put
    away first) or when a put-away meets 0x901 (the save is sent again)."""
    rig = Rig(swap=1, gap=GAP, gap_proactive=proactive, gap_margin=16)
    a, b, c = rig.file(), rig.file(), rig.file()
    ha = rig.start(a)
    assert rc(a.cmd(touch(ha))) == 0
    hb, hc = rig.start(b), rig.start(c)
    out = set()
    for _ in range(GAP):
        out |= {rc(b.cmd(touch(hb))), rc(c.cmd(touch(hc)))}
    assert out == {0}
    assert {rc(f.cmd(touch(h))) for f, h in ((a, ha), (b, hb), (c, hc))} == {0}
    counters = rig.snap["counters"]
    if proactive:
        assert counters["regaps_proactive"] >= 1
    else:
        assert counters["gap_rc_seen"] >= 1 and counters["regaps_reactive"] >= 1
    assert "lazy_corrections_load_handle" not in counters and rig.snap["known"] == 3
    for f in (a, b, c):
        f.close()
    assert rig.fake.sessions == {}


def test_a_file_resident_for_long_is_not_regapped_from_its_stale_blob():
    """Two files resident: F stays loaded while B and C take the other place in turn (their
    saves move the counter).  F's last saved context grows old, but F's session is loaded,
    not saved: no regap's business (counting it would put every file away for nothing, and
    a regap from that stale blob would lose the session).  The saved contexts are young:
    nothing needs regapping."""
    rig = Rig(active=8, swap=2, gap=GAP, gap_margin=16)
    f, b, c = rig.file(), rig.file(), rig.file()
    hf, hb, hc = rig.start(f), rig.start(b), rig.start(c)  # c puts f away once: an old blob
    out = set()
    for _ in range(GAP):
        out |= {rc(f.cmd(touch(hf))), rc(b.cmd(touch(hb))), rc(f.cmd(touch(hf))), rc(c.cmd(touch(hc)))}
    assert out == {0}
    counters = rig.snap["counters"]
    assert rig.snap["gap"]["next_seq"] > GAP  # the counter went past the gap
    # F was put away once, at c's start, and never again: nothing old was waiting for it.
    saves_of_f = [cmd for cmd in rig.fake.commands if be32(cmd, 6) == CONTEXT_SAVE and be32(cmd, 10) == hf]
    assert len(saves_of_f) == 1
    assert not {k for k in counters if k.startswith(("regaps", "gap_rc", "lazy_corrections", "tombstone"))}


def test_a_proactive_regap_puts_the_resident_files_away_first():
    """Each file holds three sessions, all the TPM can have loaded (swtpm's limit): a regap's
    ContextLoad finds room only once the resident file is put away, and then the gap is never
    met."""
    rig = Rig(active=8, swap=1, loaded=3, gap=GAP, gap_margin=16)
    a, b, c = rig.file(), rig.file(), rig.file()
    ha = rig.start(a)
    assert rc(a.cmd(touch(ha))) == 0
    hb = [rig.start(b) for _ in range(3)]
    hc = [rig.start(c) for _ in range(3)]
    out = set()
    for _ in range(GAP // 6 + 10):
        out |= {rc(b.cmd(touch(hb[0]))), rc(c.cmd(touch(hc[0])))}
    assert out == {0}
    counters = rig.snap["counters"]
    assert counters["regaps_proactive"] >= 1 and "gap_rc_seen" not in counters
    assert rc(a.cmd(touch(ha))) == 0


def test_the_sessions_package_is_sans_io_and_imports_only_the_core():
    """The kernel's port, and lazy swapping (itself sans-I/O on the port) it may run on."""
    import ast
    from pathlib import Path

    import cusetpm.sessions

    for path in Path(cusetpm.sessions.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add(("." * node.level) + (node.module or ""))
        assert not {n.split(".")[0] for n in names} & {"trio", "socket", "pyfuse3", "subprocess"}, path.name
        outside = {n for n in names if n.startswith("..") and not n.startswith(("..kernel", "..swap"))}
        assert not outside, f"{path.name} imports {outside}"
        assert not {n for n in names if n.startswith("cusetpm")}, path.name
