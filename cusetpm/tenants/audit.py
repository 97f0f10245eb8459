# SPDX-License-Identifier: GPL-2.0-only
"""The audit trail of tenant nodes: who sent which command through which node, what the
node's rules decided, and what the client got back.

One :class:`Entry` per command feeds two sinks:

* :class:`AuditLog`: one JSON line per command (:func:`entry_json`), for people and log
  shippers.  It carries no command or response bytes at all.
* :class:`PcapngWriter`: the commands and responses themselves as a pcapng capture that
  Wireshark's TPM 2.0 dissector decodes, for looking into one exchange byte by byte.  Redacted
  by default (:func:`redact_command`, :func:`redact_response`: same length, secret bytes
  zeroed), so a capture can be handed around without the passwords and keys in it.

Nothing here raises on what a client wrote: a command or response that does not parse is
redacted wholesale after its header, never passed through.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Sequence, Union, get_args, get_origin

from tpm2_pytss.command_parser import (
    TPM_ENCRYPTED_PARAMETER,
    read_command,
    read_response,
    tpm2_command,
    tpm2_response,
)
from tpm2_pytss.constants import TPM2_CC

from .pcapng import MAX_PAYLOAD, TcpCapture

HEADER_SIZE = 10
ST_NO_SESSIONS = 0x8001
ST_SESSIONS = 0x8002
_ATTR_DECRYPT = 0x20  # TPMA_SESSION.DECRYPT: the command's first parameter is ciphertext
_ATTR_ENCRYPT = 0x40  # TPMA_SESSION.ENCRYPT: the response's first parameter is ciphertext

_HEADER = struct.Struct(">HII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Entry:
    """One command through a tenant node, as the audit trail records it."""

    time: float  # time.time() when the client's write() arrived
    node: str  # the node's name
    uid: int
    gid: int
    pid: int
    comm: str  # the opener's command name (/proc/PID/comm at open; "" if unknown)
    command: bytes  # the command as the client wrote it (virtual handles)
    response: bytes  # what the client got (b"" when write() failed)
    errno: str | None  # the errno name write() failed with, e.g. "EINVAL", else None
    decision: str  # "allowed", or "refused:<rule>" (e.g. "refused:deny", "refused:nv")
    duration: float  # seconds from write() to the response being ready
    backend_commands: int  # commands the daemon sent to the TPM for this one
    stream: int = 0  # which open file of the node (a per-node counter): its TCP stream in a capture


# --- names and handles ---------------------------------------------------------------------


@functools.cache
def _cc_names() -> dict[int, str]:
    """Code to TPM2_CC member name; of two names for one code the first defined wins (HMAC
    over MAC), and the range markers FIRST/LAST are no command's name."""
    names: dict[int, str] = {}
    for name, value in vars(TPM2_CC).items():
        if isinstance(value, int) and not name.startswith("_") and name not in ("FIRST", "LAST"):
            names.setdefault(int(value), name)
    return names


def command_name(cc: int) -> str:
    """``"NV_Read"`` for 0x14e: the TPM2_CC member name as tpm2-pytss spells it, or
    ``"0x%08x"`` for a code it does not know (a vendor's)."""
    return _cc_names().get(cc, f"0x{cc:08x}")


@functools.lru_cache(maxsize=512)
def _num_handles(cc: int) -> int:
    try:
        return int(tpm2_command.lookup_command_class(TPM2_CC(cc)).num_handles())
    except Exception:  # a code tpm2-pytss does not know: no handle area we can name
        return 0


