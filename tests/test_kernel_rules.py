# SPDX-License-Identifier: GPL-2.0-only
"""The kernel's resource-manager rules, bytes only: the real port against the fake TPM.

No swtpm here: the port (tpm2_cmd.auto_startup, tpm_dev_common.FileState + tpm_dev_transmit
and release_space) is driven synchronously against :class:`cusetpm.testing.fake_tpm.FakeTpm`,
whose log shows exactly what reached the TPM.  The same rules are checked against a real
swtpm in test_tpm2_space.py and test_tpm_dev_common.py.
"""

from __future__ import annotations

import errno

import pytest
from tpm2_pytss.constants import TPM2_CAP, TPM2_CC, TPM2_HT, TPM2_RC

from cusetpm.kernel import wire
from cusetpm.kernel.profiles import PROFILES
from cusetpm.kernel.structs import Chip
from cusetpm.kernel.tpm2_cmd import auto_startup
from cusetpm.kernel.tpm_dev_common import FileState
from cusetpm.kernel.wire import be32, command, u32
from cusetpm.testing.fake_tpm import FakeTpm
from helpers import (
    SyncFile,
    create_primary,
    get_cap_handles,
    get_random,
    handles_of,
    rc,
    read_public,
    start_auth_session,
)

VHANDLE0 = 0x80FFFFFF
TRANSIENT = int(TPM2_HT.TRANSIENT) << 24
CYCLE = [TPM2_CC.ContextLoad, None, TPM2_CC.ContextSave, TPM2_CC.FlushContext]


def registered(profile: str = "6.12") -> tuple[Chip, FakeTpm]:
    fake = FakeTpm()
    chip = Chip(PROFILES[profile])
    fake.run(auto_startup(chip))
    fake.ccs.clear()
    fake.commands.clear()
    return chip, fake


@pytest.fixture(params=["6.12", "6.1"])
def rig(request: pytest.FixtureRequest) -> tuple[Chip, FakeTpm]:
    return registered(request.param)


def cycle(cc: int) -> list[int | None]:
    return [cc if x is None else x for x in CYCLE]


def test_create_primary_answers_a_vhandle_and_later_handles_are_translated_back(rig: tuple[Chip, FakeTpm]) -> None:
    chip, fake = rig
    f = SyncFile(chip, fake)
    rsp = f.cmd(create_primary())
    assert rc(rsp) == TPM2_RC.SUCCESS
    assert be32(rsp, 10) == VHANDLE0
    # The TPM saw the command, then the space saved the new object and flushed it.
    assert fake.ccs == [TPM2_CC.CreatePrimary, TPM2_CC.ContextSave, TPM2_CC.FlushContext]
    assert fake.objects == {}
    physical = be32(fake.commands[-2], 10)  # what ContextSave named: the TPM's own handle
    assert physical & 0xFF000000 == TRANSIENT and physical != VHANDLE0
    fake.ccs.clear()
    assert rc(f.cmd(read_public(VHANDLE0))) == TPM2_RC.SUCCESS
    assert fake.ccs == cycle(TPM2_CC.ReadPublic)
    loaded = be32(fake.commands[-3], 10)  # the handle ReadPublic carried to the TPM
    assert loaded & 0xFF000000 == TRANSIENT and loaded != VHANDLE0
    assert be32(fake.commands[-2], 10) == loaded  # saved again under that handle ...
    assert be32(fake.commands[-1], 10) == loaded  # ... and flushed
    f.close()


def test_every_command_of_a_space_with_an_object_is_the_four_command_cycle(rig: tuple[Chip, FakeTpm]) -> None:
    chip, fake = rig
    f = SyncFile(chip, fake)
    f.cmd(create_primary())
    fake.ccs.clear()
    for _ in range(3):
        assert rc(f.cmd(get_random(8))) == TPM2_RC.SUCCESS
    assert fake.ccs == cycle(TPM2_CC.GetRandom) * 3
    # An empty space costs one command.
    g = SyncFile(chip, fake)
    fake.ccs.clear()
    assert rc(g.cmd(get_random(8))) == TPM2_RC.SUCCESS
    assert fake.ccs == [TPM2_CC.GetRandom]
    # Three objects in one space, on a TPM with room for three: all loaded, all saved.
    f.cmd(create_primary())
    f.cmd(create_primary())
    fake.ccs.clear()
    f.cmd(get_random(8))
    load, save = [TPM2_CC.ContextLoad] * 3, [TPM2_CC.ContextSave, TPM2_CC.FlushContext] * 3
    assert fake.ccs == load + [TPM2_CC.GetRandom] + save
    assert fake.objects == {}


def test_an_unknown_command_code_is_answered_by_the_rm_with_no_tpm_traffic(rig: tuple[Chip, FakeTpm]) -> None:
    chip, fake = rig
    f = SyncFile(chip, fake)
    f.cmd(create_primary())
    fake.ccs.clear()
    rsp = f.cmd(command(0x1FFF))
    assert rsp == command(0x000B0143)
    assert be32(rsp, 6) == wire.RC_RESMGR_TPM_LAYER | TPM2_RC.COMMAND_CODE == 0x000B0143
    assert fake.ccs == []
    # The space is untouched: its object still answers.
    assert rc(f.cmd(read_public(VHANDLE0))) == TPM2_RC.SUCCESS


