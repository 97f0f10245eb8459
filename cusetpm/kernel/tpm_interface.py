# SPDX-License-Identifier: GPL-2.0-only
"""Sending one command to the TPM, with the kernel's retry loop and checks.

Port of drivers/char/tpm/tpm-interface.c: tpm_try_transmit(), tpm_transmit(),
tpm_transmit_cmd(), and tpm_calc_ordinal_duration() with the table of
tpm2-cmd.c tpm2_ordinal_duration_index().  Sans-I/O: each function is a generator (see
:mod:`cusetpm.tpm`).
"""

from __future__ import annotations

import errno
import logging

from tpm2_pytss.constants import TPM2_CC

from . import wire
from .request import Io, Send, Sleep
from .wire import be32

log = logging.getLogger(__name__)

# Durations in milliseconds (tpm2-cmd.c TPM2_DURATION_*).
DURATION_MEDIUM = 750
DURATION_LONG = 2000
DURATION_LONG_LONG = 300000
DURATION_DEFAULT = 120000
#: The retry loop starts at TPM2_DURATION_SHORT and stops once the delay passes LONG.
RETRY_FIRST_DELAY = 20

_DURATIONS: dict[int, int] = {
    int(cc): ms
    for cc, ms in {
        TPM2_CC.Startup: DURATION_MEDIUM,
        TPM2_CC.SelfTest: DURATION_LONG,
        TPM2_CC.GetRandom: DURATION_LONG,
        TPM2_CC.SequenceUpdate: DURATION_MEDIUM,
        TPM2_CC.SequenceComplete: DURATION_MEDIUM,
        TPM2_CC.EventSequenceComplete: DURATION_MEDIUM,
        TPM2_CC.HashSequenceStart: DURATION_MEDIUM,
        TPM2_CC.VerifySignature: DURATION_LONG_LONG,
        TPM2_CC.PCR_Extend: DURATION_MEDIUM,
        TPM2_CC.HierarchyControl: DURATION_LONG,
        TPM2_CC.HierarchyChangeAuth: DURATION_LONG,
        TPM2_CC.GetCapability: DURATION_MEDIUM,
        TPM2_CC.NV_Read: DURATION_LONG,
        TPM2_CC.CreatePrimary: DURATION_LONG_LONG,
        TPM2_CC.Create: DURATION_LONG_LONG,
        TPM2_CC.CreateLoaded: DURATION_LONG_LONG,
    }.items()
}


def ordinal_duration(ordinal: int) -> float:
    """Seconds the kernel waits for this command (exact 32-bit match; vendor codes get the default)."""
    return _DURATIONS.get(ordinal, DURATION_DEFAULT) / 1000.0


def try_transmit(buf: bytearray, bufsiz: int = wire.TPM_BUFSIZE) -> Io[int]:
    """One transmission: send ``header.length`` bytes of ``buf``, put the response in ``buf``.

    Returns the response length or a negative errno, exactly as tpm_try_transmit() does.
    """
    count = be32(buf, 2)
    if count == 0:
        return -errno.ENODATA
    if count > bufsiz:
        return -errno.E2BIG
    ordinal = be32(buf, 6)
    reply = yield Send(bytes(buf[:count]), ordinal_duration(ordinal))
    if isinstance(reply, int):
        return reply
    assert isinstance(reply, bytes)
    n = len(reply)
    if n > bufsiz:
        # The driver cannot hand back more than the buffer holds (vtpm_proxy: -EIO).
        return -errno.EIO
    buf[:n] = reply
    if n < wire.TPM_HEADER_SIZE or n != be32(buf, 2):
        return -errno.EFAULT
    return n


def transmit(buf: bytearray, bufsiz: int = wire.TPM_BUFSIZE) -> Io[int]:
    """tpm_transmit(): retry TPM_RC_RETRY / TPM_RC_TESTING with doubling delays.

    At most 8 transmissions (sleeps 20..1280 ms); the last RETRY/TESTING response is
    returned as is.  The first 22 bytes (header and three already-translated handles) are
    restored before each retry because the response overwrote them.
    """
    save = bytes(buf[: min(wire.TPM_HEADER_SIZE + 12, bufsiz)])
    cc = be32(buf, 6)
    delay = RETRY_FIRST_DELAY
    while True:
        ret = yield from try_transmit(buf, bufsiz)
        if ret < 0:
            break
        rc = be32(buf, 6)
        if rc != wire.RC_RETRY and rc != wire.RC_TESTING:
            break
        if rc == wire.RC_TESTING and cc == wire.CC_SELF_TEST:
            break
        if delay > DURATION_LONG:
            log.error("in retry loop" if rc == wire.RC_RETRY else "self test is still running")
            break
        yield Sleep(delay / 1000.0)
        delay *= 2
        buf[: len(save)] = save
    return ret


def transmit_cmd(cmd: bytes, min_rsp_body_length: int = 0, desc: str | None = None) -> Io[tuple[int, bytes]]:
    """tpm_transmit_cmd(): a kernel-internal command.

    Returns ``(result, response)``: result is a negative errno, a positive TPM rc, or 0 with
    the whole response.  A success shorter than the caller's minimum is ``-EFAULT``.
    """
    buf = bytearray(wire.TPM_BUFSIZE)
    buf[: len(cmd)] = cmd
    length = yield from transmit(buf, wire.TPM_BUFSIZE)
    if length < 0:
        return length, b""
    err = be32(buf, 6)
    if err != 0 and err != wire.RC_TESTING and desc:
        log.info("A TPM error (%d) occurred %s", err, desc)
    if err:
        return err, bytes(buf[:length])
    if length < min_rsp_body_length + wire.TPM_HEADER_SIZE:
        return -errno.EFAULT, b""
    return 0, bytes(buf[:length])