def command_handles(command: bytes) -> list[int]:
    """The handle area of a command by tpm2-pytss's command tables (only the handles that are
    there if it is short; none for an unknown code)."""
    if len(command) < HEADER_SIZE:
        return []
    n = _num_handles(_U32.unpack_from(command, 6)[0])
    return [_U32.unpack_from(command, 10 + 4 * i)[0] for i in range(n) if 14 + 4 * i <= len(command)]


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_json(entry: Entry) -> str:
    """One JSON line (no newline): time (RFC 3339 UTC with microseconds) and time_unix, node,
    stream, uid, gid, pid, comm, cc (the TPM2_CC name, "0x%08x" if unknown, null for a write
    shorter than a header), handles ("0x%08x" each), rc ("0x%08x" of the response, null if
    none), errno, decision, duration_us, backend_commands.

    No command or response bytes: the line is safe to ship wherever logs go."""
    cmd, rsp = entry.command, entry.response
    cc = _U32.unpack_from(cmd, 6)[0] if len(cmd) >= HEADER_SIZE else None
    record = {
        "time": _rfc3339(entry.time),
        "time_unix": entry.time,
        "node": entry.node,
        "stream": entry.stream,
        "uid": entry.uid,
        "gid": entry.gid,
        "pid": entry.pid,
        "comm": entry.comm,
        "cc": None if cc is None else command_name(cc),
        "handles": [f"0x{h:08x}" for h in command_handles(cmd)],
        "rc": f"0x{_U32.unpack_from(rsp, 6)[0]:08x}" if len(rsp) >= HEADER_SIZE else None,
        "errno": entry.errno,
        "decision": entry.decision,
        "duration_us": int(round(entry.duration * 1e6)),
        "backend_commands": entry.backend_commands,
    }
    # ensure_ascii: a comm read with surrogateescape still makes a line any UTF-8 sink takes.
    return json.dumps(record)


# --- redaction -----------------------------------------------------------------------------

_CC = TPM2_CC


def _table(*groups: tuple[tuple[Any, ...], tuple[int, ...]]) -> dict[int, tuple[int, ...]]:
    return {int(cc): indices for ccs, indices in groups for cc in ccs}


#: Command parameters whose contents are zeroed (a TPM2B each: its size stays), by command
#: code: the parameters' indices in tpm2-pytss's tables.  The why is in :func:`redact_command`.
COMMAND_SECRETS = _table(
    ((_CC.Create, _CC.CreatePrimary, _CC.CreateLoaded, _CC.HierarchyChangeAuth, _CC.ObjectChangeAuth,
      _CC.NV_ChangeAuth, _CC.NV_DefineSpace, _CC.PCR_SetAuthValue, _CC.HMAC_Start, _CC.HashSequenceStart,
      _CC.LoadExternal, _CC.Duplicate, _CC.MakeCredential, _CC.NV_Write, _CC.SequenceUpdate,
      _CC.SequenceComplete, _CC.EventSequenceComplete, _CC.Hash, _CC.HMAC, _CC.EncryptDecrypt2,
      _CC.RSA_Encrypt, _CC.ECC_Encrypt, _CC.StirRandom, _CC.AC_Send), (0,)),
    ((_CC.Import,), (0, 2)),
    ((_CC.EncryptDecrypt,), (3,)),
)  # fmt: skip

#: Response parameters zeroed, likewise (:func:`redact_response`).
RESPONSE_SECRETS = _table(
    ((_CC.Unseal, _CC.NV_Read, _CC.GetRandom, _CC.ActivateCredential, _CC.RSA_Decrypt, _CC.ECC_Decrypt,
      _CC.ECDH_ZGen, _CC.ECDH_KeyGen, _CC.EncryptDecrypt, _CC.EncryptDecrypt2, _CC.HMAC,
      _CC.SequenceComplete), (0,)),
    ((_CC.Duplicate, _CC.ZGen_2Phase), (0, 1)),
)  # fmt: skip


class _Malformed(Exception):
    """The bytes do not have the layout their header and the command tables say."""


def _need(end: int, off: int, n: int) -> None:
    if n < 0 or off + n > end:
        raise _Malformed


def _tpm2b_end(data: bytes, off: int, end: int) -> int:
    """Where the TPM2B at ``off`` ends (its 2-byte size plus that many bytes)."""
    _need(end, off, 2)
    stop = off + 2 + _U16.unpack_from(data, off)[0]
    _need(end, off, stop - off)
    return stop


