# SPDX-License-Identifier: GPL-2.0-only
"""cusetpm.swap.lazy (``--swap lazy``): a file alone costs one backend command per command,
and every answer, and what the TPM holds whenever another file or a close looks, is the
kernel's.  Against real swtpms, driven synchronously: each script runs once with the kernel's
seam and once with LazySwap, on fresh TPMs, and the answers are compared."""

from __future__ import annotations

import errno
import struct
from typing import Callable

import pytest

from cusetpm.kernel import wire
from cusetpm.kernel.structs import Chip
from cusetpm.kernel.tpm2_cmd import flush_context as flush_context_of
from cusetpm.sessions import GlobalSessions
from cusetpm.swap import LazySwap
from helpers import (
    RawTpm,
    SyncFile,
    context_save,
    create_primary,
    flush_context,
    get_cap_handles,
    get_random,
    make_chip,
    rc,
    read_public,
    start_auth_session,
)

V0, V1 = 0x80FFFFFF, 0x80FFFFFE
Step = tuple[str, Callable[[], bytes]]


def shape(rsp: bytes, cmd: bytes) -> tuple[int, ...]:
    """What does not depend on TPM randomness: rc, length, and a returned (virtual) handle."""
    out: tuple[int, ...] = (rc(rsp), len(rsp))
    cc = wire.be32(cmd, 6)
    if rc(rsp) == 0 and cc in (0x131, 0x176, 0x161):  # CreatePrimary, StartAuthSession, ContextLoad
        out += (wire.be32(rsp, 10),)
    if rc(rsp) == 0 and cc == wire.CC_GET_CAPABILITY:
        out += tuple(rsp[10:])
    return out


def run(
    steps: list[Step], lazy: bool, profile: str, residents: int = 1, sessions: bool = False
) -> tuple[list[tuple[int, ...]], list[int], dict[str, list[int]]]:
    """``sessions``: under global session accounting (on lazy swapping if ``lazy``)."""
    raw = RawTpm.start()
    try:
        chip: Chip = make_chip(raw, profile)
        swap = LazySwap(residents) if lazy else None
        chip.seam = GlobalSessions(swap=swap) if sessions else swap
        files: dict[str, SyncFile] = {}
        answers, between = [], {}
        for name, build in steps:
            if name.startswith("close "):
                files.pop(name.split()[1]).close()
                between[name] = raw.handles(0x80000000) + raw.handles(0x02000000)
                continue
            f = files.setdefault(name, SyncFile(chip, raw))
            data = build()
            try:
                answers.append(shape(f.cmd(data), data))
            except OSError as exc:  # write() failed: its errno is the answer
                answers.append((-(exc.errno or 0),))
        for f in files.values():
            f.close()
        left = raw.handles(0x80000000) + raw.handles(0x02000000) + raw.handles(0x03000000)
        return answers, left, between
    finally:
        raw.close()


def get_cap_properties(first: int = 0x20E, count: int = 8) -> bytes:
    """GetCapability(TPM_PROPERTIES) from TPM_PT_HR_TRANSIENT_AVAIL: the free slots."""
    return wire.command(wire.CC_GET_CAPABILITY, struct.pack(">III", 6, first, count))


def get_random_in(session: int) -> bytes:
    """GetRandom with ``session`` in its authorization area (continueSession, empty nonce, hmac)."""
    auth = struct.pack(">IIHBH", 9, session, 0, 1, 0)
    return wire.command(wire.CC_GET_RANDOM, auth + struct.pack(">H", 8), tag=0x8002)


SCRIPTS: dict[str, list[Step]] = {
    "one file, a key": [("a", create_primary)] + [("a", lambda: read_public(V0)), ("a", get_random)] * 3,
    "two files take turns": [
        ("a", create_primary), ("b", create_primary), ("a", lambda: read_public(V0)), ("b", lambda: read_public(V0)),
        ("b", create_primary), ("a", lambda: get_cap_handles()), ("b", lambda: get_cap_handles()),
        ("close b", bytes), ("a", lambda: read_public(V0)),
    ],
    "flushing its own object": [
        ("a", create_primary), ("a", create_primary), ("a", lambda: flush_context(V0)),
        ("a", lambda: read_public(V0)), ("a", lambda: read_public(V1)), ("a", create_primary),
        ("a", lambda: read_public(V0)),
    ],
    "a handle it does not have": [
        ("a", create_primary), ("a", lambda: read_public(0x80FFFFFD)), ("a", lambda: read_public(V0)),
    ],
    "out of slots": [("a", create_primary)] * 4 + [("a", lambda: read_public(V1)), ("a", lambda: get_cap_handles())],
    "sessions": [
        ("a", start_auth_session), ("a", start_auth_session), ("b", start_auth_session), ("a", get_random),
        ("a", lambda: context_save(0x02000000)), ("close a", bytes), ("b", get_random),
    ],
    "three files fill the TPM": [
        ("a", create_primary), ("a", create_primary), ("a", create_primary), ("b", create_primary),
        ("c", start_auth_session), ("c", create_primary), ("a", lambda: read_public(0x80FFFFFD)),
        ("b", lambda: read_public(V0)), ("c", lambda: read_public(V0)), ("a", lambda: read_public(V0)),
    ],
    "sessions fill the TPM": [
        ("a", start_auth_session), ("a", start_auth_session), ("a", start_auth_session), ("b", start_auth_session),
        ("b", start_auth_session), ("b", get_random), ("a", get_random), ("close a", bytes), ("b", get_random),
    ],
    "another file asks what is free": [
        ("a", create_primary), ("a", create_primary), ("a", start_auth_session), ("b", get_cap_properties),
        ("b", lambda: get_cap_handles(0x02000000)), ("a", get_cap_properties), ("a", get_random),
    ],
    "a session another file holds": [
        ("a", start_auth_session), ("a", get_random), ("b", lambda: get_random_in(0x02000000)),
        ("b", start_auth_session), ("b", lambda: get_random_in(0x02000001)), ("a", lambda: get_random_in(0x02000000)),
    ],
    "another file flushes my session": [
        ("a", start_auth_session), ("a", create_primary), ("b", lambda: flush_context(0x02000000)),
        ("a", get_random), ("a", lambda: read_public(V0)), ("a", start_auth_session),
    ],
}  # fmt: skip


