# SPDX-License-Identifier: GPL-2.0-only
"""What the RM layer answers itself under ``--sessions global`` (research notes §7.13):
tombstones, isolation and quotas.  Each check reads the registry and says which code, if any,
answers the command instead of the TPM; nothing is sent for it."""

from __future__ import annotations

from tpm2_pytss.constants import TPM2_CC, TPM2_RC

from ..kernel import wire
from ..kernel.structs import NR_SLOTS, Space
from . import parse
from .gap import RC_CONTEXT_GAP
from .parse import Command
from .registry import Registry, State, is_session
from .settings import Settings

CC_START_AUTH_SESSION = int(TPM2_CC.StartAuthSession)
RC_SESSION_HANDLES = int(TPM2_RC.SESSION_HANDLES)
RM = wire.RC_RESMGR_TPM_LAYER

#: The codes the RM layer answers itself (research notes §7.13); nothing reaches the TPM.
RC_RM_TABLE_FULL = RM | int(TPM2_RC.SESSION_MEMORY)  # 0x000B0903: 4th session of a file
RC_RM_QUOTA = RM | RC_SESSION_HANDLES  # 0x000B0905: a quota (file, uid, detached)
RC_RM_EVICTED_HANDLE = RM | int(TPM2_RC.REFERENCE_H0)  # 0x000B0910 + i: tombstone, handle area
RC_RM_EVICTED_SESSION = RM | int(TPM2_RC.REFERENCE_S0)  # 0x000B0918 + i: tombstone, auth area
RC_RM_NOT_YOURS = RM | (wire.RC_HANDLE + int(TPM2_RC.P) + int(TPM2_RC.RC1))  # 0x000B01CB
RC_RM_GAP = RM | RC_CONTEXT_GAP  # 0x000B0901: a context gap that could not be repaired


def tombstone_answer(reg: Registry, space: Space, cmd: Command) -> int | None:
    """T1/T2: a file's reference to a session the RM removed from it."""
    for i, h in enumerate(cmd.handles):
        if is_session(h) and reg.tombstoned(space, h):
            reg.drop_tombstone(space, h)
            reg.count("tombstone_hits")
            if cmd.cc == wire.CC_FLUSH_CONTEXT:
                return wire.RC_SUCCESS  # synthesized: the session is gone, as asked
            return RC_RM_EVICTED_HANDLE + i
    for i, (h, _) in enumerate(cmd.sessions):
        if is_session(h) and reg.tombstoned(space, h):
            reg.drop_tombstone(space, h)
            reg.count("tombstone_hits")
            return RC_RM_EVICTED_SESSION + i
    return None


def refusal(reg: Registry, s: Settings, space: Space, cmd: Command, buf: bytearray, length: int) -> int | None:
    """Isolation and quotas: refused by the RM, never by eviction or waiting."""
    target = cmd.handles[0] if cmd.handles else 0
    if cmd.cc == wire.CC_FLUSH_CONTEXT and is_session(target) and s.isolate_session_flush:
        e = reg.get(target)
        if (
            e is not None
            and e.handle == target
            and e.owner is not space
            and e.state in (State.ATTACHED, State.DETACHED)
            and reg.live(e.owner)
        ):
            reg.count("isolation_refusals")
            return RC_RM_NOT_YOURS
    if cmd.cc == wire.CC_CONTEXT_SAVE and is_session(target):
        e = reg.get(target)
        if e is not None and e.owner is space and e.state is State.ATTACHED:
            if len(reg.of(space, State.DETACHED)) >= s.max_detached_per_space:
                reg.count("quota_rejections_detached")
                return RC_RM_QUOTA
    if cmd.cc == wire.CC_CONTEXT_LOAD and is_session(parse.context_handle(buf)):
        blob = bytes(buf[wire.TPM_HEADER_SIZE : length])
        if blob in reg.evicted_blobs:
            reg.count("tombstone_hits")
            return RC_RM_NOT_YOURS
        return session_quota(reg, s, space)
    if cmd.cc == CC_START_AUTH_SESSION:
        return session_quota(reg, s, space)
    return None


def session_quota(reg: Registry, s: Settings, space: Space) -> int | None:
    attached = len(reg.of(space, State.ATTACHED))
    if attached >= NR_SLOTS:
        reg.count("quota_rejections_table")
        return RC_RM_TABLE_FULL
    if attached >= s.max_sessions_per_space:
        reg.count("quota_rejections_space")
        return RC_RM_QUOTA
    if s.max_sessions_per_uid and reg.of_uid(uid(space)) >= s.max_sessions_per_uid:
        reg.count("quota_rejections_uid")
        return RC_RM_QUOTA
    return None


def uid(space: Space) -> int:
    """The uid of whoever opened the file (-1: unknown), what uid quotas count by."""
    owner_uid = getattr(space.owner, "uid", -1)
    return owner_uid if isinstance(owner_uid, int) else -1
