# SPDX-License-Identifier: GPL-2.0-only
"""Hostile input on the core's write path (issue 10): hypothesis drives FileState.accept_write
+ tpm_dev_transmit on the fake TPM, then reads.  Every write and read is answered with an errno
the kernel gives or a response whose header is self-consistent, never another exception; after
every command the fake holds no loaded object or session and no session nobody owns; at the end
a bystander file's object and session are intact, and once it closes the TPM is empty.

The short runs are here (``make test``); ``make fuzz`` runs ``scripts/fuzz.py``, the same rig
with 10^6 seeded inputs per target.  ``CUSETPM_FUZZ_EXAMPLES`` sets the examples per test.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cusetpm.kernel import wire
from cusetpm.kernel.tpm_dev_common import tpm_dev_transmit
from cusetpm.kernel.wire import be32, command, u32
from cusetpm.testing.hostile import (
    KERNEL_ERRNOS,
    CoreRig,
    Finding,
    foreign_handles,
    get_cap_handles,
    harmless_to_others,
    mutant,
    self_saved_session,
    start_auth_session,
)

EXAMPLES = int(os.environ.get("CUSETPM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
PROFILES = ["6.1", "6.12"]

#: Command codes the fake TPM knows, and some it does not.
CODES = [0x131, 0x161, 0x162, 0x165, 0x173, 0x176, 0x17A, 0x17B, 0x189, 0x143, 0x144, 0xFFFF, 0x20000000]


@pytest.fixture(autouse=True)
def _quiet():
    """The port logs what the kernel logs (every failed ContextLoad...): not per input here."""
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


@st.composite
def raw_commands(draw: st.DrawFn) -> bytes:
    """Bytes with a header more often than chance gives one: tag, size (right or wrong), code."""
    body = draw(st.binary(max_size=64) | st.binary(min_size=4000, max_size=4200))
    if draw(st.booleans()):
        return body
    tag = draw(st.sampled_from([0x8001, 0x8002, 0x00C1, 0]))
    cc = draw(st.sampled_from(CODES) | st.integers(0, 0xFFFFFFFF))
    total = 10 + len(body)
    size = draw(st.sampled_from([total, total - 1, total + 1, 0, 6, 9, 10, 4096, 0xFFFFFFFF]))
    data = struct.pack(">HII", tag, size & 0xFFFFFFFF, cc) + body
    return data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


OPS = st.lists(
    st.tuples(raw_commands(), st.booleans(), st.sampled_from([4096, 4096, 10, 1, 0, None])), min_size=1, max_size=8
)


@pytest.mark.parametrize("profile", PROFILES)
@FUZZ
@given(ops=OPS)
def test_arbitrary_bytes_get_an_errno_or_a_response(profile, ops):
    rig = CoreRig(profile)
    f = rig.open()
    for data, nonblock, read_size in ops:
        rig.write(f, data, nonblock)
        if read_size is not None:
            rig.read(f, read_size)
    rig.retire(f)
    rig.finish()


@pytest.mark.parametrize("profile", PROFILES)
@FUZZ
@given(rng=st.randoms(use_true_random=False), n=st.integers(1, 40))
def test_mutated_valid_commands_leave_the_bystander_and_the_tpm_intact(profile, rng, n):
    rig = CoreRig(profile)
    f = rig.open()
    for i in range(n):
        rig.write(f, mutant(rng, rig.pools), nonblock=rng.random() < 0.1)
        if rng.random() < 0.9:
            rig.read(f, rng.choice((4096, 4096, 10, 1, 0)))
        if i % 16 == 15:
            rig.retire(f)
            f = rig.open()
    rig.retire(f)
    rig.finish()


def test_a_seeded_run_of_the_long_fuzzer_passes():
    """A slice of what ``make fuzz`` runs (scripts/fuzz.py's core target)."""
    rig = CoreRig("6.12")
    rng = random.Random(10)
    f = rig.open()
    for i in range(3000):
        rig.write(f, mutant(rng, rig.pools), nonblock=rng.random() < 0.1)
        rig.read(f, 4096)
        if i % 64 == 63:
            rig.retire(f)
            f = rig.open()
    rig.retire(f)
    rig.finish()
    assert rig.inputs + rig.skipped == 3000
    assert rig.skipped < 100


# --- the rig's own rules, pinned ----------------------------------------------------------------


def test_the_rig_catches_an_errno_the_kernel_does_not_give(monkeypatch):
    rig = CoreRig("6.12")
    f = rig.open()
    monkeypatch.setattr(rig.chip, "cc_attrs_tbl", [])  # find_and_validate_cc: EINVAL, allowed
    assert isinstance(rig.write(f, command(wire.CC_GET_RANDOM, b"\x00\x08")), OSError)
    assert errno.EIO not in KERNEL_ERRNOS and errno.EOPNOTSUPP not in KERNEL_ERRNOS


def test_a_file_that_saves_its_own_session_leaves_it_in_the_tpm_as_linux_does():
    """User ContextSave of the file's own session: tpm2_save_space() then gets REFERENCE_H0
    and forgets it ("just forget it"), so close() does not flush it.  The fuzzers account for
    such sessions (CoreFile.self_saved) rather than call them leaks."""
    rig = CoreRig("6.12")
    f = rig.open()
    assert rig.write(f, start_auth_session()) is not None
    session = be32(rig.read(f, 4096), 10)
    save = command(wire.CC_CONTEXT_SAVE, u32(session))
    rig.write(f, save)
    rsp = rig.read(f, 4096)
    assert be32(rsp, 6) == 0 and self_saved_session(save, rsp) == session
    assert session not in f.state.space.session_tbl
    rig.close(f)
    rig.files.append(f)  # retire() closes again: harmless, the space is empty
    assert rig.tpm.sessions.get(session) is False  # still saved in the TPM
    rig.retire(f)  # flushes it, as its owner would have to
    rig.finish()


def test_any_file_can_flush_another_files_session_on_linux():
    """Session handles are not virtualized: FlushContext(h) reaches the TPM as written.  So
    the hostile files never send one naming the bystander's session (harmless_to_others)."""
    rig = CoreRig("6.12")
    flush = command(wire.CC_FLUSH_CONTEXT, u32(rig.session))
    assert not harmless_to_others(flush, {rig.session})
    # The TPM names a session by its index, whatever the type byte says.
    other_type = (rig.session & wire.HR_HANDLE_MASK) | (
        wire.HT_HMAC_SESSION ^ wire.HT_POLICY_SESSION ^ rig.session & wire.HR_RANGE_MASK
    )
    assert not harmless_to_others(command(wire.CC_FLUSH_CONTEXT, u32(other_type)), {rig.session})
    assert harmless_to_others(command(wire.CC_FLUSH_CONTEXT, u32(0x80FFFFFF)), {rig.session})
    f = rig.open()
    f.state.accept_write(flush)
    assert rig.run(tpm_dev_transmit(rig.chip, f.state.space, f.state.buf)) > 0
    assert be32(f.state.buf, 6) == 0
    assert rig.session not in rig.tpm.sessions


def test_findings_name_the_input():
    rig = CoreRig("6.12")
    f = rig.open()
    rig.tpm.objects[0x80000099] = 0x80000099  # as if the port had left an object loaded
    with pytest.raises(Finding, match="objects left loaded"):
        rig.write(f, command(wire.CC_GET_RANDOM, b"\x00\x08"))


def test_a_listing_of_another_spaces_handles_is_a_finding():
    listing = command(0, struct.pack(">BIII", 0, wire.CAP_HANDLES, 2, 0x80FFFFFF) + u32(0x80000000))
    listing = listing[:6] + bytes(4) + listing[10:]  # rc 0
    assert foreign_handles(get_cap_handles(), listing, {0x80FFFFFF}) == [0x80000000]
    assert foreign_handles(get_cap_handles(), listing, {0x80FFFFFF, 0x80000000}) == []
