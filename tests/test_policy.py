# SPDX-License-Identifier: GPL-2.0-only
"""cusetpm.tenants.policy: which commands a tenant's rules refuse, and with what code."""

from __future__ import annotations

import struct

import pytest
from tpm2_pytss.constants import TPM2_CC, TPM2_RH

from cusetpm.tenants import policy as P

PW = struct.pack(">IIHBH", 9, 0x40000009, 0, 0, 0)  # one password session: size, handle, nonce, attrs, hmac


def command(cc: int, handles: list[int] = (), params: bytes = b"", *, sessions: bool = True) -> bytes:  # type: ignore[assignment]
    body = b"".join(struct.pack(">I", h) for h in handles) + (PW if sessions else b"") + params
    return struct.pack(">HII", 0x8002 if sessions else 0x8001, 10 + len(body), int(cc)) + body


def nv_define(index: int) -> bytes:
    public = struct.pack(">IHIHH", index, 0x000B, 0x00060006, 0, 32)
    return command(
        TPM2_CC.NV_DefineSpace, [TPM2_RH.OWNER], struct.pack(">H", 0) + struct.pack(">H", len(public)) + public
    )


TENANT = P.make_policy(
    nv=["0x01500000-0x015000ff"], nv_read=["0x01c00002"], persistent=["0x81000100-0x810001ff"], pcrs=[16],
    hierarchies=["owner", "endorsement"],
)  # fmt: skip


def rule(cmd: bytes, policy: P.Policy = TENANT, **kw: object) -> str | None:
    r = P.decide(policy, cmd, **kw)  # type: ignore[arg-type]
    return None if r is None else r.rule


def test_the_default_deny_list_refuses_what_changes_the_tpm_for_everyone() -> None:
    r = P.decide(TENANT, command(TPM2_CC.Clear, [TPM2_RH.LOCKOUT]))
    assert r is not None and (r.rule, r.rc) == ("deny", 0x000B0143)
    for name in ("ClearControl", "HierarchyControl", "ChangeEPS", "DictionaryAttackLockReset", "FieldUpgradeStart"):
        assert rule(command(P.command_code(name), [TPM2_RH.OWNER])) == "deny", name
    assert (
        rule(command(TPM2_CC.Startup, params=b"\x00\x00", sessions=False)) is None
    )  # FAPI sends it; the TPM says INITIALIZE
    assert rule(command(TPM2_CC.GetRandom, params=b"\x00\x10", sessions=False)) is None


def test_deny_and_allow_lists_match_names_without_regard_to_case() -> None:
    p = P.make_policy(deny=["getrandom"], allow=None)
    assert rule(command(TPM2_CC.GetRandom, params=b"\x00\x10", sessions=False), p) == "deny"
    assert rule(command(TPM2_CC.Clear, [TPM2_RH.LOCKOUT]), p) is None  # an explicit deny replaces the default
    only = P.make_policy(deny=[], allow=["GETRANDOM", "ReadClock"])
    assert rule(command(TPM2_CC.GetRandom, params=b"\x00\x10", sessions=False), only) is None
    assert rule(command(TPM2_CC.PCR_Read, params=b"\x00\x00\x00\x00", sessions=False), only) == "allow"
    with pytest.raises(KeyError, match="NoSuchCommand"):
        P.make_policy(deny=["NoSuchCommand"])


def test_nv_indices_outside_the_tenants_ranges_are_refused_reads_included() -> None:
    mine, theirs = 0x01500010, 0x01500110
    for cc in (TPM2_CC.NV_Read, TPM2_CC.NV_Write, TPM2_CC.NV_UndefineSpace, TPM2_CC.NV_ReadLock):
        assert rule(command(cc, [TPM2_RH.OWNER, mine])) is None
        r = P.decide(TENANT, command(cc, [TPM2_RH.OWNER, theirs]))
        assert r is not None and (r.rule, r.rc) == ("nv", 0x000B0149)
    assert rule(command(TPM2_CC.NV_ReadPublic, [theirs], sessions=False)) == "nv"
    assert rule(nv_define(mine)) is None
    assert rule(nv_define(theirs)) == "nv"


def test_nv_read_ranges_may_be_read_but_not_written() -> None:
    ek_cert = 0x01C00002
    assert rule(command(TPM2_CC.NV_ReadPublic, [ek_cert], sessions=False)) is None
    assert rule(command(TPM2_CC.NV_Read, [ek_cert, ek_cert])) is None
    assert rule(command(TPM2_CC.NV_Write, [ek_cert, ek_cert])) == "nv"
    assert rule(command(TPM2_CC.NV_UndefineSpace, [TPM2_RH.OWNER, ek_cert])) == "nv"