@pytest.mark.parametrize("profile", ["6.1", "6.12"])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_answer_and_what_the_tpm_holds_is_the_kernels(script: str, profile: str) -> None:
    kernel, lazy = run(SCRIPTS[script], False, profile), run(SCRIPTS[script], True, profile)
    assert lazy[0] == kernel[0]  # every answer
    assert lazy[2] == kernel[2]  # the TPM after each close
    assert lazy[1] == kernel[1]  # what is left behind at the end


@pytest.mark.parametrize("profile", ["6.1", "6.12"])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_with_several_files_resident_every_answer_is_the_kernels(script: str, profile: str) -> None:
    """``--swap-residents 3``: the TPM holds other files' contexts between commands (so a
    direct look at it differs), but every answer through the node, and what is left once all
    are closed, is the kernel's: out of memory, a file is put away and the command sent again;
    a TPM-wide command or another file's session finds the others put away."""
    kernel, lazy = run(SCRIPTS[script], False, profile), run(SCRIPTS[script], True, profile, residents=3)
    assert lazy[0] == kernel[0]
    assert lazy[1] == kernel[1]


@pytest.mark.parametrize("residents", [1, 3])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_under_global_sessions_every_answer_is_the_same_as_without_swapping(script: str, residents: int) -> None:
    """``--swap lazy --sessions global`` against ``--sessions global`` alone: the registry
    answers (isolation: another file's flush is refused) and the TPM's are the same."""
    alone = run(SCRIPTS[script], False, "6.12", sessions=True)
    lazy = run(SCRIPTS[script], True, "6.12", residents=residents, sessions=True)
    assert lazy[0] == alone[0]
    assert lazy[1] == alone[1]
    if residents == 1:
        assert lazy[2] == alone[2]


def test_several_resident_files_take_turns_without_swapping(raw) -> None:
    chip = make_chip(raw)
    seam = LazySwap(residents=3)
    chip.seam = seam
    a, b, c = SyncFile(chip, raw), SyncFile(chip, raw), SyncFile(chip, raw)
    for f in (a, a, b):
        assert rc(f.cmd(create_primary())) == 0
    raw.log.clear()
    for _ in range(5):
        assert rc(a.cmd(read_public(V0))) == 0
        assert rc(b.cmd(read_public(V0))) == 0
        assert rc(c.cmd(get_random())) == 0
    assert len(raw.log) == 15 and seam.counters["evictions"] == 0  # one backend command each
    assert seam.snapshot()["residents"] == 3 and len(raw.handles(0x80000000)) == 3
    # The TPM is full (three objects): a's third waits for room, made by putting away the
    # least recently used other file (b), and is sent again.
    raw.log.clear()
    assert rc(a.cmd(create_primary())) == 0
    assert raw.ccs() == [0x131, wire.CC_CONTEXT_SAVE, wire.CC_FLUSH_CONTEXT, 0x131]
    assert seam.counters["room_made"] == 1
    assert [s for s, _ in seam.residents] == [c.state.space, a.state.space]
    # b's key comes back: c (holding nothing) and then a are put away to make room for it.
    assert rc(b.cmd(read_public(V0))) == 0
    assert seam.counters["room_made"] == 3 and [s for s, _ in seam.residents] == [b.state.space]
    assert rc(a.cmd(read_public(0x80FFFFFD))) == 0
    for f in (a, b, c):
        f.close()
    assert raw.handles(0x80000000) == [] and raw.handles(0x02000000) == [] and seam.residents == []


