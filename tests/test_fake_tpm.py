# SPDX-License-Identifier: GPL-2.0-only
"""The fake TPM of the bytes-only tier (cusetpm.testing.fake_tpm), checked on its own."""

from __future__ import annotations

import struct

import pytest
from tpm2_pytss.constants import TPM2_CAP, TPM2_CC, TPM2_HT, TPM2_PT, TPM2_RC, TPMA_CC

from cusetpm.kernel.profiles import PROFILES
from cusetpm.kernel.structs import Chip
from cusetpm.kernel.tpm2_cmd import auto_startup
from cusetpm.kernel.wire import be32, command, u32
from cusetpm.testing.fake_tpm import COMMAND_ATTRS, FakeTpm
from helpers import (
    context_load,
    context_save,
    create_primary,
    flush_context,
    get_random,
    rc,
    read_public,
    start_auth_session,
)

TRANSIENT = int(TPM2_HT.TRANSIENT) << 24
LOADED_SESSION = int(TPM2_HT.LOADED_SESSION) << 24
SAVED_SESSION = int(TPM2_HT.SAVED_SESSION) << 24


def started() -> FakeTpm:
    fake = FakeTpm()
    assert rc(fake.execute(command(TPM2_CC.Startup, b"\x00\x00"))) == TPM2_RC.SUCCESS
    return fake


def getcap(fake: FakeTpm, cap: int, prop: int, count: int) -> tuple[int, list[int]]:
    rsp = fake.execute(command(TPM2_CC.GetCapability, u32(cap) + u32(prop) + u32(count)))
    assert rc(rsp) == TPM2_RC.SUCCESS
    more, got_cap, n = struct.unpack_from(">BII", rsp, 10)
    assert got_cap == cap and len(rsp) == be32(rsp, 2)
    width = 8 if cap == TPM2_CAP.TPM_PROPERTIES else 4
    assert len(rsp) == 19 + width * n
    return more, list(struct.unpack_from(f">{n * width // 4}I", rsp, 19))


def handle_of(rsp: bytes) -> int:
    assert rc(rsp) == TPM2_RC.SUCCESS, hex(rc(rsp))
    return be32(rsp, 10)


def test_before_startup_everything_but_startup_is_initialize() -> None:
    fake = FakeTpm()
    assert rc(fake.execute(command(TPM2_CC.SelfTest, b"\x00"))) == TPM2_RC.INITIALIZE
    assert rc(fake.execute(get_random())) == TPM2_RC.INITIALIZE
    assert rc(fake.execute(command(TPM2_CC.Startup, b"\x00\x00"))) == TPM2_RC.SUCCESS
    assert rc(fake.execute(command(TPM2_CC.Startup, b"\x00\x00"))) == TPM2_RC.INITIALIZE
    assert rc(fake.execute(command(TPM2_CC.SelfTest, b"\x00"))) == TPM2_RC.SUCCESS
    assert fake.ccs == [TPM2_CC.SelfTest, TPM2_CC.GetRandom, TPM2_CC.Startup, TPM2_CC.Startup, TPM2_CC.SelfTest]


def test_the_kernel_registers_the_chip_with_its_command_table() -> None:
    fake = FakeTpm()
    chip = Chip(PROFILES["6.12"])
    fake.run(auto_startup(chip))
    assert fake.started
    # SelfTest (INITIALIZE), Startup, SelfTest, then PT_TOTAL_COMMANDS and the COMMANDS list.
    cc = TPM2_CC
    assert fake.ccs == [cc.SelfTest, cc.Startup, cc.SelfTest, cc.GetCapability, cc.GetCapability]
    assert len(chip.cc_attrs_tbl) == len(COMMAND_ATTRS)
    assert chip.cc_attrs_tbl[0] & int(TPMA_CC.COMMANDINDEX_MASK) == TPM2_CC.CreatePrimary


def test_capabilities() -> None:
    fake = started()
    more, props = getcap(fake, TPM2_CAP.TPM_PROPERTIES, TPM2_PT.TOTAL_COMMANDS, 1)
    assert (more, props) == (0, [TPM2_PT.TOTAL_COMMANDS, len(COMMAND_ATTRS)])
    more, attrs = getcap(fake, TPM2_CAP.COMMANDS, TPM2_CC.FIRST, 100)
    assert not more and attrs == list(COMMAND_ATTRS.values())
    by_cc = {a & int(TPMA_CC.COMMANDINDEX_MASK): a for a in attrs}
    chandles = int(TPMA_CC.CHANDLES_MASK)
    assert by_cc[TPM2_CC.CreatePrimary] & chandles == 1 << int(TPMA_CC.CHANDLES_SHIFT)
    assert by_cc[TPM2_CC.CreatePrimary] & int(TPMA_CC.RHANDLE)
    assert by_cc[TPM2_CC.StartAuthSession] & chandles == 2 << int(TPMA_CC.CHANDLES_SHIFT)
    assert by_cc[TPM2_CC.ContextLoad] & int(TPMA_CC.RHANDLE)
    assert by_cc[TPM2_CC.FlushContext] & chandles == 0  # its handle is a parameter
    more, first_two = getcap(fake, TPM2_CAP.COMMANDS, TPM2_CC.FIRST, 2)
    assert more == 1 and first_two == attrs[:2]
    assert getcap(fake, TPM2_CAP.HANDLES, TRANSIENT, 64) == (0, [])


def test_get_random_and_unknown_commands() -> None:
    fake = started()
    rsp = fake.execute(get_random(8))
    assert rc(rsp) == TPM2_RC.SUCCESS and struct.unpack_from(">H", rsp, 10) == (8,) and len(rsp) == 20
    assert rc(fake.execute(command(0x1FFF))) == TPM2_RC.COMMAND_CODE
    assert fake.ccs[-2:] == [TPM2_CC.GetRandom, 0x1FFF]


