# SPDX-License-Identifier: GPL-2.0-only
"""tpm2-space.c rules, on the sans-I/O core, against a real swtpm (faults injected on purpose)."""

from __future__ import annotations

import errno

import pytest

from cusetpm.kernel import wire as tpm
from cusetpm.kernel.tpm2_space import SAVED, vhandle
from cusetpm.kernel.wire import be32, u32
from helpers import (
    SyncFile,
    context_load,
    context_save,
    create_primary,
    flush_context,
    get_cap_handles,
    get_random,
    handles_of,
    make_chip,
    rc,
    read_public,
    response,
    start_auth_session,
)  # fmt: skip

CS, CL, FC = tpm.CC_CONTEXT_SAVE, tpm.CC_CONTEXT_LOAD, tpm.CC_FLUSH_CONTEXT
V0, V1, V2 = vhandle(0), vhandle(1), vhandle(2)


@pytest.fixture(params=["6.1", "6.12"])
def chip(request, raw):
    return make_chip(raw, request.param)


def new_file(chip, raw) -> SyncFile:
    return SyncFile(chip, raw)


def test_objects_get_vhandles_from_the_lowest_free_slot(chip, raw):
    f = new_file(chip, raw)
    got = [be32(f.cmd(create_primary()), 10) for _ in range(3)]
    assert got == [0x80FFFFFF, 0x80FFFFFE, 0x80FFFFFD]
    assert f.state.space.context_tbl == [SAVED] * 3
    # A fourth object does not fit in the TPM while the three are loaded: the TPM says so.
    assert rc(f.cmd(create_primary())) == 0x902
    # A freed slot is reused.
    assert rc(f.cmd(flush_context(V1))) == 0
    assert be32(f.cmd(create_primary()), 10) == V1
    # Objects never stay loaded in the TPM between commands.
    assert raw.handles(0x80000000) == []


def test_load_and_save_order_around_one_command(chip, raw):
    f = new_file(chip, raw)
    f.cmd(create_primary())
    f.cmd(create_primary())
    s1 = be32(f.cmd(start_auth_session()), 10)
    s2 = be32(f.cmd(start_auth_session()), 10)
    assert f.state.space.session_tbl[:2] == [s1, s2]
    raw.log.clear()
    assert rc(f.cmd(get_random())) == 0
    assert raw.ccs() == [CL, CL, CL, CL, tpm.CC_GET_RANDOM, CS, FC, CS, FC, CS, CS]


def test_unknown_command_code_is_synthesized_without_tpm_traffic(chip, raw):
    f = new_file(chip, raw)
    f.cmd(create_primary())
    f.cmd(start_auth_session())
    raw.log.clear()
    before = (list(f.state.space.context_tbl), list(f.state.space.session_tbl))
    for tag in (0x8001, 0x8002):
        out = f.cmd(tpm.command(0x0000FFFF, b"", tag=tag))
        assert out == bytes.fromhex("80010000000a000b0143")
    assert raw.log == []
    assert (f.state.space.context_tbl, f.state.space.session_tbl) == before


@pytest.mark.parametrize("handle", [0x80FFFFFF, 0x80FFFFFE, 0x80000000, 0x80FFFFFC])
def test_invalid_vhandle_is_einval_and_never_reaches_the_tpm(chip, raw, handle):
    f = new_file(chip, raw)
    raw.log.clear()
    with pytest.raises(OSError) as exc:
        f.write(read_public(handle))
    assert exc.value.errno == errno.EINVAL
    assert 0x173 not in raw.ccs()


def test_another_files_vhandle_is_an_empty_slot_here(chip, raw):
    a, b = new_file(chip, raw), new_file(chip, raw)
    assert be32(a.cmd(create_primary()), 10) == V0
    with pytest.raises(OSError) as exc:
        b.write(read_public(V0))
    assert exc.value.errno == errno.EINVAL
    assert rc(a.cmd(read_public(V0))) == 0


def test_non_transient_handles_pass_through(chip, raw):
    f = new_file(chip, raw)
    # An NV index that does not exist: the TPM answers, not the RM.
    assert rc(f.cmd(read_public(0x81000042))) == 0x18B


def test_getcap_handles_shows_only_own_objects_in_slot_order(chip, raw):
    a, b = new_file(chip, raw), new_file(chip, raw)
    for _ in range(2):
        a.cmd(create_primary())
    b.cmd(create_primary())
    out = a.cmd(get_cap_handles())
    assert handles_of(out) == [V0, V1]
    assert be32(out, 2) == 19 + 8 and len(out) == 19 + 8
    assert handles_of(b.cmd(get_cap_handles())) == [V0]
    assert handles_of(new_file(chip, raw).cmd(get_cap_handles())) == []


