# SPDX-License-Identifier: GPL-2.0-only
"""Per-open-file TPM spaces: transient handle virtualization and session isolation.

Port of drivers/char/tpm/tpm2-space.c (Linux 6.1 / 6.12): tpm2_init_space(),
tpm2_del_space(), tpm2_load_context(), tpm2_save_context(), tpm2_flush_space(),
tpm2_load_space(), tpm2_map_to_phandle(), tpm2_map_command(), tpm_find_and_validate_cc(),
tpm2_prepare_space(), tpm2_add_session(), tpm2_map_to_vhandle(),
tpm2_map_response_header(), tpm2_map_response_body(), tpm2_save_space(),
tpm2_commit_space().  Function names drop the ``tpm2_`` prefix; the logic, its order and
its quirks are the kernel's (docs/kernel-rules.md, "Spaces").

These are the kernel's answers to what a space loads before a command and saves after it;
an opt-in feature gives its own through :class:`cusetpm.kernel.seam.Seam`.
"""

from __future__ import annotations

import errno
import logging

from . import wire
from .request import Io
from .structs import NR_SLOTS, Chip, Space
from .tpm2_cmd import find_cc, flush_context, rc_value
from .tpm_interface import transmit_cmd
from .wire import be16, be32, command, put_be32, u32

log = logging.getLogger(__name__)

#: context_tbl value of an object whose context is held in context_buf.
SAVED = 0xFFFFFFFF
#: sizeof(struct tpm2_context): sequence(8) savedHandle(4) hierarchy(4) blob size(2).
CONTEXT_HEADER_SIZE = 18

#: Error results of prepare_space() that are not errnos.
EOPNOTSUPP = -errno.EOPNOTSUPP


def vhandle(slot: int) -> int:
    """The virtual handle user space sees for object slot ``slot``."""
    return wire.HT_TRANSIENT | (wire.HR_HANDLE_MASK - slot)


def flush_sessions(space: Space) -> Io[None]:
    """tpm2_flush_sessions(): FlushContext every tracked session, in slot order."""
    for handle in space.session_tbl:
        if handle:
            yield from flush_context(handle)


def del_space(space: Space) -> Io[None]:
    """tpm2_del_space() at close: flush the sessions; objects cost the TPM nothing."""
    yield from flush_sessions(space)


def load_context(chip: Chip, buf: bytearray, offset: int) -> Io[tuple[int, int, int]]:
    """tpm2_load_context(): ContextLoad the blob at ``offset``.

    Returns ``(err, handle, new_offset)``; err is 0, ``-ENOENT`` ("forget"), ``-EINVAL``
    (6.12: integrity) or ``-EFAULT``.
    """
    body_size = CONTEXT_HEADER_SIZE + be16(buf, offset + 16)
    cmd = command(wire.CC_CONTEXT_LOAD, bytes(buf[offset : offset + body_size]))
    rc, rsp = yield from transmit_cmd(cmd, 4, None)
    if rc < 0:
        log.warning("tpm2_load_context: failed with a system error %d", rc)
        return -errno.EFAULT, 0, offset
    if rc_value(chip.profile, rc) == wire.RC_HANDLE or rc == wire.RC_REFERENCE_H0:
        # HANDLE: the context cannot be loaded (replay counter); REFERENCE_H0: flushed
        # outside the space.  Either way the session is gone.
        return -errno.ENOENT, 0, offset
    if chip.profile.load_integrity_is_einval and rc_value(chip.profile, rc) == wire.RC_INTEGRITY:
        return -errno.EINVAL, 0, offset
    if rc > 0:
        log.warning("tpm2_load_context: failed with a TPM error 0x%04X", rc)
        return -errno.EFAULT, 0, offset
    return 0, be32(rsp, wire.TPM_HEADER_SIZE), offset + body_size


def save_context(chip: Chip, handle: int, buf: bytearray, offset: int) -> Io[tuple[int, int]]:
    """tpm2_save_context(): ContextSave ``handle`` and append the blob at ``offset``.

    Returns ``(err, new_offset)``; err is 0, ``-ENOENT`` (REFERENCE_H0: flushed already),
    ``-EFAULT`` or ``-ENOMEM`` (out of backing storage).
    """
    rc, rsp = yield from transmit_cmd(command(wire.CC_CONTEXT_SAVE, u32(handle)), 0, None)
    if rc < 0:
        log.warning("tpm2_save_context: failed with a system error %d", rc)
        return -errno.EFAULT, offset
    if rc_value(chip.profile, rc) == wire.RC_REFERENCE_H0:
        return -errno.ENOENT, offset
    if rc:
        log.warning("tpm2_save_context: failed with a TPM error 0x%04X", rc)
        return -errno.EFAULT, offset
    body = rsp[wire.TPM_HEADER_SIZE :]
    if offset + len(body) > len(buf):
        log.warning("tpm2_save_context: out of backing storage")
        return -errno.ENOMEM, offset
    buf[offset : offset + len(body)] = body
    return 0, offset + len(body)