def test_persistent_handles_outside_the_range_can_neither_be_made_nor_used() -> None:
    evict = lambda target: command(TPM2_CC.EvictControl, [TPM2_RH.OWNER, 0x80000000], struct.pack(">I", target))  # noqa: E731
    assert rule(evict(0x81000100)) is None
    r = P.decide(TENANT, evict(0x81000200))
    assert r is not None and (r.rule, r.rc) == ("persistent", 0x000B008B)
    assert rule(command(TPM2_CC.ReadPublic, [0x81000200], sessions=False)) == "persistent"
    assert (
        rule(command(TPM2_CC.EvictControl, [TPM2_RH.OWNER, 0x81000200], struct.pack(">I", 0x81000200))) == "persistent"
    )


def test_only_listed_pcrs_may_change_and_every_pcr_may_be_read() -> None:
    digest = struct.pack(">IH", 1, 0x000B) + bytes(32)
    assert rule(command(TPM2_CC.PCR_Extend, [16], digest)) is None
    r = P.decide(TENANT, command(TPM2_CC.PCR_Extend, [23], digest))
    assert r is not None and (r.rule, r.rc) == ("pcrs", 0x000B0907)
    assert rule(command(TPM2_CC.PCR_Reset, [23])) == "pcrs"
    assert (
        rule(command(TPM2_CC.PCR_Read, params=struct.pack(">IHB3B", 1, 0x000B, 3, 0xFF, 0xFF, 0xFF), sessions=False))
        is None
    )


def test_hierarchies_the_tenant_may_not_authorize_against() -> None:
    primary = lambda h: command(TPM2_CC.CreatePrimary, [h], bytes(12))  # noqa: E731
    assert rule(primary(TPM2_RH.OWNER)) is None
    assert rule(primary(TPM2_RH.ENDORSEMENT)) is None
    r = P.decide(TENANT, primary(TPM2_RH.PLATFORM))
    assert r is not None and (r.rule, r.rc) == ("hierarchies", 0x000B0085)
    assert rule(primary(TPM2_RH.NULL)) is None
    assert rule(command(TPM2_CC.HierarchyChangeAuth, [TPM2_RH.LOCKOUT], b"\x00\x00")) == "hierarchies"
    assert rule(command(TPM2_CC.HierarchyChangeAuth, [TPM2_RH.OWNER], b"\x00\x00")) is None


def test_quotas_on_size_objects_and_sessions() -> None:
    p = P.make_policy(deny=[], max_objects=2, max_sessions=1, max_command_bytes=64)
    big = command(TPM2_CC.GetRandom, params=bytes(80), sessions=False)
    r = P.decide(p, big)
    assert r is not None and (r.rule, r.rc) == ("max_command_bytes", 0x000B0142)
    load = command(TPM2_CC.CreatePrimary, [TPM2_RH.OWNER], bytes(12))
    assert P.decide(p, load, creates=True, usage=P.Usage(objects=1)) is None
    r = P.decide(p, load, creates=True, usage=P.Usage(objects=2))
    assert r is not None and (r.rule, r.rc) == ("max_objects", 0x000B0902)
    start = command(TPM2_CC.StartAuthSession, [TPM2_RH.NULL, TPM2_RH.NULL], bytes(20), sessions=False)
    assert P.decide(p, start, usage=P.Usage(sessions=0)) is None
    r = P.decide(p, start, usage=P.Usage(sessions=1))
    assert r is not None and (r.rule, r.rc) == ("max_sessions", 0x000B0903)
    session_ctx = command(
        TPM2_CC.ContextLoad, params=bytes(8) + struct.pack(">I", 0x02000000) + bytes(10), sessions=False
    )
    assert rule(session_ctx, p, usage=P.Usage(sessions=1)) == "max_sessions"
    objects_only = P.make_policy(deny=[], max_objects=1)
    assert rule(session_ctx, objects_only, usage=P.Usage(objects=1, sessions=3)) is None  # a session is no object


def test_a_command_a_rule_must_read_but_that_does_not_parse_is_refused() -> None:
    short = nv_define(0x01500010)[:-6]
    short = short[:2] + struct.pack(">I", len(short)) + short[6:]
    r = P.decide(TENANT, short)
    assert r is not None and (r.rule, r.rc) == ("unparsed", 0x000B009A)
    assert P.decide(TENANT, b"\x80\x01\x00") is None  # too short for anything: the kernel's answer


def test_the_open_policy_restricts_nothing() -> None:
    assert not P.OPEN.restricts and TENANT.restricts
    for cmd in (command(TPM2_CC.Clear, [TPM2_RH.LOCKOUT]), nv_define(0x01000000), command(TPM2_CC.PCR_Reset, [23])):
        assert P.decide(P.OPEN, cmd) is None


@pytest.mark.parametrize("bad", ["0x01-", "zz", "0x2-0x1", 1.5, "0x1ffffffff"])
def test_malformed_ranges_are_errors(bad: object) -> None:
    with pytest.raises(ValueError, match="nv"):
        P.make_policy(nv=[bad])  # type: ignore[list-item]


def test_ranges_print_as_the_config_spells_them() -> None:
    assert str(P.Ranges.parse(["0x01500000-0x015000ff", 0x81000001], "x")) == "0x01500000-0x015000ff,0x81000001"
