# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py's TPM commands as bytes, and the check of a response.

Issue 9 measures with a tpm2-pytss TCTI loop: the command's bytes transmitted, the whole
response received.  The paths' clients (bench_paths, bench_clients) and the backend's own cost
over a raw socket (bench_limits) send these same bytes, so that every figure times the same
commands.
"""

from __future__ import annotations

import struct

from tpm2_pytss.constants import TPM2_ALG, TPM2_CC, TPM2_RH, TPM2_ST, TPMA_OBJECT

from ..kernel import wire

ST_SESSIONS = int(TPM2_ST.SESSIONS)
#: One password authorization (TPM2_RS_PW, empty nonce, no attributes, empty password), with
#: its authorizationSize in front: what CreatePrimary and Sign need for an empty auth value.
PW_AUTH = struct.pack(">IIHBH", 9, int(TPM2_RH.PW), 0, 0, 0)
#: The signing key: an ECC P-256 primary in the owner hierarchy.
KEY_ATTRS = (
    TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
)  # fmt: skip
DIGEST = bytes(range(32))  # what every Sign signs
NAMES = {
    wire.CC_GET_RANDOM: "GetRandom",
    wire.CC_CONTEXT_LOAD: "ContextLoad",
    wire.CC_CONTEXT_SAVE: "ContextSave",
    wire.CC_FLUSH_CONTEXT: "FlushContext",
    int(TPM2_CC.Sign): "Sign",
    int(TPM2_CC.CreatePrimary): "CreatePrimary",
}
#: Sends of one command at most while the TPM answers RETRY or TESTING.
RETRIES = 10


def get_random(n: int = 16) -> bytes:
    return wire.command(wire.CC_GET_RANDOM, struct.pack(">H", n))


GET_RANDOM = get_random(16)


def create_primary() -> bytes:
    """CreatePrimary(owner) of the signing key: empty sensitive, no outside info, no PCRs."""
    from tpm2_pytss.types import TPM2B_PUBLIC

    public = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=KEY_ATTRS).marshal()
    sensitive = struct.pack(">HHH", 4, 0, 0)  # TPM2B_SENSITIVE_CREATE: empty userAuth and data
    body = wire.u32(int(TPM2_RH.OWNER)) + PW_AUTH + sensitive + public + struct.pack(">HI", 0, 0)
    return wire.command(int(TPM2_CC.CreatePrimary), body, ST_SESSIONS)


def sign(handle: int) -> bytes:
    """Sign DIGEST with the key at ``handle``: sha256 digest, null scheme (the key's own
    ECDSA-SHA256), a null hash-check ticket."""
    scheme = struct.pack(">H", int(TPM2_ALG.NULL))  # TPMT_SIG_SCHEME, no details
    ticket = struct.pack(">HIH", int(TPM2_ST.HASHCHECK), int(TPM2_RH.NULL), 0)  # TPMT_TK_HASHCHECK
    body = wire.u32(handle) + PW_AUTH + struct.pack(">H", len(DIGEST)) + DIGEST + scheme + ticket
    return wire.command(int(TPM2_CC.Sign), body, ST_SESSIONS)


def context_save(handle: int) -> bytes:
    return wire.command(wire.CC_CONTEXT_SAVE, wire.u32(handle))


def context_load(context: bytes) -> bytes:
    """ContextLoad of a TPMS_CONTEXT as ContextSave answered it (the body after the header)."""
    return wire.command(wire.CC_CONTEXT_LOAD, context)


def flush_context(handle: int) -> bytes:
    return wire.command(wire.CC_FLUSH_CONTEXT, wire.u32(handle))


class TpmError(RuntimeError):
    """A command answered with a nonzero response code (or a broken response)."""


def name(cmd: bytes) -> str:
    cc = wire.be32(cmd, 6)
    return NAMES.get(cc, f"command 0x{cc:x}")


def retry(rsp: bytes) -> bool:
    """Whether the TPM asks for the command again (TPM_RC_RETRY, TPM_RC_TESTING), as the
    kernel's tpm_transmit() and tpm2-tss resend (swtpm answers a first Sign with RETRY while it
    tests the algorithm)."""
    return len(rsp) >= wire.TPM_HEADER_SIZE and wire.be32(rsp, 6) in (wire.RC_RETRY, wire.RC_TESTING)


def check(cmd: bytes, rsp: bytes) -> bytes:
    """``rsp``, or TpmError unless it is one whole response with response code 0."""
    if len(rsp) < wire.TPM_HEADER_SIZE or len(rsp) != wire.be32(rsp, 2):
        raise TpmError(f"{name(cmd)}: a broken response of {len(rsp)} bytes")
    rc = wire.be32(rsp, 6)
    if rc:
        raise TpmError(f"{name(cmd)}: response code 0x{rc:03x}")
    return rsp
