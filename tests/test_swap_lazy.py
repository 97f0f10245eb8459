# SPDX-License-Identifier: GPL-2.0-only
"""cusetpm.swap.lazy (``--swap lazy``): a file alone costs one backend command per command,
and every answer, and what the TPM holds whenever another file or a close looks, is the
kernel's.  Against real swtpms, driven synchronously: each script runs once with the kernel's
seam and once with LazySwap, on fresh TPMs, and the answers are compared."""

from __future__ import annotations

from typing import Callable

import pytest

from cusetpm.kernel import wire
from cusetpm.kernel.structs import Chip
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


def run(steps: list[Step], lazy: bool, profile: str) -> tuple[list[tuple[int, ...]], list[int], dict[str, list[int]]]:
    raw = RawTpm.start()
    try:
        chip: Chip = make_chip(raw, profile)
        if lazy:
            chip.seam = LazySwap()
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


def test_through_the_daemon_a_client_alone_costs_one_backend_command_per_command(daemon, tmp_path) -> None:
    """tpm2-pytss on a ``--swap lazy`` node, its swtpm behind a counting relay: with its key
    made, each Sign and GetRandom is one command to the TPM (the kernel's way: four each)."""
    from cusetpm.testing.bench_paths import Client
    from cusetpm.testing.relay import CountingRelay
    from cusetpm.testing.swtpm import Swtpm

    tpm = Swtpm.start(tmp_path / "swtpm")
    relay = CountingRelay(tpm.port)
    try:
        d = daemon(extra_args=["--tcti", f"swtpm:host=127.0.0.1,port={relay.port}", "--swap", "lazy"])
        client = Client("device", str(d.node))
        try:
            client.get_random()
            client.sign()  # swtpm answers the first ECDSA Sign with TPM_RC_RETRY (the kernel resends)
            before = relay.commands
            for _ in range(10):
                client.sign()
                client.get_random()
            assert relay.commands - before == 20
        finally:
            client.close()
    finally:
        relay.close()
        tpm.stop()
    assert "swap lazy" in d.log()