def flush_space(chip: Chip) -> Io[None]:
    """tpm2_flush_space(): flush what the work space has loaded, and all its sessions.

    Flushing a *saved* session destroys it, which is why every error path costs the file
    all of its sessions (docs/kernel-rules.md, "Error paths").
    """
    space = chip.work_space
    for handle in space.context_tbl:
        if handle and handle != SAVED:
            yield from flush_context(handle)
    yield from flush_sessions(space)


def load_space(chip: Chip) -> Io[int]:
    """tpm2_load_space(): ContextLoad every object, then every session, in slot order."""
    space = chip.work_space
    offset = 0
    for i in range(NR_SLOTS):
        if not space.context_tbl[i]:
            continue
        if space.context_tbl[i] != SAVED:
            log.error("context table is inconsistent")
            return -errno.EFAULT
        rc, handle, offset = yield from load_context(chip, space.context_buf, offset)
        if rc:
            return rc
        space.context_tbl[i] = handle
    offset = 0
    for i in range(NR_SLOTS):
        if not space.session_tbl[i]:
            continue
        # A forgotten session does not advance the offset: the next slot retries its blob.
        rc, handle, offset = yield from load_context(chip, space.session_buf, offset)
        if rc == -errno.ENOENT:
            space.session_tbl[i] = 0
        elif rc:
            yield from flush_space(chip)
            return rc
        if handle != space.session_tbl[i]:
            log.warning("session restored to wrong handle")
            yield from flush_space(chip)
            return -errno.EFAULT
    return 0


def map_to_phandle(space: Space, buf: bytearray, offset: int) -> bool:
    """tpm2_map_to_phandle(): rewrite the vhandle at ``offset`` in place."""
    i = wire.HR_HANDLE_MASK - (be32(buf, offset) & wire.HR_HANDLE_MASK)
    if i >= NR_SLOTS or not space.context_tbl[i]:
        return False
    put_be32(buf, offset, space.context_tbl[i])
    return True


def map_command(chip: Chip, cc: int, cmd: bytearray) -> int:
    """tpm2_map_command(): translate transient handles in the handle area, nowhere else."""
    i = find_cc(chip, cc)
    if i < 0:
        return -errno.EINVAL
    nr_handles = (chip.cc_attrs_tbl[i] >> wire.CC_ATTR_CHANDLES) & 0x7
    for k in range(nr_handles):
        offset = wire.TPM_HEADER_SIZE + 4 * k
        if be32(cmd, offset) & wire.HR_RANGE_MASK == wire.HT_TRANSIENT:
            if not map_to_phandle(chip.work_space, cmd, offset):
                return -errno.EINVAL
    return 0


def find_and_validate_cc(chip: Chip, cmd: bytearray, length: int) -> int:
    """tpm_find_and_validate_cc(): the command code, ``-EOPNOTSUPP`` if the TPM lacks it."""
    if length < wire.TPM_HEADER_SIZE or not chip.cc_attrs_tbl:
        return -errno.EINVAL
    cc = be32(cmd, 6)
    i = find_cc(chip, cc)
    if i < 0:
        log.debug("0x%04X is an invalid command", cc)
        return EOPNOTSUPP
    nr_handles = 4 * ((chip.cc_attrs_tbl[i] >> wire.CC_ATTR_CHANDLES) & 0x7)
    if length < wire.TPM_HEADER_SIZE + nr_handles:
        return -errno.EINVAL
    return cc


def prepare_space(chip: Chip, space: Space, cmd: bytearray, cmdsiz: int) -> Io[int]:
    """tpm2_prepare_space(): validate, copy the space to the work space, load it, translate."""
    cc = find_and_validate_cc(chip, cmd, cmdsiz)
    if cc < 0:
        return cc
    chip.work_space.copy_from(space)
    rc = yield from load_space(chip)
    if rc:
        yield from flush_space(chip)
        return rc
    rc = map_command(chip, cc, cmd)
    if rc:
        yield from flush_space(chip)
        return rc
    chip.last_cc = cc
    return 0


def add_session(chip: Chip, handle: int) -> bool:
    """tpm2_add_session(): first free session slot (no duplicate check)."""
    tbl = chip.work_space.session_tbl
    for i in range(NR_SLOTS):
        if tbl[i] == 0:
            tbl[i] = handle
            return True
    return False


