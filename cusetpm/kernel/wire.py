# SPDX-License-Identifier: GPL-2.0-only
"""TPM 2.0 wire constants and byte helpers.

Follows include/linux/tpm.h and drivers/char/tpm/tpm.h for the constants the kernel uses.
Values come from tpm2-pytss; they are turned into plain ints once here because the command
path compares them for every command.
"""

from __future__ import annotations

import struct

from tpm2_pytss.constants import TPM2_CAP, TPM2_CC, TPM2_HR, TPM2_HT, TPM2_PT, TPM2_RC, TPM2_ST, TPMA_CC

TPM_BUFSIZE = 4096
TPM_HEADER_SIZE = 10
TPM2_SPACE_BUFFER_SIZE = 16384

ST_NO_SESSIONS = int(TPM2_ST.NO_SESSIONS)

CC_FIRST = int(TPM2_CC.FIRST)
CC_SELF_TEST = int(TPM2_CC.SelfTest)
CC_STARTUP = int(TPM2_CC.Startup)
CC_CONTEXT_LOAD = int(TPM2_CC.ContextLoad)
CC_CONTEXT_SAVE = int(TPM2_CC.ContextSave)
CC_FLUSH_CONTEXT = int(TPM2_CC.FlushContext)
CC_GET_CAPABILITY = int(TPM2_CC.GetCapability)
CC_GET_RANDOM = int(TPM2_CC.GetRandom)

RC_SUCCESS = int(TPM2_RC.SUCCESS)
RC_INITIALIZE = int(TPM2_RC.INITIALIZE)
RC_FAILURE = int(TPM2_RC.FAILURE)
RC_UPGRADE = int(TPM2_RC.UPGRADE)
RC_COMMAND_CODE = int(TPM2_RC.COMMAND_CODE)
RC_HANDLE = int(TPM2_RC.HANDLE)
RC_INTEGRITY = int(TPM2_RC.INTEGRITY)
RC_RETRY = int(TPM2_RC.RETRY)
RC_TESTING = int(TPM2_RC.TESTING)
RC_REFERENCE_H0 = int(TPM2_RC.REFERENCE_H0)
#: TSS2_RESMGR_TPM_RC_LAYER: the layer the kernel RM puts into the rc it synthesizes.
RC_RESMGR_TPM_LAYER = 11 << 16

CAP_HANDLES = int(TPM2_CAP.HANDLES)
CAP_COMMANDS = int(TPM2_CAP.COMMANDS)
CAP_TPM_PROPERTIES = int(TPM2_CAP.TPM_PROPERTIES)
PT_TOTAL_COMMANDS = int(TPM2_PT.TOTAL_COMMANDS)

HT_HMAC_SESSION = int(TPM2_HT.HMAC_SESSION) << 24
HT_POLICY_SESSION = int(TPM2_HT.POLICY_SESSION) << 24
HT_TRANSIENT = int(TPM2_HT.TRANSIENT) << 24
#: The handle-type byte of a handle (TPM_HR_RANGE_MASK, 0xFF000000).
HR_RANGE_MASK = int(TPM2_HR.RANGE_MASK)
#: The index part of a handle (TPM_HR_HANDLE_MASK).
HR_HANDLE_MASK = int(TPM2_HR.HANDLE_MASK)

#: TPMA_CC bit positions the kernel reads (include/linux/tpm.h enum tpm2_cc_attrs: 25, 28, 29).
CC_ATTR_CHANDLES = int(TPMA_CC.CHANDLES_SHIFT)
CC_ATTR_RHANDLE = int(TPMA_CC.RHANDLE).bit_length() - 1
CC_ATTR_VENDOR = int(TPMA_CC.V).bit_length() - 1
#: TPMA_CC commandIndex (the command code's low 16 bits) and the vendor bit.
CC_INDEX_MASK = int(TPMA_CC.COMMANDINDEX_MASK)
CC_VENDOR = int(TPMA_CC.V)
#: A format-1 response code (bit 7) and its parameter bit (bit 6): tpm2_rc_value()'s masks.
RC_FMT1 = int(TPM2_RC.FMT1)
RC_P = int(TPM2_RC.P)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HEADER = struct.Struct(">HII")


def be32(buf: bytes | bytearray, offset: int) -> int:
    """Read a big-endian u32 the way ``be32_to_cpup`` does (the buffer is always long enough)."""
    return _U32.unpack_from(buf, offset)[0]


def put_be32(buf: bytearray, offset: int, value: int) -> None:
    _U32.pack_into(buf, offset, value & 0xFFFFFFFF)


def be16(buf: bytes | bytearray, offset: int) -> int:
    return _U16.unpack_from(buf, offset)[0]


def command(cc: int, body: bytes = b"", tag: int = ST_NO_SESSIONS) -> bytes:
    """Build a command as ``tpm_buf_init`` + ``tpm_buf_append`` would."""
    return _HEADER.pack(tag, TPM_HEADER_SIZE + len(body), cc) + body


def u32(value: int) -> bytes:
    return _U32.pack(value & 0xFFFFFFFF)
