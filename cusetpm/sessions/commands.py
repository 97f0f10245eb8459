# SPDX-License-Identifier: GPL-2.0-only
"""The few commands the RM layer sends on its own account: flushing a session, listing the
TPM's sessions.  Sans-I/O generators like the port's own (:mod:`cusetpm.kernel.tpm2_cmd`)."""

from __future__ import annotations

from tpm2_pytss.constants import TPM2_RC

from ..kernel import wire
from ..kernel.request import Io
from ..kernel.tpm_interface import transmit_cmd
from ..kernel.wire import be32, command, u32
from .registry import key

#: How many handles one GetCapability(HANDLES) asks for.
CAP_BATCH = 64
_NUMBER_BITS = int(TPM2_RC.P) | int(TPM2_RC.N_MASK)


def is_handle_error(rc: int) -> bool:
    """TPM_RC_HANDLE whatever its parameter number: the context or session is gone."""
    return rc > 0 and bool(rc & wire.RC_FMT1) and rc & ~_NUMBER_BITS == wire.RC_HANDLE


def flush_session(handle: int) -> Io[bool]:
    """FlushContext; True if the session is gone (also when it was gone already)."""
    rc, _ = yield from transmit_cmd(command(wire.CC_FLUSH_CONTEXT, u32(handle)), 0, "flushing a session")
    return rc == 0 or is_handle_error(rc)


def list_sessions() -> Io[dict[int, int] | None]:
    """Every session the TPM holds, loaded or saved, by key; None if it would not say.

    Saved sessions are listed under the loaded-session prefix (a reference-implementation
    quirk), so both listings are asked and merged on the key."""
    present: dict[int, int] = {}
    for first in (wire.HT_HMAC_SESSION, wire.HT_POLICY_SESSION):
        prop = first
        while True:
            body = u32(wire.CAP_HANDLES) + u32(prop) + u32(CAP_BATCH)
            rc, rsp = yield from transmit_cmd(command(wire.CC_GET_CAPABILITY, body), 9, None)
            if rc:
                return None
            count = be32(rsp, wire.TPM_HEADER_SIZE + 5)
            handles = [be32(rsp, wire.TPM_HEADER_SIZE + 9 + 4 * i) for i in range(count)]
            present.update((key(h), h) for h in handles)
            if not rsp[wire.TPM_HEADER_SIZE] or not handles:
                break
            prop = handles[-1] + 1
    return present