def test_getcap_starting_property_is_physical_and_moredata_kept(chip, raw):
    f = new_file(chip, raw)
    f.cmd(create_primary())
    f.cmd(create_primary())
    out = f.cmd(get_cap_handles(0x80000001, 20))
    assert handles_of(out) == [V1]
    out = f.cmd(get_cap_handles(0x80000000, 1))
    assert handles_of(out) == [V0] and out[10] == 1


def test_getcap_lists_other_files_sessions_as_saved(chip, raw):
    a, b = new_file(chip, raw), new_file(chip, raw)
    sa = be32(a.cmd(start_auth_session()), 10)
    sb = be32(b.cmd(start_auth_session()), 10)
    assert sa >> 24 == 0x02
    # a's own session is loaded during a's command; b's is saved (0x03 range).
    loaded = handles_of(a.cmd(get_cap_handles(0x02000000)))
    assert sa in loaded
    saved = handles_of(a.cmd(get_cap_handles(0x03000000)))
    assert (sb & 0x00FFFFFF) | 0x03000000 in saved or sb in saved


@pytest.mark.parametrize("extra, length_ok", [(b"\x00", False), (b"", True)])
def test_getcap_handles_needs_the_exact_length(chip, raw, extra, length_ok):
    f = new_file(chip, raw)
    body = b"\x00" + u32(tpm.CAP_HANDLES) + u32(1) + u32(0x81000001) + extra
    raw.injectors.append(lambda c: response(0, body) if be32(c, 6) == tpm.CC_GET_CAPABILITY else None)
    if length_ok:
        assert handles_of(f.cmd(get_cap_handles(0x81000000))) == [0x81000001]
    else:
        with pytest.raises(OSError) as exc:
            f.write(get_cap_handles(0x81000000))
        assert exc.value.errno == errno.EFAULT


def test_getcap_shorter_than_19_bytes_is_efault_for_any_capability(chip, raw):
    f = new_file(chip, raw)
    raw.injectors.append(lambda c: response(0, b"\x00" * 8) if be32(c, 6) == tpm.CC_GET_CAPABILITY else None)
    with pytest.raises(OSError) as exc:
        f.write(tpm.command(tpm.CC_GET_CAPABILITY, u32(6) + u32(0x100) + u32(1)))
    assert exc.value.errno == errno.EFAULT


def test_flushcontext_of_vhandle_frees_the_slot(chip, raw):
    f = new_file(chip, raw)
    f.cmd(create_primary())
    raw.log.clear()
    assert rc(f.cmd(flush_context(V0))) == 0
    # The RM's own ContextSave then gets REFERENCE_H0 and forgets the slot.
    assert (CS, 0x910) in raw.log
    assert f.state.space.context_tbl == [0, 0, 0]
    assert handles_of(f.cmd(get_cap_handles())) == []
    with pytest.raises(OSError) as exc:
        f.write(flush_context(V0))
    assert exc.value.errno == errno.EINVAL


def test_user_contextsave_of_object_keeps_it_and_reload_gives_new_slots(chip, raw):
    f = new_file(chip, raw)
    f.cmd(create_primary())
    blob = f.cmd(context_save(V0))
    assert rc(blob) == 0
    assert be32(blob, 18) == 0x80000000  # savedHandle: the TPM's marker, not the vhandle
    assert f.state.space.context_tbl[0] == SAVED
    assert be32(f.cmd(context_load(blob[10:])), 10) == V1
    assert be32(f.cmd(context_load(blob[10:])), 10) == V2
    assert rc(f.cmd(read_public(V2))) == 0


def test_user_contextsave_of_session_makes_the_rm_forget_it(chip, raw):
    f = new_file(chip, raw)
    s = be32(f.cmd(start_auth_session()), 10)
    raw.log.clear()
    blob = f.cmd(context_save(s))
    assert rc(blob) == 0
    assert f.state.space.session_tbl == [0, 0, 0]
    raw.log.clear()
    f.close()
    assert FC not in raw.ccs()  # not flushed at close: it escaped the space
    # ...so another file can load it and owns it from then on.
    g = new_file(chip, raw)
    assert be32(g.cmd(context_load(blob[10:])), 10) == s
    assert g.state.space.session_tbl[0] == s


def test_close_flushes_sessions_in_slot_order_and_no_objects(chip, raw):
    f = new_file(chip, raw)
    f.cmd(create_primary())
    sessions = [be32(f.cmd(start_auth_session(policy=i == 1)), 10) for i in range(3)]
    raw.log.clear()
    f.close()
    assert raw.log == [(FC, 0)] * 3
    assert raw.handles(0x02000000) == [] and raw.handles(0x03000000) == []
    assert raw.handles(0x80000000) == []
    assert sessions[1] >> 24 == 0x03


