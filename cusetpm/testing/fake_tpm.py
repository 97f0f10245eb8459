# SPDX-License-Identifier: GPL-2.0-only
"""A small fake TPM in pure Python, for byte-level tests of the port without swtpm.

:meth:`FakeTpm.transport` answers a :class:`~cusetpm.kernel.request.Send` the way a TPM
would for the few commands the resource manager's rules need: SelfTest, Startup,
GetCapability (TPM_PROPERTIES, COMMANDS, HANDLES), GetRandom, CreatePrimary,
StartAuthSession, PolicyGetDigest, ReadPublic, ContextSave, ContextLoad and FlushContext.  Everything else is
TPM_RC_COMMAND_CODE.  It is no TPM: there is no cryptography, a context blob is an opaque
token into the fake's own table, and CreatePrimary returns a minimal body.  What it keeps
faithfully is the handle bookkeeping the kernel depends on:

* transient objects get fresh handles ``0x80000000 + n``; at most ``max_objects`` are loaded
  (TPM_RC_OBJECT_MEMORY), ContextSave leaves an object loaded, ContextLoad of its blob loads
  a copy under a fresh handle, any number of times;
* sessions get ``0x02000000 + n`` (HMAC) or ``0x03000000 + n`` (policy, trial); at most
  ``max_sessions`` exist (TPM_RC_SESSION_MEMORY); ContextSave of a session unloads it,
  ContextLoad gives it back the same handle, once per save (a replayed blob is TPM_RC_HANDLE);
* ContextSave of a handle that is not loaded is TPM_RC_REFERENCE_H0, as is a command whose
  handle area names an object or session that is not loaded;
* optionally (``max_loaded_sessions``) at most that many sessions are loaded at once
  (TPM_RC_SESSION_MEMORY), as swtpm's 3;
* optionally (``max_active``) at most that many sessions exist, loaded or saved, and the next
  StartAuthSession is TPM_RC_SESSION_HANDLES, as swtpm's 64; with ``reuse_handles`` a new
  session gets the lowest free index, as swtpm does;
* an authorization area's HMAC/policy sessions must be loaded (TPM_RC_REFERENCE_S0 + i); each
  is answered with its continueSession bit, and one that has it clear is flushed when the
  command succeeds (no HMAC is checked);
* optionally (``context_gap``) the context gap: a session ContextSave too far ahead of the
  oldest saved session is TPM_RC_CONTEXT_GAP; loading that oldest one and saving it again
  (regapping) cures it;
* before Startup every command but Startup is TPM_RC_INITIALIZE.

``ccs`` records the command code of every command received, ``commands`` the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tpm2_pytss.constants import (
    TPM2_CAP,
    TPM2_CC,
    TPM2_HT,
    TPM2_PT,
    TPM2_PT_HR,
    TPM2_RC,
    TPM2_SE,
    TPM2_ST,
    TPMA_CC,
    TPMA_SESSION,
)

from cusetpm.kernel.request import Io, Send, T, run_sync

HR_SHIFT = 24
HR_TRANSIENT = int(TPM2_HT.TRANSIENT) << HR_SHIFT
HR_HMAC_SESSION = int(TPM2_HT.HMAC_SESSION) << HR_SHIFT
HR_POLICY_SESSION = int(TPM2_HT.POLICY_SESSION) << HR_SHIFT
HR_PERMANENT = int(TPM2_HT.PERMANENT) << HR_SHIFT

ST_NO_SESSIONS = int(TPM2_ST.NO_SESSIONS)
ST_SESSIONS = int(TPM2_ST.SESSIONS)


def _attrs(cc: TPM2_CC, handles: int = 0, rhandle: bool = False, flags: int = 0) -> int:
    """A TPMA_CC: command index, cHandles, rHandle and other flag bits."""
    value = int(cc) & int(TPMA_CC.COMMANDINDEX_MASK)
    value |= handles << int(TPMA_CC.CHANDLES_SHIFT)
    if rhandle:
        value |= int(TPMA_CC.RHANDLE)
    return value | flags


#: TPMA_CC of every command the fake implements, as a TPM reports them (ascending order).
COMMAND_ATTRS: dict[int, int] = {
    int(cc): attrs
    for cc, attrs in sorted(
        {
            TPM2_CC.CreatePrimary: _attrs(TPM2_CC.CreatePrimary, 1, True),
            TPM2_CC.SelfTest: _attrs(TPM2_CC.SelfTest, flags=int(TPMA_CC.EXTENSIVE)),
            TPM2_CC.Startup: _attrs(TPM2_CC.Startup, flags=int(TPMA_CC.NV)),
            TPM2_CC.ContextLoad: _attrs(TPM2_CC.ContextLoad, 0, True),
            TPM2_CC.ContextSave: _attrs(TPM2_CC.ContextSave, 1),
            TPM2_CC.FlushContext: _attrs(TPM2_CC.FlushContext),
            TPM2_CC.ReadPublic: _attrs(TPM2_CC.ReadPublic, 1),
            TPM2_CC.StartAuthSession: _attrs(TPM2_CC.StartAuthSession, 2, True),
            TPM2_CC.PolicyGetDigest: _attrs(TPM2_CC.PolicyGetDigest, 1),
            TPM2_CC.GetCapability: _attrs(TPM2_CC.GetCapability),
            TPM2_CC.GetRandom: _attrs(TPM2_CC.GetRandom),
        }.items()
    )
}

#: The TPM properties the fake reports.
PROPERTIES: dict[int, int] = {int(TPM2_PT.TOTAL_COMMANDS): len(COMMAND_ATTRS)}

#: TPMS_CONTEXT header: sequence(8) savedHandle(4) hierarchy(4), then a TPM2B blob.
_CONTEXT = struct.Struct(">QIIH")
_TOKEN = struct.Struct(">I")
_RH_NULL = 0x40000007


_RS_PW = 0x40000009
_CONTINUE = int(TPMA_SESSION.CONTINUESESSION)


def _is_session(handle: int) -> bool:
    return handle & 0xFF000000 in (HR_HMAC_SESSION, HR_POLICY_SESSION)


def _auth_area(area: bytes) -> list[tuple[int, int]]:
    """(sessionHandle, sessionAttributes) of each command authorization."""
    out, offset = [], 0
    while offset < len(area):
        (handle, nonce) = struct.unpack_from(">IH", area, offset)
        offset += 6 + nonce
        (attrs, hmac) = struct.unpack_from(">BH", area, offset)  # struct.error when short
        offset += 3 + hmac
        out.append((handle, attrs))
    return out


def response(rc: int, body: bytes = b"", tag: int = ST_NO_SESSIONS) -> bytes:
    return struct.pack(">HII", tag, 10 + len(body), rc) + body


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


class _Reply(Exception):
    """Raised by a handler to answer with an error rc."""

    def __init__(self, rc: int) -> None:
        self.rc = rc


@dataclass
class _Saved:
    """What a context blob stands for: an object, or a session and the save it came from."""

    handle: int
    is_session: bool
    generation: int = 0


@dataclass
class FakeTpm:
    """A fake TPM; see the module docstring.  Drive the port with :meth:`run`."""

    max_objects: int = 3
    max_sessions: int = 64
    #: TPM_PT_ACTIVE_SESSIONS_MAX: beyond it StartAuthSession is SESSION_HANDLES (None: no limit).
    max_active: int | None = None
    #: MAX_LOADED_SESSIONS: beyond it StartAuthSession and a session's ContextLoad are
    #: SESSION_MEMORY (swtpm: 3; None: no limit).
    max_loaded_sessions: int | None = None
    #: Give a new session the lowest free index (swtpm) instead of a fresh one.
    reuse_handles: bool = False
    #: TPM_PT_CONTEXT_GAP_MAX: a session ContextSave that would be more than this many
    #: session saves newer than the oldest saved session is TPM_RC_CONTEXT_GAP (None: never).
    context_gap: int | None = None
    #: False: a TPM just powered on, wanting Startup (as swtpm with --flags not-need-init).
    started: bool = False
    #: Command code of every command received (-1 for one too short to have one), in order.
    ccs: list[int] = field(default_factory=list)
    #: Every command received, as sent.
    commands: list[bytes] = field(default_factory=list)
    #: Loaded transient objects (handle -> the handle it was first created under).
    objects: dict[int, int] = field(default_factory=dict)
    #: Every live session: handle -> True if loaded, False if its context is saved.
    sessions: dict[int, bool] = field(default_factory=dict)
    _next_object: int = 0
    _next_session: int = 0
    _sequence: int = 0
    #: Session saves so far: the sequence of a session context (the TPM's contextCounter).
    _context_counter: int = 0
    #: Saved session -> the sequence of its one loadable context.
    _session_seq: dict[int, int] = field(default_factory=dict)
    _saved: list[_Saved] = field(default_factory=list)
    #: session handle -> generation of its one loadable saved context.
    _session_generation: dict[int, int] = field(default_factory=dict)

    # --- driving -------------------------------------------------------------------------

    def transport(self, req: Send) -> bytes | int:
        """The transport for :func:`cusetpm.kernel.request.run_sync`."""
        return self.execute(req.data)

    def run(self, gen: Io[T]) -> T:
        return run_sync(gen, self.transport)

    def loaded_sessions(self) -> list[int]:
        return sorted(h for h, loaded in self.sessions.items() if loaded)

    def saved_sessions(self) -> list[int]:
        return sorted(h for h, loaded in self.sessions.items() if not loaded)

    def execute(self, cmd: bytes) -> bytes:
        """One command in, one response out."""
        self.commands.append(bytes(cmd))
        if len(cmd) < 10:
            self.ccs.append(-1)
            return response(int(TPM2_RC.COMMAND_SIZE))
        tag, size, cc = struct.unpack_from(">HII", cmd)
        self.ccs.append(cc)
        if size != len(cmd):
            return response(int(TPM2_RC.COMMAND_SIZE))
        if tag not in (ST_NO_SESSIONS, ST_SESSIONS):
            return response(int(TPM2_RC.BAD_TAG))
        if cc not in COMMAND_ATTRS:
            return response(int(TPM2_RC.COMMAND_CODE))
        if not self.started and cc != TPM2_CC.Startup:
            return response(int(TPM2_RC.INITIALIZE))
        nr_handles = (COMMAND_ATTRS[cc] & int(TPMA_CC.CHANDLES_MASK)) >> int(TPMA_CC.CHANDLES_SHIFT)
        if len(cmd) < 10 + 4 * nr_handles:
            return response(int(TPM2_RC.INSUFFICIENT))
        handles = list(struct.unpack_from(f">{nr_handles}I", cmd, 10))
        params = cmd[10 + 4 * nr_handles :]
        auths: list[tuple[int, int]] = []
        try:
            if tag == ST_SESSIONS:  # the authorization area
                (auth_size,) = struct.unpack_from(">I", params)
                auths = _auth_area(params[4 : 4 + auth_size])
                params = params[4 + auth_size :]
            for k, h in enumerate(handles):
                if h & 0xFF000000 == HR_TRANSIENT and h not in self.objects:
                    raise _Reply(int(TPM2_RC.REFERENCE_H0) + k)
                if _is_session(h) and not self.sessions.get(h):
                    raise _Reply(int(TPM2_RC.REFERENCE_H0) + k)
            for k, (h, _) in enumerate(auths):
                if _is_session(h) and not self.sessions.get(h):
                    raise _Reply(int(TPM2_RC.REFERENCE_S0) + k)
            body = self._dispatch(cc, handles, params)
        except _Reply as reply:
            return response(reply.rc)
        except struct.error:
            return response(int(TPM2_RC.INSUFFICIENT))
        if tag == ST_SESSIONS:
            # parameterSize before the parameters, then one answer per session: a password
            # session always continues; an HMAC/policy session echoes its continueSession and
            # is flushed if that is clear.
            answers = b""
            for h, attrs in auths or [(_RS_PW, 1)]:
                if _is_session(h):
                    answers += b"\x00\x00" + bytes([attrs & _CONTINUE]) + b"\x00\x00"
                    if not attrs & _CONTINUE:
                        self.sessions.pop(h, None)
                        self._session_generation.pop(h, None)
                        self._session_seq.pop(h, None)
                else:
                    answers += b"\x00\x00\x01\x00\x00"
            handle_area, param_area = body
            return response(0, handle_area + _u32(len(param_area)) + param_area + answers, tag)
        return response(0, body[0] + body[1])

    # --- commands ------------------------------------------------------------------------

    def _dispatch(self, cc: int, handles: list[int], params: bytes) -> tuple[bytes, bytes]:
        """(response handle area, response parameters) of a command that succeeds."""
        if cc == TPM2_CC.Startup:
            if self.started:
                raise _Reply(int(TPM2_RC.INITIALIZE))
            self.started = True
            return b"", b""
        if cc == TPM2_CC.SelfTest:
            return b"", b""
        if cc == TPM2_CC.GetRandom:
            (n,) = struct.unpack_from(">H", params)
            n = min(n, 32)
            self._sequence += 1
            return b"", _tpm2b(bytes((self._sequence + i) & 0xFF for i in range(n)))
        if cc == TPM2_CC.GetCapability:
            return b"", self._get_capability(*struct.unpack_from(">III", params))
        if cc == TPM2_CC.CreatePrimary:
            if handles[0] & 0xFF000000 != HR_PERMANENT:
                raise _Reply(int(TPM2_RC.HIERARCHY) + int(TPM2_RC.H) + int(TPM2_RC.RC1))
            handle = self._new_object()
            self.objects[handle] = handle
            # outPublic, creationData, creationHash (empty), creationTicket, name (empty).
            ticket = struct.pack(">HI", int(TPM2_ST.CREATION), _RH_NULL) + _tpm2b(b"")
            return _u32(handle), _tpm2b(b"") * 3 + ticket + _tpm2b(b"")
        if cc == TPM2_CC.ReadPublic:
            return b"", _tpm2b(b"") * 3  # outPublic, name, qualifiedName
        if cc == TPM2_CC.StartAuthSession:
            return self._start_auth_session(params)
        if cc == TPM2_CC.PolicyGetDigest:
            if handles[0] & 0xFF000000 != HR_POLICY_SESSION:
                raise _Reply(int(TPM2_RC.TYPE) + int(TPM2_RC.H) + int(TPM2_RC.RC1))
            return b"", _tpm2b(bytes(32))
        if cc == TPM2_CC.ContextSave:
            return b"", self._context_save(handles[0])
        if cc == TPM2_CC.ContextLoad:
            return _u32(self._context_load(params)), b""
        if cc == TPM2_CC.FlushContext:
            (handle,) = struct.unpack_from(">I", params)
            if handle in self.objects:
                del self.objects[handle]
            elif handle in self.sessions:
                del self.sessions[handle]
                self._session_generation.pop(handle, None)
                self._session_seq.pop(handle, None)
            else:
                raise _Reply(int(TPM2_RC.HANDLE) + int(TPM2_RC.P) + int(TPM2_RC.RC1))
            return b"", b""
        raise _Reply(int(TPM2_RC.COMMAND_CODE))  # pragma: no cover - COMMAND_ATTRS is checked first

    def _new_object(self) -> int:
        if len(self.objects) >= self.max_objects:
            raise _Reply(int(TPM2_RC.OBJECT_MEMORY))
        handle = HR_TRANSIENT + self._next_object
        self._next_object += 1
        return handle

    def _sessions_full(self) -> bool:
        limit = self.max_loaded_sessions
        return limit is not None and sum(self.sessions.values()) >= limit

    def _start_auth_session(self, params: bytes) -> tuple[bytes, bytes]:
        (nonce_size,) = struct.unpack_from(">H", params)
        offset = 2 + nonce_size
        (salt_size,) = struct.unpack_from(">H", params, offset)
        offset += 2 + salt_size
        (session_type,) = struct.unpack_from(">B", params, offset)
        if session_type not in (int(TPM2_SE.HMAC), int(TPM2_SE.POLICY), int(TPM2_SE.TRIAL)):
            raise _Reply(int(TPM2_RC.VALUE) + int(TPM2_RC.P) + int(TPM2_RC.RC3))
        if self.max_active is not None and len(self.sessions) >= self.max_active:
            raise _Reply(int(TPM2_RC.SESSION_HANDLES))
        if len(self.sessions) >= self.max_sessions or self._sessions_full():
            raise _Reply(int(TPM2_RC.SESSION_MEMORY))
        base = HR_HMAC_SESSION if session_type == TPM2_SE.HMAC else HR_POLICY_SESSION
        if self.reuse_handles:
            used = {h & 0xFFFFFF for h in self.sessions}
            index = next(i for i in range(len(used) + 1) if i not in used)
        else:
            index = self._next_session
            self._next_session += 1
        handle = base + index
        self.sessions[handle] = True
        return _u32(handle), _tpm2b(bytes(16))  # nonceTPM

    def _context_save(self, handle: int) -> bytes:
        if handle in self.objects:
            saved = _Saved(handle, False)
            saved_handle = HR_TRANSIENT
        elif self.sessions.get(handle):
            oldest = min(self._session_seq.values(), default=None)
            if self.context_gap is not None and oldest is not None:
                if self._context_counter + 1 - oldest > self.context_gap:
                    raise _Reply(int(TPM2_RC.CONTEXT_GAP))
            self._context_counter += 1
            self._session_seq[handle] = self._context_counter
            generation = self._session_generation.get(handle, 0) + 1
            self._session_generation[handle] = generation
            self.sessions[handle] = False
            saved = _Saved(handle, True, generation)
            saved_handle = handle
        else:
            raise _Reply(int(TPM2_RC.REFERENCE_H0))
        self._saved.append(saved)
        self._sequence += 1
        token = _TOKEN.pack(len(self._saved) - 1)
        sequence = self._context_counter if saved.is_session else self._sequence
        return _CONTEXT.pack(sequence, saved_handle, _RH_NULL, len(token)) + token

    def _context_load(self, params: bytes) -> int:
        _sequence, _saved_handle, _hierarchy, size = _CONTEXT.unpack_from(params)
        blob = params[_CONTEXT.size : _CONTEXT.size + size]
        if size != _TOKEN.size or len(blob) != size:
            raise _Reply(int(TPM2_RC.SIZE) + int(TPM2_RC.P) + int(TPM2_RC.RC1))
        (index,) = _TOKEN.unpack(blob)
        if index >= len(self._saved):
            raise _Reply(int(TPM2_RC.INTEGRITY) + int(TPM2_RC.P) + int(TPM2_RC.RC1))
        saved = self._saved[index]
        if not saved.is_session:
            handle = self._new_object()
            self.objects[handle] = self.objects.get(saved.handle, saved.handle)
            return handle
        current = self._session_generation.get(saved.handle)
        if self.sessions.get(saved.handle) is not False or current != saved.generation:
            # Flushed, loaded already, or an older save: the context cannot be loaded.
            raise _Reply(int(TPM2_RC.HANDLE) + int(TPM2_RC.P) + int(TPM2_RC.RC1))
        if self._sessions_full():
            raise _Reply(int(TPM2_RC.SESSION_MEMORY))
        self.sessions[saved.handle] = True
        self._session_seq.pop(saved.handle, None)
        return saved.handle

    def _get_capability(self, capability: int, prop: int, count: int) -> bytes:
        if capability == TPM2_CAP.TPM_PROPERTIES:
            table = {
                **PROPERTIES,
                int(TPM2_PT_HR.LOADED_MIN): 3,
                int(TPM2_PT.ACTIVE_SESSIONS_MAX): self.max_active or self.max_sessions,
                int(TPM2_PT.CONTEXT_GAP_MAX): self.context_gap or 0xFFFF,
            }
            props = [(p, v) for p, v in sorted(table.items()) if p >= prop]
            body = b"".join(_u32(p) + _u32(v) for p, v in props[:count])
            return struct.pack(">BII", len(props) > count, capability, min(len(props), count)) + body
        if capability == TPM2_CAP.COMMANDS:
            return self._list(capability, [a for cc, a in COMMAND_ATTRS.items() if cc >= prop], count)
        if capability == TPM2_CAP.HANDLES:
            kind = prop >> HR_SHIFT
            if kind == TPM2_HT.TRANSIENT:
                pool = list(self.objects)
            elif kind == TPM2_HT.LOADED_SESSION:
                pool = self.loaded_sessions()
            elif kind == TPM2_HT.SAVED_SESSION:
                pool = self.saved_sessions()
            else:
                pool = []
            return self._list(capability, sorted(h for h in pool if h & 0xFFFFFF >= prop & 0xFFFFFF), count)
        raise _Reply(int(TPM2_RC.VALUE) + int(TPM2_RC.P) + int(TPM2_RC.RC1))

    @staticmethod
    def _list(capability: int, values: list[int], count: int) -> bytes:
        """TPMS_CAPABILITY_DATA of a list of u32 (moreData first)."""
        shown = values[:count]
        return struct.pack(">BII", len(values) > count, capability, len(shown)) + b"".join(map(_u32, shown))