def test_sessions_are_flushed_when_the_file_is_released(rig: tuple[Chip, FakeTpm]) -> None:
    chip, fake = rig
    f = SyncFile(chip, fake)
    rsp = f.cmd(start_auth_session())
    session = be32(rsp, 10)
    assert rc(rsp) == TPM2_RC.SUCCESS and session >> 24 == TPM2_HT.HMAC_SESSION  # not virtualized
    f.cmd(start_auth_session(policy=True))
    assert fake.ccs[-1] == TPM2_CC.ContextSave  # a session is saved, not flushed, after a command
    assert len(fake.saved_sessions()) == 2 and fake.loaded_sessions() == []
    f.cmd(create_primary())
    fake.ccs.clear()
    f.close()
    # Sessions only, in slot order; the object costs the TPM nothing.
    assert fake.ccs == [TPM2_CC.FlushContext, TPM2_CC.FlushContext]
    assert be32(fake.commands[-2], 10) == session
    assert fake.sessions == {}


def test_get_capability_handles_lists_only_the_spaces_own_vhandles(rig: tuple[Chip, FakeTpm]) -> None:
    chip, fake = rig
    a, b = SyncFile(chip, fake), SyncFile(chip, fake)
    a.cmd(create_primary())
    a.cmd(create_primary())
    b.cmd(create_primary())
    # An object loaded outside every space (as another user of the TPM would leave it).
    foreign = be32(fake.execute(create_primary()), 10)
    assert fake.objects == {foreign: foreign}
    rsp = a.cmd(get_cap_handles(TRANSIENT))
    assert rc(rsp) == TPM2_RC.SUCCESS and handles_of(rsp) == [VHANDLE0, VHANDLE0 - 1]
    assert be32(rsp, 2) == len(rsp) == 19 + 4 * 2
    assert handles_of(b.cmd(get_cap_handles(TRANSIENT))) == [VHANDLE0]
    assert handles_of(SyncFile(chip, fake).cmd(get_cap_handles(TRANSIENT))) == []
    # The TPM listed the foreign object to each of them (only it stays loaded between commands).
    assert handles_of(fake.execute(get_cap_handles(TRANSIENT))) == [foreign]
    # Other handle types pass unfiltered.
    a.cmd(start_auth_session())
    assert len(handles_of(b.cmd(get_cap_handles(int(TPM2_HT.SAVED_SESSION) << 24)))) == 1


def test_a_zero_length_read_discards_the_response_on_6_1_only() -> None:
    for profile, kept in (("6.12", True), ("6.1", False)):
        chip, fake = registered(profile)
        f = SyncFile(chip, fake)
        cmd = get_random(8)
        assert f.write(cmd) == len(cmd)
        assert f.state.read_needs_lock(0) is (not kept)
        assert f.read(0) == b""
        rsp = f.read()
        if kept:
            assert rc(rsp) == TPM2_RC.SUCCESS and len(rsp) == 20, profile
        else:
            assert rsp == b"", profile
        assert f.state.read_needs_lock(1)


def test_a_second_write_before_reading_is_ebusy(rig: tuple[Chip, FakeTpm]) -> None:
    chip, fake = rig
    f = SyncFile(chip, fake)
    f.write(get_random(8))
    fake.ccs.clear()
    with pytest.raises(OSError) as e:
        f.write(get_random(8))
    assert e.value.errno == errno.EBUSY
    assert fake.ccs == []
    rsp = f.read()
    assert rc(rsp) == TPM2_RC.SUCCESS and len(rsp) == 20  # the first response, intact
    assert rc(f.cmd(get_random(8))) == TPM2_RC.SUCCESS


def test_a_write_over_4096_bytes_is_e2big(rig: tuple[Chip, FakeTpm]) -> None:
    chip, fake = rig
    f = SyncFile(chip, fake)
    big = command(TPM2_CC.GetCapability, u32(TPM2_CAP.HANDLES) + bytes(4096 - 14))
    assert len(big) == 4096
    with pytest.raises(OSError) as e:
        f.write(big + b"\x00")
    assert e.value.errno == errno.E2BIG
    assert fake.ccs == []
    FileState.check_size(4096)  # exactly the buffer is fine


def test_object_memory_of_the_tpm_reaches_user_space_as_the_tpm_rc() -> None:
    chip, fake = registered()
    fake.max_objects = 1
    f = SyncFile(chip, fake)
    f.cmd(create_primary())
    fake.ccs.clear()
    # The space loads its object, leaving the TPM no room for the new one.
    assert rc(f.cmd(create_primary())) == TPM2_RC.OBJECT_MEMORY
    assert fake.ccs == cycle(TPM2_CC.CreatePrimary)