def map_to_vhandle(space: Space, phandle: int, alloc: bool) -> int:
    """tpm2_map_to_vhandle(): allocate (or find) the slot of ``phandle``; 0 if none."""
    tbl = space.context_tbl
    for i in range(NR_SLOTS):
        if alloc:
            if not tbl[i]:
                tbl[i] = phandle
                return vhandle(i)
        elif tbl[i] == phandle:
            return vhandle(i)
    return 0


def map_response_header(chip: Chip, cc: int, rsp: bytearray, length: int) -> Io[int]:
    """tpm2_map_response_header(): give a returned object a vhandle, record a session.

    There is no length check: a 10-byte success reads stale bytes 10..13, as the kernel does.
    """
    if be32(rsp, 6) != wire.RC_SUCCESS:
        return 0
    i = find_cc(chip, cc)
    if i < 0:
        return -errno.EFAULT
    if not (chip.cc_attrs_tbl[i] >> wire.CC_ATTR_RHANDLE) & 1:
        return 0
    phandle = be32(rsp, wire.TPM_HEADER_SIZE)
    kind = phandle & wire.HR_RANGE_MASK
    if kind == wire.HT_TRANSIENT:
        vh = map_to_vhandle(chip.work_space, phandle, True)
        if vh:
            put_be32(rsp, wire.TPM_HEADER_SIZE, vh)
            return 0
    elif kind in (wire.HT_HMAC_SESSION, wire.HT_POLICY_SESSION):
        if add_session(chip, phandle):
            return 0
    else:
        log.error("tpm2_map_response_header: unknown handle 0x%08X", phandle)
        return 0
    yield from flush_context(phandle)
    log.warning("tpm2_map_response_header: out of slots for 0x%08X", phandle)
    return -errno.ENOMEM


def map_response_body(chip: Chip, cc: int, rsp: bytearray, length: int) -> int:
    """tpm2_map_response_body(): filter GetCapability(HANDLES) to this space's vhandles.

    Foreign transient handles are dropped, every other handle type is kept, ``moreData`` and
    the requested property are left alone, and the length must be exact.
    """
    if cc != wire.CC_GET_CAPABILITY or be32(rsp, 6) != wire.RC_SUCCESS:
        return 0
    if length < wire.TPM_HEADER_SIZE + 9:
        return -errno.EFAULT
    if be32(rsp, 11) != wire.CAP_HANDLES:
        return 0
    count = be32(rsp, 15)
    if count > (0xFFFFFFFF - wire.TPM_HEADER_SIZE - 9) // 4:
        return -errno.EFAULT
    if length != wire.TPM_HEADER_SIZE + 9 + 4 * count:
        return -errno.EFAULT
    j = 0
    for i in range(count):
        phandle = be32(rsp, 19 + 4 * i)
        if phandle & wire.HR_RANGE_MASK == wire.HT_TRANSIENT:
            vh = map_to_vhandle(chip.work_space, phandle, False)
            if not vh:
                continue
            phandle = vh
        put_be32(rsp, 19 + 4 * j, phandle)
        j += 1
    put_be32(rsp, 2, wire.TPM_HEADER_SIZE + 9 + 4 * j)
    put_be32(rsp, 15, j)
    return 0


def save_space(chip: Chip) -> Io[int]:
    """tpm2_save_space(): ContextSave+FlushContext objects, ContextSave sessions."""
    space = chip.work_space
    offset = 0
    for i in range(NR_SLOTS):
        handle = space.context_tbl[i]
        if not handle or handle == SAVED:
            continue
        rc, offset = yield from save_context(chip, handle, space.context_buf, offset)
        if rc == -errno.ENOENT:
            # Forgotten without a flush: if the object was still loaded, it leaks (S3).
            space.context_tbl[i] = 0
            continue
        if rc:
            return rc
        yield from flush_context(handle)
        space.context_tbl[i] = SAVED
    offset = 0
    for i in range(NR_SLOTS):
        handle = space.session_tbl[i]
        if not handle:
            continue
        rc, offset = yield from save_context(chip, handle, space.session_buf, offset)
        if rc == -errno.ENOENT:
            space.session_tbl[i] = 0
        elif rc < 0:
            yield from flush_space(chip)
            return rc
    return 0


def commit_space(chip: Chip, space: Space, buf: bytearray, length: int) -> Io[int]:
    """tpm2_commit_space(): map the response, save the work space, and only if all of that
    worked copy it back to the file's space.  Returns the (maybe rewritten) response length
    or a negative errno; on error the response is lost."""
    rc = yield from map_response_header(chip, chip.last_cc, buf, length)
    if not rc:
        rc = map_response_body(chip, chip.last_cc, buf, length)
    if not rc:
        rc = yield from save_space(chip)
    if rc:
        yield from flush_space(chip)
        log.error("tpm2_commit_space: error %d", rc)
        return rc
    space.copy_from(chip.work_space)
    return be32(buf, 2)
