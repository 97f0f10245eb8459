# SPDX-License-Identifier: GPL-2.0-only
"""Telling whether the TPM behind a lost connection is still the same TPM.

When the backend's transport fails (swtpm killed, a relay dropped the connection, the
simulator restarted) the daemon reconnects and must decide, before any file sends another
command, whether the TPM it reaches now still holds the state the open files' spaces refer to.
A TPM that was restarted has forgotten every transient object and session, and a context blob
saved before may even load into the wrong place; so a file opened before the restart must
never be answered with the new TPM's state.  The kernel has the same situation when a chip
goes away: its old files get ``EPIPE`` from write() for good, and a new device appears.

The test is TPM2_ReadClock: ``resetCount`` and ``restartCount`` change at every TPM Reset
and Restart, and ``clock`` (ms the TPM has been powered, kept in NV) runs with real time, so
a clock that fell behind the time that passed means a TPM that was powered off meanwhile.  A
TPM that answers TPM_RC_INITIALIZE was powered up again and waits for Startup.

Sans-I/O: generators of :mod:`cusetpm.kernel.request`, driven by :class:`.chip.TpmChip`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tpm2_pytss.constants import TPM2_CAP, TPM2_CC, TPM2_HT

from ..kernel import wire
from ..kernel.request import Io
from ..kernel.tpm2_cmd import flush_context
from ..kernel.tpm_interface import transmit_cmd
from ..kernel.wire import be32, command, u32

#: How far (ms) the TPM clock may lag the host's time and still be the same TPM.
CLOCK_SLACK_MS = 1000
_HANDLE_SHIFT = 24


@dataclass(frozen=True)
class TpmIdentity:
    """What ReadClock says, and when (the host's monotonic clock, seconds) it said it."""

    reset_count: int
    restart_count: int
    clock_ms: int
    seen_at: float

    def same_as(self, earlier: TpmIdentity) -> bool:
        """Could this TPM be ``earlier``'s, powered all along?"""
        elapsed_ms = max(0.0, (self.seen_at - earlier.seen_at) * 1000.0)
        return (
            self.reset_count == earlier.reset_count
            and self.restart_count == earlier.restart_count
            and self.clock_ms + CLOCK_SLACK_MS >= earlier.clock_ms + 0.9 * elapsed_ms
        )


def read_identity(now: float) -> Io[TpmIdentity | None]:
    """TPM2_ReadClock; None when the TPM cannot say (it waits for Startup, or fails)."""
    rc, rsp = yield from transmit_cmd(command(int(TPM2_CC.ReadClock)), 8 + 8 + 4 + 4 + 1)
    if rc:
        return None
    # TPMS_TIME_INFO: time (UINT64), clockInfo: clock (UINT64), resetCount, restartCount, safe.
    _time, clock, resets, restarts = struct.unpack_from(">QQII", rsp, wire.TPM_HEADER_SIZE)
    return TpmIdentity(resets, restarts, clock, now)


def _loaded(first: int) -> Io[list[int]]:
    """GetCapability(TPM_CAP_HANDLES, ``first``): the handles of that type (TPM_HT_TRANSIENT:
    loaded objects; TPM_HT_LOADED_SESSION: loaded sessions, HMAC and policy alike)."""
    body = u32(int(TPM2_CAP.HANDLES)) + u32(first) + u32(64)
    rc, rsp = yield from transmit_cmd(command(int(TPM2_CC.GetCapability), body), 1 + 4 + 4)
    if rc:
        return []
    count = be32(rsp, wire.TPM_HEADER_SIZE + 1 + 4)
    handles = [be32(rsp, wire.TPM_HEADER_SIZE + 9 + 4 * i) for i in range(count)]
    return handles


def flush_leftovers() -> Io[int]:
    """Flush what a command cut short by the lost connection left loaded.

    Between two commands the kernel's RM keeps nothing loaded: every object is saved and
    flushed, every session saved (tpm2_commit_space()).  A command whose transport failed
    could not run its error path (tpm2_flush_space()) on the TPM, so what is loaded now is
    exactly what that path would have flushed.  Saved sessions (TPM_HT_SAVED_SESSION) belong
    to the spaces and stay.  Returns how many handles were flushed.
    """
    n = 0
    for kind in (TPM2_HT.TRANSIENT, TPM2_HT.LOADED_SESSION):
        for handle in (yield from _loaded(int(kind) << _HANDLE_SHIFT)):
            yield from flush_context(handle)
            n += 1
    return n