def _parameters(data: bytes, off: int, end: int, types: Sequence[Any], ciphertext: bool) -> list[tuple[int, int]]:
    """The byte range of each parameter, which must fill [off, end) exactly.

    A TPM2B is measured by its size field alone (exactly what the TPM does with it, whatever
    its inside holds); any other type by tpm2-pytss's unmarshal.  The first parameter, when a
    session encrypts it, is a bare TPM2B of ciphertext (the parser's TPM_ENCRYPTED_PARAMETER)."""
    spans = []
    for i, typ in enumerate(types):
        if get_origin(typ) is Union:
            if i == 0 and ciphertext:
                typ = None
            else:
                typ = next(a for a in get_args(typ) if get_origin(a) is not TPM_ENCRYPTED_PARAMETER)
        if typ is None or typ.__name__.startswith("TPM2B_"):
            stop = _tpm2b_end(data, off, end)
        else:
            _, n = typ.unmarshal(data[off:end])
            _need(end, off, int(n))
            stop = off + int(n)
        spans.append((off, stop))
        off = stop
    if off != end:
        raise _Malformed  # bytes no parameter accounts for
    return spans


def _sessions(data: bytes, off: int, end: int, command: bool) -> tuple[list[tuple[int, int]], int]:
    """Walk an authorization area [off, end): the hmac/password contents to zero, and the OR of
    the sessions' attributes.  A command's session starts with its handle; a response's not."""
    secrets = []
    attrs = 0
    while off < end:
        if command:
            _need(end, off, 4)
            off += 4
        off = _tpm2b_end(data, off, end)  # nonce
        _need(end, off, 1)
        attrs |= data[off]
        off += 1
        stop = _tpm2b_end(data, off, end)  # hmac, or a password session's password
        secrets.append((off + 2, stop))
        off = stop
    return secrets, attrs


def _command_secrets(data: bytes) -> list[tuple[int, int]]:
    if len(data) < HEADER_SIZE:
        raise _Malformed
    tag, size, cc = _HEADER.unpack_from(data)
    if size != len(data) or tag not in (ST_NO_SESSIONS, ST_SESSIONS):
        raise _Malformed
    layout = tpm2_command.lookup_command_class(TPM2_CC(cc))  # raises for an unknown code
    read_command(io.BytesIO(data))  # tpm2-pytss must take it too
    off = HEADER_SIZE + 4 * int(layout.num_handles())
    _need(len(data), off, 0)
    secrets: list[tuple[int, int]] = []
    attrs = 0
    if tag == ST_SESSIONS:
        _need(len(data), off, 4)
        area = _U32.unpack_from(data, off)[0]
        off += 4
        _need(len(data), off, area)
        secrets, attrs = _sessions(data, off, off + area, command=True)
        off += area
    params = _parameters(data, off, len(data), layout.parameter_types(), bool(attrs & _ATTR_DECRYPT))
    for i in COMMAND_SECRETS.get(cc, ()):
        start, stop = params[i]
        secrets.append((start + 2, stop))
    return secrets


def _response_secrets(cc: int, data: bytes) -> list[tuple[int, int]]:
    if len(data) < HEADER_SIZE:
        raise _Malformed
    tag, size, rc = _HEADER.unpack_from(data)
    if size != len(data) or tag not in (ST_NO_SESSIONS, ST_SESSIONS):
        raise _Malformed
    if rc != 0:
        if len(data) != HEADER_SIZE:
            raise _Malformed  # an error response is its header alone
        return []
    layout = tpm2_response.lookup_response_class(TPM2_CC(cc))
    handle_end = HEADER_SIZE + (4 if layout.has_handle() else 0)
    _need(len(data), handle_end, 0)
    secrets: list[tuple[int, int]] = []
    off, end, attrs = handle_end, len(data), 0
    if tag == ST_SESSIONS:
        _need(len(data), off, 4)
        param_size = _U32.unpack_from(data, off)[0]
        off += 4
        _need(len(data), off, param_size)
        end = off + param_size
        secrets, attrs = _sessions(data, end, len(data), command=False)
    ciphertext = bool(attrs & _ATTR_ENCRYPT)
    if not ciphertext:
        # tpm2-pytss 3.0's read_response expects a size field before the response sessions
        # (responses have none), so it is given the response without them: header, handle,
        # parameters, as a NO_SESSIONS response has them.  Ciphertext it cannot check.
        plain = data[HEADER_SIZE:handle_end] + data[off:end]
        read_response(io.BytesIO(_HEADER.pack(ST_NO_SESSIONS, HEADER_SIZE + len(plain), 0) + plain), TPM2_CC(cc))
    params = _parameters(data, off, end, layout.parameter_types(), ciphertext)
    for i in RESPONSE_SECRETS.get(cc, ()):
        start, stop = params[i]
        secrets.append((start + 2, stop))
    return secrets


