# SPDX-License-Identifier: GPL-2.0-only
"""TPM 2.0 commands the kernel issues itself, and the command attribute table.

Port of drivers/char/tpm/tpm2-cmd.c: tpm2_flush_context(), tpm2_do_selftest(),
tpm2_startup(), tpm2_get_tpm_pt(), tpm2_get_cc_attrs_tbl(), tpm2_find_cc(),
tpm2_auto_startup(); and tpm2_rc_value() from include/linux/tpm.h.
"""

from __future__ import annotations

import errno
import logging

from . import wire
from .profiles import KernelProfile
from .request import Io
from .structs import Chip
from .tpm_interface import transmit_cmd
from .wire import be32, command, u32

log = logging.getLogger(__name__)


class ChipInitError(Exception):
    """The chip cannot be registered: the kernel would create no /dev/tpmrm node."""


def rc_value(profile: KernelProfile, rc: int) -> int:
    """tpm2_rc_value(): strip the handle/parameter number from a format-1 code (D1)."""
    return rc & profile.rc_value_mask if rc & wire.RC_FMT1 else rc


def find_cc(chip: Chip, cc: int) -> int:
    """tpm2_find_cc(): index of the first attribute entry matching ``cc``, or -1 (D5)."""
    return chip.cc_index.get(cc, -1)


def flush_context(handle: int) -> Io[None]:
    """tpm2_flush_context(): FlushContext, errors only logged."""
    yield from transmit_cmd(command(wire.CC_FLUSH_CONTEXT, u32(handle)), 0, "flushing context")


def do_selftest() -> Io[int]:
    """tpm2_do_selftest(): SelfTest(NO), then SelfTest(YES) if the first one failed."""
    rc = 0
    for full in (0, 1):
        rc, _ = yield from transmit_cmd(command(wire.CC_SELF_TEST, bytes([full])), 0, "attempting the self test")
        if rc == wire.RC_TESTING:
            rc = wire.RC_SUCCESS
        if rc in (wire.RC_INITIALIZE, wire.RC_SUCCESS):
            return rc
    return rc


def startup() -> Io[int]:
    """tpm2_startup(): Startup(CLEAR)."""
    rc, _ = yield from transmit_cmd(command(wire.CC_STARTUP, b"\x00\x00"), 0, "attempting to start the TPM")
    return rc


def get_tpm_pt(prop: int) -> Io[tuple[int, int]]:
    """tpm2_get_tpm_pt(): one TPM property value; returns ``(rc, value)``."""
    body = u32(wire.CAP_TPM_PROPERTIES) + u32(prop) + u32(1)
    rc, rsp = yield from transmit_cmd(command(wire.CC_GET_CAPABILITY, body), 0, None)
    if rc:
        return rc, 0
    # moreData(1) capability(4) count(4) property(4) value(4)
    if len(rsp) < wire.TPM_HEADER_SIZE + 17 or be32(rsp, wire.TPM_HEADER_SIZE + 5) != 1:
        return -errno.ENODATA, 0
    return 0, be32(rsp, wire.TPM_HEADER_SIZE + 13)


def get_cc_attrs_tbl(chip: Chip) -> Io[int]:
    """tpm2_get_cc_attrs_tbl(): read TPMA_CC for every command, forcing one handle for
    ContextSave and FlushContext so that their handle parameter is translated."""
    rc, nr_commands = yield from get_tpm_pt(wire.PT_TOTAL_COMMANDS)
    if rc:
        return -errno.ENODEV if rc > 0 else rc
    if nr_commands > 0xFFFFF:
        return -errno.EFAULT
    body = u32(wire.CAP_COMMANDS) + u32(wire.CC_FIRST) + u32(nr_commands)
    rc, rsp = yield from transmit_cmd(command(wire.CC_GET_CAPABILITY, body), 9 + 4 * nr_commands, None)
    if rc:
        return -errno.ENODEV if rc > 0 else rc
    if nr_commands != be32(rsp, wire.TPM_HEADER_SIZE + 5):
        return -errno.EFAULT
    table = []
    chandles_mask = 0x7 << wire.CC_ATTR_CHANDLES
    for i in range(nr_commands):
        attrs = be32(rsp, wire.TPM_HEADER_SIZE + 9 + 4 * i)
        if attrs & wire.CC_INDEX_MASK in (wire.CC_CONTEXT_SAVE, wire.CC_FLUSH_CONTEXT):
            attrs = (attrs & ~chandles_mask) | (1 << wire.CC_ATTR_CHANDLES)
        table.append(attrs)
    chip.set_cc_attrs(table)
    return 0


def auto_startup(chip: Chip) -> Io[None]:
    """tpm2_auto_startup() as at chip registration: self test, Startup(CLEAR) if the TPM
    needs it, then the attribute table.  Raises ChipInitError where the kernel would not
    create /dev/tpmrm0 (failure or field-upgrade mode)."""
    rc = yield from do_selftest()
    if rc == wire.RC_INITIALIZE:
        rc = yield from startup()
        if rc == 0:
            rc = yield from do_selftest()
    if rc:
        raise ChipInitError(f"TPM self test/startup failed: {_describe(rc)}")
    rc = yield from get_cc_attrs_tbl(chip)
    if rc:
        raise ChipInitError(f"cannot read the TPM command table: {_describe(rc)}")
    if not chip.cc_attrs_tbl:
        raise ChipInitError("the TPM reports no commands")


def _describe(rc: int) -> str:
    return f"errno {errno.errorcode.get(-rc, -rc)}" if rc < 0 else f"TPM rc 0x{rc:x}"