def test_objects_get_fresh_transient_handles_up_to_the_object_memory() -> None:
    fake = started()
    handles = [handle_of(fake.execute(create_primary())) for _ in range(3)]
    assert handles == [TRANSIENT, TRANSIENT + 1, TRANSIENT + 2]
    assert rc(fake.execute(create_primary())) == TPM2_RC.OBJECT_MEMORY
    assert getcap(fake, TPM2_CAP.HANDLES, TRANSIENT, 64) == (0, handles)
    assert getcap(fake, TPM2_CAP.HANDLES, TRANSIENT + 1, 1) == (1, handles[1:2])
    assert rc(fake.execute(read_public(handles[0]))) == TPM2_RC.SUCCESS
    assert rc(fake.execute(flush_context(handles[0]))) == TPM2_RC.SUCCESS
    assert rc(fake.execute(read_public(handles[0]))) == TPM2_RC.REFERENCE_H0
    assert rc(fake.execute(flush_context(handles[0]))) & 0xBF == TPM2_RC.HANDLE
    assert handle_of(fake.execute(create_primary())) == TRANSIENT + 3


def test_an_object_context_loads_as_a_fresh_handle_any_number_of_times() -> None:
    fake = started()
    h = handle_of(fake.execute(create_primary()))
    saved = fake.execute(context_save(h))
    assert rc(saved) == TPM2_RC.SUCCESS
    assert h in fake.objects, "ContextSave leaves an object loaded"
    assert be32(saved, 18) == TRANSIENT  # savedHandle
    blob = saved[10:]
    assert rc(fake.execute(flush_context(h))) == TPM2_RC.SUCCESS
    first = handle_of(fake.execute(context_load(blob)))
    second = handle_of(fake.execute(context_load(blob)))
    assert len({h, first, second}) == 3 and sorted(fake.objects) == [first, second]
    assert rc(fake.execute(context_save(h))) == TPM2_RC.REFERENCE_H0
    assert rc(fake.execute(context_load(blob[:-1] + b"\xff"))) & 0xBF == TPM2_RC.INTEGRITY


def test_a_session_context_loads_back_to_its_handle_once_per_save() -> None:
    fake = started()
    hmac = handle_of(fake.execute(start_auth_session()))
    policy = handle_of(fake.execute(start_auth_session(policy=True)))
    assert hmac >> 24 == TPM2_HT.HMAC_SESSION and policy >> 24 == TPM2_HT.POLICY_SESSION
    saved = fake.execute(context_save(hmac))
    assert rc(saved) == TPM2_RC.SUCCESS and be32(saved, 18) == hmac
    assert fake.saved_sessions() == [hmac] and fake.loaded_sessions() == [policy]
    assert getcap(fake, TPM2_CAP.HANDLES, SAVED_SESSION, 64)[1] == [hmac]
    assert getcap(fake, TPM2_CAP.HANDLES, LOADED_SESSION, 64)[1] == [policy]
    assert rc(fake.execute(context_save(hmac))) == TPM2_RC.REFERENCE_H0  # not loaded
    assert handle_of(fake.execute(context_load(saved[10:]))) == hmac
    assert rc(fake.execute(context_load(saved[10:]))) & 0xBF == TPM2_RC.HANDLE  # replayed
    again = fake.execute(context_save(hmac))
    assert rc(fake.execute(context_load(saved[10:]))) & 0xBF == TPM2_RC.HANDLE  # an older save
    assert rc(fake.execute(flush_context(hmac))) == TPM2_RC.SUCCESS  # a saved session flushes too
    assert rc(fake.execute(context_load(again[10:]))) & 0xBF == TPM2_RC.HANDLE
    assert fake.sessions == {policy: True}


@pytest.mark.parametrize("limit", [2, 64])
def test_session_memory(limit: int) -> None:
    fake = FakeTpm(max_sessions=limit, started=True)
    for _ in range(limit):
        handle_of(fake.execute(start_auth_session()))
    assert rc(fake.execute(start_auth_session())) == TPM2_RC.SESSION_MEMORY
    assert FakeTpm().max_sessions == 64 and FakeTpm().max_objects == 3


def test_loaded_session_memory_counts_loaded_sessions_only() -> None:
    fake = FakeTpm(max_loaded_sessions=2, started=True)
    first = handle_of(fake.execute(start_auth_session()))
    handle_of(fake.execute(start_auth_session()))
    assert rc(fake.execute(start_auth_session())) == TPM2_RC.SESSION_MEMORY
    saved = fake.execute(context_save(first))  # saved: no longer takes a loaded slot
    third = handle_of(fake.execute(start_auth_session()))
    assert rc(fake.execute(context_load(saved[10:]))) == TPM2_RC.SESSION_MEMORY
    assert rc(fake.execute(flush_context(third))) == TPM2_RC.SUCCESS
    assert handle_of(fake.execute(context_load(saved[10:]))) == first


def test_malformed_commands() -> None:
    fake = started()
    assert rc(fake.execute(b"\x80\x01\x00")) == TPM2_RC.COMMAND_SIZE
    assert rc(fake.execute(command(TPM2_CC.GetRandom, b"\x00\x08")[:-1])) == TPM2_RC.COMMAND_SIZE
    assert rc(fake.execute(command(TPM2_CC.ContextSave))) == TPM2_RC.INSUFFICIENT
    assert fake.ccs[1:] == [-1, TPM2_CC.GetRandom, TPM2_CC.ContextSave] and len(fake.commands) == 4