def test_fourth_session_is_refused_by_the_tpm(chip, raw):
    f = new_file(chip, raw)
    for _ in range(3):
        assert rc(f.cmd(start_auth_session())) == 0
    assert rc(f.cmd(start_auth_session())) == 0x903


def test_response_handle_without_free_slot_is_enomem_and_flushed(chip, raw):
    f = new_file(chip, raw)
    for _ in range(3):
        f.cmd(create_primary())
    fake = response(0, u32(0x80000005) + b"\x00" * 40, tag=0x8002)
    raw.injectors.append(lambda c: fake if be32(c, 6) == 0x131 else None)
    raw.log.clear()
    with pytest.raises(OSError) as exc:
        f.write(create_primary())
    assert exc.value.errno == errno.ENOMEM
    assert raw.log[3:5] == [(0x131, 0), (FC, raw.log[4][1])]
    raw.injectors.clear()
    # The three old objects still work.
    assert rc(f.cmd(read_public(V2))) == 0


def test_unknown_response_handle_type_passes_untranslated(chip, raw):
    f = new_file(chip, raw)
    fake = response(0, u32(0x81000005) + b"\x00" * 40, tag=0x8002)
    raw.injectors.append(lambda c: fake if be32(c, 6) == 0x131 else None)
    assert be32(f.cmd(create_primary()), 10) == 0x81000005
    assert f.state.space.context_tbl == [0, 0, 0]


def test_error_path_flushes_sessions_then_profile_decides(chip, raw):
    """Spec 7.7 / D4: an EINVAL destroys the file's sessions; 6.1 is stuck, 6.12 forgets."""
    f = new_file(chip, raw)
    s = be32(f.cmd(start_auth_session()), 10)
    with pytest.raises(OSError):
        f.write(read_public(V0))
    assert f.state.space.session_tbl[0] == s  # still listed
    if chip.profile.name == "6.1":
        for _ in range(3):
            with pytest.raises(OSError) as exc:
                f.write(get_random())
            assert exc.value.errno == errno.EFAULT
    else:
        assert rc(f.cmd(get_random())) == 0
        assert f.state.space.session_tbl == [0, 0, 0]


def test_flushing_another_files_session(chip, raw):
    a, b = new_file(chip, raw), new_file(chip, raw)
    s = be32(a.cmd(start_auth_session()), 10)
    assert rc(b.cmd(flush_context(s))) == 0
    if chip.profile.name == "6.1":
        with pytest.raises(OSError) as exc:
            a.write(get_random())
        assert exc.value.errno == errno.EFAULT
    else:
        assert rc(a.cmd(get_random())) == 0
        assert a.state.space.session_tbl == [0, 0, 0]


def _fail_nth_load(raw, rc_: int, nth: int = 1):
    seen = {"n": 0}

    def inject(c):
        if be32(c, 6) != CL:
            return None
        seen["n"] += 1
        return response(rc_) if seen["n"] == nth else None

    raw.injectors.append(inject)


# D2/D3 (docs/kernel-rules.md, ContextLoad answers): (rc, errno on 6.1, errno on 6.12); None = forgotten, command runs.
SESSION_LOAD = [(0x1CB, errno.EFAULT, None), (0x18B, None, None), (0x08B, None, None), (0x910, None, None),
                (0x1DF, errno.EFAULT, errno.EINVAL), (0x101, errno.EFAULT, errno.EFAULT)]  # fmt: skip
OBJECT_LOAD = [(0x910, errno.ENOENT, errno.ENOENT), (0x1CB, errno.EFAULT, errno.ENOENT),
               (0x1DF, errno.EFAULT, errno.EINVAL), (0x101, errno.EFAULT, errno.EFAULT)]  # fmt: skip


@pytest.mark.parametrize("rc_, e61, e612", SESSION_LOAD)
def test_session_contextload_classification(chip, raw, rc_, e61, e612):
    f = new_file(chip, raw)
    f.cmd(start_auth_session())
    _fail_nth_load(raw, rc_)
    want = e61 if chip.profile.name == "6.1" else e612
    if want is None:
        assert rc(f.cmd(get_random())) == 0
        assert f.state.space.session_tbl == [0, 0, 0]
    else:
        with pytest.raises(OSError) as exc:
            f.write(get_random())
        assert exc.value.errno == want