def test_what_the_daemon_flushed_after_a_fault_is_forgotten(raw) -> None:
    """After a lost answer the daemon flushes everything loaded (loaded_flushed): the resident
    files lose what was never saved, as a file does whose own command's answer was lost."""
    chip = make_chip(raw)
    seam = LazySwap(residents=2)
    chip.seam = seam
    a, b = SyncFile(chip, raw), SyncFile(chip, raw)
    assert rc(a.cmd(create_primary())) == 0 and rc(b.cmd(create_primary())) == 0
    for h in raw.handles(0x80000000):
        raw.run(flush_context_of(h))
    seam.loaded_flushed()
    assert seam.residents == [] and a.state.space.context_tbl == [0, 0, 0]
    with pytest.raises(OSError) as lost:  # the kernel's answer to a handle the file lacks
        a.cmd(read_public(V0))
    assert lost.value.errno == errno.EINVAL
    assert rc(b.cmd(get_random())) == 0
    a.close()
    b.close()
    assert raw.handles(0x80000000) == []


def test_at_least_one_file_is_resident() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LazySwap(residents=0)


def test_a_file_alone_costs_one_backend_command_per_command(raw) -> None:
    chip = make_chip(raw)
    seam = LazySwap()
    chip.seam = seam
    f = SyncFile(chip, raw)
    assert rc(f.cmd(create_primary())) == 0
    raw.log.clear()
    for _ in range(10):
        assert rc(f.cmd(read_public(V0))) == 0
        assert rc(f.cmd(get_random())) == 0
    assert len(raw.log) == 20 and seam.counters["resident_commands"] == 20
    other = SyncFile(chip, raw)
    raw.log.clear()
    assert rc(other.cmd(get_random())) == 0
    # The first file is saved and flushed (the kernel's commit, late), then the command.
    assert raw.ccs() == [wire.CC_CONTEXT_SAVE, wire.CC_FLUSH_CONTEXT, wire.CC_GET_RANDOM]
    assert raw.handles(0x80000000) == []  # the other file finds the TPM as the kernel leaves it
    assert rc(f.cmd(read_public(V0))) == 0  # and the first file's key is back when it asks
    f.close()
    other.close()
    assert raw.handles(0x80000000) == []


@pytest.mark.parametrize("residents", [1, 2])
def test_through_the_daemon_each_resident_client_costs_one_backend_command(daemon, tmp_path, residents: int) -> None:
    """tpm2-pytss on a ``--swap lazy`` node, its swtpm behind a counting relay: with its key
    made, each Sign and GetRandom of a client alone is one command to the TPM (the kernel's
    way: four each).  With ``--swap-residents 2`` so are those of two clients taking turns
    (with one resident, each turn would put the other's key away and load its own)."""
    from cusetpm.testing.bench_paths import Client
    from cusetpm.testing.relay import CountingRelay
    from cusetpm.testing.swtpm import Swtpm

    tpm = Swtpm.start(tmp_path / "swtpm")
    relay = CountingRelay(tpm.port)
    extra = ["--tcti", f"swtpm:host=127.0.0.1,port={relay.port}", "--swap", "lazy"]
    extra += ["--swap-residents", str(residents)] if residents > 1 else []
    try:
        d = daemon(extra_args=extra)
        clients = [Client("device", str(d.node)) for _ in range(residents)]
        try:
            for c in clients:
                c.get_random()
                c.sign()  # swtpm answers the first ECDSA Sign with TPM_RC_RETRY (the kernel resends)
            before = relay.commands
            for _ in range(10):
                for c in clients:
                    c.sign()
                    c.get_random()
            assert relay.commands - before == 20 * residents
        finally:
            for c in clients:
                c.close()
    finally:
        relay.close()
        tpm.stop()
    assert ("swap lazy (2 resident)" if residents > 1 else "swap lazy") in d.log()


def test_resident_files_of_two_nodes_share_the_tpm(raw) -> None:
    """Nodes on one TPM share one LazySwap (tenants): a file of one node is put away, in a
    work space of its own, while a file of the other node's command runs."""
    from cusetpm.kernel.profiles import PROFILES
    from cusetpm.kernel.structs import Chip as CoreChip

    first = make_chip(raw, "6.12")
    second = CoreChip(PROFILES["6.1"], first.cc_attrs_tbl)
    seam = LazySwap(residents=2)
    first.seam = second.seam = seam
    a, b, c = SyncFile(first, raw), SyncFile(second, raw), SyncFile(first, raw)
    for f in (a, a, b):
        assert rc(f.cmd(create_primary())) == 0
    assert [chip for _, chip in seam.residents] == [first, second]
    raw.log.clear()
    # c (first node) is not resident and two are: a, the least recently used, is put away.
    assert rc(c.cmd(create_primary())) == 0
    assert seam.counters["evictions"] == 1 and seam.counters["room_made"] == 0
    assert [s for s, _ in seam.residents] == [b.state.space, c.state.space]
    # a's command (first node) puts b (second node) away, then b's puts c away: every key back.
    assert rc(a.cmd(read_public(V0))) == 0 and rc(a.cmd(read_public(V1))) == 0
    assert seam.counters["evictions"] == 2 and [s for s, _ in seam.residents] == [c.state.space, a.state.space]
    assert rc(b.cmd(read_public(V0))) == 0 and rc(c.cmd(read_public(V0))) == 0
    for f in (a, b, c):
        f.close()
    assert raw.handles(0x80000000) == [] and seam.residents == []