def _zeroed(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for start, stop in spans:
        out[start:stop] = bytes(stop - start)
    return bytes(out)


def _wholesale(data: bytes) -> bytes:
    return data[:HEADER_SIZE] + bytes(max(0, len(data) - HEADER_SIZE))


def redact_command(data: bytes) -> bytes:
    """The command, same length, with its secrets zeroed; the header, the handle area, session
    handles, nonces and attributes, and all size fields stay as they were.

    Zeroed: the hmac (a password session's password) of every session in the authorization
    area, and these parameters' contents (:data:`COMMAND_SECRETS`):

    ===========================================  ==============================================
    Create, CreatePrimary, CreateLoaded          inSensitive (TPM2B_SENSITIVE_CREATE)
    HierarchyChangeAuth, ObjectChangeAuth,       newAuth
    NV_ChangeAuth
    NV_DefineSpace                               auth
    PCR_SetAuthValue                             auth
    HMAC_Start (MAC_Start), HashSequenceStart    auth
    LoadExternal                                 inPrivate (TPM2B_SENSITIVE)
    Import                                       encryptionKey, duplicate
    Duplicate                                    encryptionKeyIn
    MakeCredential                               credential
    NV_Write                                     data
    SequenceUpdate, SequenceComplete,            buffer
    EventSequenceComplete
    Hash                                         data
    HMAC (MAC)                                   buffer
    EncryptDecrypt, EncryptDecrypt2              inData
    RSA_Encrypt, ECC_Encrypt                     the plaintext
    StirRandom                                   inData
    AC_Send                                      acDataIn
    ===========================================  ==============================================

    Kept on purpose: PolicySecret's and PolicySigned's parameters (nonceTPM, cpHashA,
    policyRef, expiration, a signature: PolicySecret's secret is the authorization of its
    authHandle, zeroed with the sessions); StartAuthSession's encryptedSalt, Import's
    inSymSeed, ActivateCredential's blobs (encrypted to a TPM key); Load's and Rewrap's
    private areas (wrapped by the parent); ContextLoad's blob (encrypted by the TPM);
    NV_Extend, PCR_Extend and PCR_Event data (measurements).

    A first parameter that a decrypt session made ciphertext is zeroed too when listed.  A
    command that does not parse (short, its size field not its length, an unknown tag or
    code, tpm2-pytss's parser refusing it, any area overrunning or not filled exactly) is
    zeroed wholesale after its 10-byte header.  Never raises."""
    try:
        raw = bytes(data)
    except Exception:
        return b""
    try:
        return _zeroed(raw, _command_secrets(raw))
    except Exception:
        return _wholesale(raw)


def redact_response(cc: int, data: bytes) -> bytes:
    """The response to command code ``cc``, same length, with its secrets zeroed: the hmac of
    every response session, and these parameters' contents (:data:`RESPONSE_SECRETS`):

    ===========================================  ==============================================
    Unseal                                       outData
    NV_Read                                      data
    GetRandom                                    randomBytes
    Duplicate                                    encryptionKeyOut, duplicate
    ActivateCredential                           certInfo
    RSA_Decrypt, ECC_Decrypt                     the plaintext
    ECDH_ZGen                                    outPoint
    ECDH_KeyGen                                  zPoint (pubPoint stays)
    ZGen_2Phase                                  outZ1, outZ2
    EncryptDecrypt, EncryptDecrypt2              outData
    HMAC (MAC)                                   outHMAC
    SequenceComplete                             result (an HMAC for an HMAC sequence)
    ===========================================  ==============================================

    Kept on purpose: Create's, CreateLoaded's, ObjectChangeAuth's, Import's and Rewrap's
    private areas (wrapped by the parent's storage key: the blob tools store on disk anyway),
    ContextSave's blob (encrypted by the TPM), digests of unkeyed hashes, tickets, public
    areas, names.

    An error response (rc != 0) is its header alone and stays; anything that does not parse is
    zeroed wholesale after the header, as in :func:`redact_command`.  Never raises."""
    try:
        raw = bytes(data)
    except Exception:
        return b""
    try:
        return _zeroed(raw, _response_secrets(int(cc), raw))
    except Exception:
        return _wholesale(raw)


# --- the JSON lines ------------------------------------------------------------------------


class AuditLog:
    """JSON lines to a file (appended, line-buffered) or to stdout for "-".

    Appending with O_APPEND keeps every line whole even with two daemons on one file; the file
    is created owner-only (0600) since it names who uses the TPM for what."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._closed = False
        self._open()

    def _open(self) -> None:
        if self.path == "-":
            self._file = sys.stdout
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def write(self, entry: Entry) -> None:
        """One line for one command; OSError (a full disk) is the caller's to handle."""
        if self._closed or self._file is None:
            raise ValueError("write to a closed AuditLog")
        self._file.write(entry_json(entry) + "\n")
        if self._file is sys.stdout:
            self._file.flush()  # stdout to a pipe is block-buffered

    def reopen(self) -> None:
        """SIGHUP / log rotation: close and reopen the path, so lines go to the new file once
        logrotate has renamed the old one."""
        if self._closed:
            raise ValueError("reopen of a closed AuditLog")
        self._close_file()
        self._open()

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        if f is sys.stdout:
            f.flush()
        else:
            f.close()

    def close(self) -> None:
        """Close the file (stdout is flushed and left open); idempotent."""
        if not self._closed:
            self._closed = True
            self._close_file()


# --- the capture ---------------------------------------------------------------------------

#: The TPM simulator's command port, one of the two (2321-2322) Wireshark's TPM 2.0 dissector
#: is registered on.  It takes each TCP segment of 10 bytes or more as one raw TPM command or
#: response (no simulator framing, no reassembly), and tells them apart by direction: source
#: port above destination port is a request, so the client side has an ephemeral port.
TPM_PORT = 2321


class PcapngWriter:
    """The raw commands and responses as a pcapng capture that Wireshark's TPM 2.0 dissector
    decodes: `tshark -r FILE -Y tpm -T fields -e tpm.req.cc` lists the command codes.

    Each open file (Entry.stream) is one TCP connection to 127.0.0.1:2321 (:mod:`.pcapng`), a
    command one segment and its response the next; each command frame's comment names the
    node, the opener and the decision (``frame.comment``).  A command and its response are
    written together when the entry is, so the file is in completion order: the dissector pairs
    a response with the command just before it in the file, whatever the connection.  Redacted
    (:func:`redact_command`, :func:`redact_response`) unless ``redact=False``."""

    def __init__(self, path: str, redact: bool = True) -> None:
        self.path = path
        self.redact = redact
        self._capture = TcpCapture(path, TPM_PORT)

    def write(self, entry: Entry) -> None:
        """The command packet at entry.time, the response at entry.time+entry.duration (none
        when write() failed)."""
        command, response = entry.command, entry.response
        if self.redact:
            cc = _U32.unpack_from(command, 6)[0] if len(command) >= HEADER_SIZE else 0
            command, response = redact_command(command), redact_response(cc, response)
        note = f"{entry.node} uid={entry.uid} gid={entry.gid} pid={entry.pid} comm={entry.comm} {entry.decision}"
        if entry.errno:
            note += f" errno={entry.errno}"
        if len(command) > MAX_PAYLOAD:
            # Every segment is a PDU to the dissector, so a write longer than one packet (never
            # a command a TPM takes) is cut to one, and the comment says so.
            note += f" truncated={len(command)}"
            command = command[:MAX_PAYLOAD]
        end = entry.time + entry.duration
        self._capture.exchange(entry.stream, command, entry.time, response[:MAX_PAYLOAD], end, note)

    def end_stream(self, stream: int, when: float) -> None:
        """The file was closed: its connection's FIN exchange (a later entry for the same stream
        starts a new connection)."""
        self._capture.finish(stream, when)

    def close(self) -> None:
        """Close the file (stdout is flushed and left open); idempotent."""
        self._capture.close()