@pytest.mark.parametrize("rc_, e61, e612", OBJECT_LOAD)
def test_object_contextload_classification_keeps_the_object(chip, raw, rc_, e61, e612):
    f = new_file(chip, raw)
    f.cmd(create_primary())
    _fail_nth_load(raw, rc_)
    with pytest.raises(OSError) as exc:
        f.write(get_random())
    assert exc.value.errno == (e61 if chip.profile.name == "6.1" else e612)
    raw.injectors.clear()
    assert f.state.space.context_tbl == [SAVED, 0, 0]
    assert rc(f.cmd(read_public(V0))) == 0  # retried on the next command


def test_forgotten_session_cascades_to_later_slots(chip, raw):
    """The offset does not advance past a forgotten session: every later slot retries the
    same blob, so one session flushed elsewhere costs the file all of them (6.12)."""
    f, other = new_file(chip, raw), new_file(chip, raw)
    s0 = be32(f.cmd(start_auth_session()), 10)
    for _ in range(2):
        f.cmd(start_auth_session())
    assert rc(other.cmd(flush_context(s0))) == 0
    raw.log.clear()
    if chip.profile.name == "6.12":
        assert rc(f.cmd(get_random())) == 0
        assert f.state.space.session_tbl == [0, 0, 0]
        assert [r for c, r in raw.log if c == CL] == [0x1CB] * 3
    else:
        with pytest.raises(OSError) as exc:
            f.write(get_random())
        assert exc.value.errno == errno.EFAULT


def test_session_blob_restored_to_another_slots_handle_is_efault(chip, raw):
    f = new_file(chip, raw)
    for _ in range(2):
        f.cmd(start_auth_session())
    _fail_nth_load(raw, 0x910)  # slot 0 forgotten; slot 1 then loads slot 0's blob
    with pytest.raises(OSError) as exc:
        f.write(get_random())
    assert exc.value.errno == errno.EFAULT


def test_session_restored_to_a_different_handle_is_efault(chip, raw):
    f = new_file(chip, raw)
    s = be32(f.cmd(start_auth_session()), 10)
    raw.injectors.append(lambda c: response(0, u32(s + 1)) if be32(c, 6) == CL else None)
    with pytest.raises(OSError) as exc:
        f.write(get_random())
    assert exc.value.errno == errno.EFAULT


def test_object_contextsave_reference_h0_forgets_without_flush_and_leaks(chip, raw):
    f = new_file(chip, raw)
    raw.injectors.append(lambda c: response(0x910) if be32(c, 6) == CS else None)
    assert be32(f.cmd(create_primary()), 10) == V0
    assert f.state.space.context_tbl == [0, 0, 0]
    assert raw.handles(0x80000000) == [0x80000000]  # leaked in the TPM (rule S3)
    assert handles_of(f.cmd(get_cap_handles())) == []  # and hidden from the file


def test_object_contextsave_failure_is_efault_and_space_unchanged(chip, raw):
    f = new_file(chip, raw)
    f.cmd(create_primary())
    raw.injectors.append(lambda c: response(0x101) if be32(c, 6) == CS else None)
    with pytest.raises(OSError) as exc:
        f.write(create_primary())
    assert exc.value.errno == errno.EFAULT
    raw.injectors.clear()
    assert f.state.space.context_tbl == [SAVED, 0, 0]
    assert raw.handles(0x80000000) == []  # the new object was flushed
    assert rc(f.cmd(read_public(V0))) == 0


def test_ten_byte_success_reads_stale_handle_bytes(chip, raw):
    """No length check in map_response_header: bytes 10..13 are the command's."""
    f = new_file(chip, raw)
    raw.injectors.append(lambda c: response(0, tag=0x8002) if be32(c, 6) == 0x131 else None)
    out = f.cmd(create_primary())
    assert len(out) == 10 and rc(out) == 0
    # The stale handle was 0x40000001 (the command's primary handle): unknown type, untouched.
    assert f.state.space.context_tbl == [0, 0, 0]


def test_vendor_command_codes_follow_the_profile(chip, raw):
    vendor_entry = (1 << 29) | (1 << 28) | 0x0001  # V, rHandle, index 1
    chip.set_cc_attrs(chip.cc_attrs_tbl + [vendor_entry])
    f = new_file(chip, raw)
    raw.injectors.append(lambda c: response(0) if be32(c, 6) in (0x20000001, 0x00000001) else None)
    vendor = f.cmd(tpm.command(0x20000001))
    plain = f.cmd(tpm.command(0x00000001))
    synthesized = bytes.fromhex("80010000000a000b0143")
    if chip.profile.name == "6.1":
        assert vendor == synthesized
        assert rc(plain) == 0  # the index matched the vendor entry and was sent unchanged
    else:
        assert rc(vendor) == 0
        assert plain == synthesized
