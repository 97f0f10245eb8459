# SPDX-License-Identifier: GPL-2.0-only
"""Reading commands and responses the way strict accounting needs, and editing a file's saved
sessions.  Bytes only, never trusting a length: a malformed command is the TPM's to refuse,
so a parse that runs out of bytes just stops."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tpm2_pytss.constants import TPM2_ST

from ..kernel import wire
from ..kernel.structs import NR_SLOTS, Chip, Space
from ..kernel.tpm2_cmd import find_cc
from ..kernel.tpm2_space import CONTEXT_HEADER_SIZE
from ..kernel.wire import be16, be32

ST_SESSIONS = int(TPM2_ST.SESSIONS)
_U64 = struct.Struct(">Q")


@dataclass
class Command:
    """What a user command names: its code, handle area and authorization sessions."""

    cc: int
    tag: int
    handles: list[int] = field(default_factory=list)
    #: (handle, sessionAttributes) of each authorization, in order.
    sessions: list[tuple[int, int]] = field(default_factory=list)


def _nr_handles(chip: Chip, cc: int) -> int:
    i = find_cc(chip, cc)
    return 0 if i < 0 else (chip.cc_attrs_tbl[i] >> wire.CC_ATTR_CHANDLES) & 0x7


def has_rhandle(chip: Chip, cc: int) -> bool:
    i = find_cc(chip, cc)
    return i >= 0 and bool((chip.cc_attrs_tbl[i] >> wire.CC_ATTR_RHANDLE) & 1)


def parse_command(chip: Chip, buf: bytes | bytearray, length: int) -> Command | None:
    """The command in ``buf[:length]``; None if it has no whole header."""
    if length < wire.TPM_HEADER_SIZE:
        return None
    tag, cc = be16(buf, 0), be32(buf, 6)
    cmd = Command(cc, tag)
    offset = wire.TPM_HEADER_SIZE
    for _ in range(_nr_handles(chip, cc)):
        if offset + 4 > length:
            return cmd
        cmd.handles.append(be32(buf, offset))
        offset += 4
    if tag != ST_SESSIONS or offset + 4 > length:
        return cmd
    end = min(offset + 4 + be32(buf, offset), length)
    offset += 4
    while offset + 4 + 2 <= end:
        handle = be32(buf, offset)
        offset += 4
        offset += 2 + be16(buf, offset)  # nonceCaller
        if offset + 1 > end:
            break
        attrs = buf[offset]
        offset += 1
        if offset + 2 > end:
            break
        offset += 2 + be16(buf, offset)  # hmac
        cmd.sessions.append((handle, attrs))
    return cmd


def response_session_attrs(chip: Chip, cc: int, buf: bytes | bytearray, length: int) -> list[int]:
    """sessionAttributes of each entry of a successful response's authorization area."""
    if length < wire.TPM_HEADER_SIZE or be16(buf, 0) != ST_SESSIONS:
        return []
    offset = wire.TPM_HEADER_SIZE + (4 if has_rhandle(chip, cc) else 0)
    if offset + 4 > length:
        return []
    offset += 4 + be32(buf, offset)  # parameterSize, parameters
    out = []
    while offset + 2 <= length:
        offset += 2 + be16(buf, offset)  # nonceTPM
        if offset + 1 > length:
            break
        out.append(buf[offset])
        offset += 1
        if offset + 2 > length:
            break
        offset += 2 + be16(buf, offset)  # hmac
    return out


def context_sequence(blob: bytes) -> int:
    """TPMS_CONTEXT.sequence: what the context gap is measured in."""
    return _U64.unpack_from(blob)[0] if len(blob) >= 8 else 0


def context_handle(buf: bytes | bytearray, offset: int = wire.TPM_HEADER_SIZE) -> int:
    """TPMS_CONTEXT.savedHandle of the context at ``offset`` (a ContextLoad's parameter)."""
    return be32(buf, offset + 8) if len(buf) >= offset + 12 else 0


def _blobs(space: Space) -> list[tuple[int, int, int]]:
    """(slot, offset, size) of each saved session in the file's buffer, in slot order."""
    out, offset = [], 0
    for i in range(NR_SLOTS):
        if space.session_tbl[i]:
            size = CONTEXT_HEADER_SIZE + be16(space.session_buf, offset + 16)
            out.append((i, offset, size))
            offset += size
    return out


def session_blob(space: Space, handle: int) -> bytes | None:
    """The context the RM holds for ``handle`` in this file's buffer."""
    for i, offset, size in _blobs(space):
        if space.session_tbl[i] == handle:
            return bytes(space.session_buf[offset : offset + size])
    return None


def replace_session_blob(space: Space, handle: int, blob: bytes) -> bool:
    """Put a refreshed context in place of ``handle``'s."""
    for i, offset, size in _blobs(space):
        if space.session_tbl[i] == handle:
            data = bytes(space.session_buf[:offset]) + blob + bytes(space.session_buf[offset + size :])
            space.session_buf[:] = data[: wire.TPM2_SPACE_BUFFER_SIZE]
            return True
    return False


def drop_session(space: Space, handle: int) -> bool:
    """Take ``handle`` out of the file's table and its context out of the buffer, so the
    file's next command neither loads it nor shifts the other contexts (kernel: U6)."""
    for i, offset, size in _blobs(space):
        if space.session_tbl[i] == handle:
            rest = bytes(space.session_buf[offset + size :])
            space.session_buf[offset:] = rest + bytes(size)
            space.session_tbl[i] = 0
            return True
    return False


def rm_answer(buf: bytearray, rc: int) -> int:
    """A response the RM layer gives itself, nothing sent: a bare header."""
    buf[: wire.TPM_HEADER_SIZE] = wire.command(rc)
    return wire.TPM_HEADER_SIZE
