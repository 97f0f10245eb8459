# SPDX-License-Identifier: GPL-2.0-only
"""cusetpm.sessions.refusals on its own: each check against a registry built by hand.  The
same answers through the whole seam, and through a node, are in tests/test_global_seam.py
and tests/test_sessions_global.py."""

from __future__ import annotations

from types import SimpleNamespace

from cusetpm.kernel.structs import Space
from cusetpm.kernel.wire import CC_FLUSH_CONTEXT
from cusetpm.sessions import Settings
from cusetpm.sessions.parse import Command
from cusetpm.sessions.refusals import (
    CC_START_AUTH_SESSION,
    RC_RM_EVICTED_HANDLE,
    RC_RM_EVICTED_SESSION,
    RC_RM_NOT_YOURS,
    RC_RM_QUOTA,
    RC_RM_TABLE_FULL,
    refusal,
    session_quota,
    tombstone_answer,
    uid,
)
from cusetpm.sessions.registry import Registry, State

H0, H1, H2 = 0x03000000, 0x03000001, 0x03000002


def spaces(*uids: int) -> list[Space]:
    out = []
    for u in uids:
        s = Space()
        s.owner = SimpleNamespace(uid=u)
        out.append(s)
    return out


def test_the_codes_are_the_rm_layers():
    assert (RC_RM_TABLE_FULL, RC_RM_QUOTA, RC_RM_NOT_YOURS) == (0x000B0903, 0x000B0905, 0x000B01CB)
    assert (RC_RM_EVICTED_HANDLE, RC_RM_EVICTED_SESSION) == (0x000B0910, 0x000B0918)


def test_uid_of_an_owner_and_of_none():
    (a,) = spaces(1000)
    assert uid(a) == 1000 and uid(Space()) == -1


def test_a_tombstone_answers_once_by_where_the_handle_is():
    reg, (a,) = Registry(), spaces(1)
    reg.info(a)  # a live file: only those keep tombstones
    reg.tombstone(a, H1, "evicted", 0.0, 16)
    assert tombstone_answer(reg, a, Command(0x17E, 0x8002, handles=[H0, H1])) == RC_RM_EVICTED_HANDLE + 1
    assert tombstone_answer(reg, a, Command(0x17E, 0x8002, handles=[H1])) is None  # used up
    reg.tombstone(a, H2, "lost", 0.0, 16)
    assert tombstone_answer(reg, a, Command(0x17B, 0x8002, sessions=[(H2, 1)])) == RC_RM_EVICTED_SESSION
    reg.tombstone(a, H2, "lost", 0.0, 16)
    assert tombstone_answer(reg, a, Command(CC_FLUSH_CONTEXT, 0x8001, handles=[H2])) == 0  # as asked


def test_quotas_count_a_files_and_a_uids_sessions():
    reg, (a, b) = Registry(), spaces(7, 7)
    s = Settings(max_sessions_per_space=2, max_sessions_per_uid=3)
    for h in (H0, H1):
        reg.add(h, State.ATTACHED, a, 7, 0.0)
    assert session_quota(reg, s, a) == RC_RM_QUOTA  # the file's two
    reg.add(H2, State.ATTACHED, b, 7, 0.0)
    assert session_quota(reg, s, b) == RC_RM_QUOTA  # the uid's three
    assert session_quota(reg, Settings(), b) is None


def test_another_live_files_session_may_not_be_flushed():
    reg, (a, b) = Registry(), spaces(1, 2)
    reg.info(a)
    reg.info(b)
    reg.add(H0, State.ATTACHED, a, 1, 0.0)
    flush = Command(CC_FLUSH_CONTEXT, 0x8001, handles=[H0])
    buf = bytearray(14)
    assert refusal(reg, Settings(), b, flush, buf, 14) == RC_RM_NOT_YOURS
    assert refusal(reg, Settings(), a, flush, buf, 14) is None
    assert refusal(reg, Settings(isolate_session_flush=False), b, flush, buf, 14) is None
    assert refusal(reg, Settings(), b, Command(CC_START_AUTH_SESSION, 0x8001), buf, 14) is None
