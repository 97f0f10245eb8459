# SPDX-License-Identifier: GPL-2.0-only
"""The context gap (research notes §5.1, §7.9): regapping old saved session contexts.

The TPM remembers only the low 16 bits (8 on older TPMs) of the sequence number each saved
session got, so once about 65 531 session contexts have been saved after the oldest one still
out, it refuses to save anything (TPM_RC_CONTEXT_GAP).  Under the kernel's RM that happens to
any file that uses a session for long while another file keeps an idle one: its save fails and
it loses its sessions.  The remedy is the spec's: load the oldest context and save it again,
which gives it a new number.  This module does that ahead of time (proactive, a margin before
the limit) and when the TPM says 0x901 anyway (reactive, then the refused command is sent
again).  Sessions a file saved itself are refreshed too; the blob the file holds then no longer
loads at the TPM, so a ContextLoad of it is served the refreshed one (:meth:`current_blob`).
"""

from __future__ import annotations

from typing import Callable

from tpm2_pytss.constants import TPM2_PT, TPM2_PT_HR, TPM2_RC

from ..kernel import wire
from ..kernel.request import Io, Request, Send, T
from ..kernel.structs import Space
from ..kernel.tpm_interface import transmit_cmd
from ..kernel.wire import be32, command, u32
from . import parse
from .commands import flush_session, is_handle_error
from .registry import LOST, Entry, Registry, State
from .settings import Settings

RC_CONTEXT_GAP = int(TPM2_RC.CONTEXT_GAP)
PT_LOADED_MIN = int(TPM2_PT_HR.LOADED_MIN)
PT_ACTIVE_SESSIONS_MAX = int(TPM2_PT.ACTIVE_SESSIONS_MAX)
PT_CONTEXT_GAP_MAX = int(TPM2_PT.CONTEXT_GAP_MAX)
#: Fallbacks for a TPM that will not say: the spec's minimum of active sessions, a 16-bit gap.
ACTIVE_MIN, GAP_MIN, LOADED_MIN = 64, 0xFFFF, 3

Remove = Callable[[Entry, "str | None"], None]


class ContextGap:
    """Sequence numbers of every saved session, and the regaps that keep them close."""

    def __init__(self, registry: Registry, settings: Settings, remove: Remove) -> None:
        self.registry = registry
        self.settings = settings
        self._remove = remove
        self.gap_max: int | None = None
        self.loaded_min: int | None = None
        #: Highest sequence number seen + 1: where the TPM's counter is, near enough.
        self.next_seq = 0

    @property
    def gap_eff(self) -> int | None:
        """Saves of other sessions the oldest one survives: the TPM skips the values it uses
        for loaded slots (65 531 on swtpm)."""
        if self.gap_max is None or self.loaded_min is None:
            return None
        return self.gap_max - (self.loaded_min + 1)

    def read_limits(self) -> Io[None]:
        """HR_LOADED_MIN .. CONTEXT_GAP_MAX, ACTIVE_SESSIONS_MAX among them, in one command."""
        count = PT_CONTEXT_GAP_MAX - PT_LOADED_MIN + 1
        body = u32(wire.CAP_TPM_PROPERTIES) + u32(PT_LOADED_MIN) + u32(count)
        rc, rsp = yield from transmit_cmd(command(wire.CC_GET_CAPABILITY, body), 9, None)
        props: dict[int, int] = {}
        if rc == 0:
            n = be32(rsp, wire.TPM_HEADER_SIZE + 5)
            for i in range(min(n, count)):
                offset = wire.TPM_HEADER_SIZE + 9 + 8 * i
                if offset + 8 <= len(rsp):
                    props[be32(rsp, offset)] = be32(rsp, offset + 4)
        self.registry.active_max = props.get(PT_ACTIVE_SESSIONS_MAX) or ACTIVE_MIN
        self.gap_max = props.get(PT_CONTEXT_GAP_MAX) or GAP_MIN
        self.loaded_min = props.get(PT_LOADED_MIN) or LOADED_MIN

    # --- sequence numbers (G1, A9) -----------------------------------------------------------

    def note(self, e: Entry, blob: bytes) -> None:
        e.seq = parse.context_sequence(blob)
        self.next_seq = max(self.next_seq, e.seq + 1)

    def note_space(self, space: Space) -> None:
        """After a command: the contexts the RM just saved for this file."""
        for h in space.session_tbl:
            e = self.registry.get(h) if h else None
            blob = parse.session_blob(space, h) if e is not None else None
            if e is not None and blob is not None:
                self.note(e, blob)

    def oldest_seq(self) -> int | None:
        return min((e.seq for e in self.registry.entries.values() if e.seq is not None), default=None)

    def current_blob(self, client_blob: bytes) -> bytes | None:
        """G4: the refreshed context to load for a blob a file holds, if it was regapped."""
        e = self.registry.by_client_blob(client_blob)
        if e is None or e.rm_blob is None or e.rm_blob == client_blob:
            return None
        return e.rm_blob

    # --- regapping ---------------------------------------------------------------------------

    def _blob(self, e: Entry) -> bytes | None:
        if e.state is State.ATTACHED and e.owner is not None:
            return parse.session_blob(e.owner, e.handle)
        return e.rm_blob

    def _candidates(self, exclude: Space | None) -> list[Entry]:
        """Saved sessions whose context the RM holds, oldest first; not those of the file
        whose command is loading or saving (its contexts are in the work space)."""
        out = [
            e
            for e in self.registry.entries.values()
            if e.seq is not None
            and e.state is not State.FOREIGN
            and not (exclude is not None and e.owner is exclude and e.state is State.ATTACHED)
        ]
        return sorted(out, key=lambda e: e.seq or 0)

    def regap(self, e: Entry) -> Io[bool]:
        """ContextLoad + ContextSave: the session gets a new sequence number."""
        blob = self._blob(e)
        if blob is None:
            return False
        rc, rsp = yield from transmit_cmd(command(wire.CC_CONTEXT_LOAD, blob), 4, None)
        if rc:
            if is_handle_error(rc):
                self.registry.count("lazy_corrections_load_handle")
                self._remove(e, LOST)  # it was gone
            return False
        rc, rsp = yield from transmit_cmd(command(wire.CC_CONTEXT_SAVE, u32(e.handle)), 0, None)
        if rc:
            # Loaded and cannot be saved: do not leave it taking a slot.
            yield from flush_session(e.handle)
            self._remove(e, LOST)
            return False
        new = rsp[wire.TPM_HEADER_SIZE :]
        if e.state is State.ATTACHED and e.owner is not None:
            parse.replace_session_blob(e.owner, e.handle, new)
        else:
            e.rm_blob = new
        self.note(e, new)
        return True

    def due(self) -> bool:
        """G2's trigger: the oldest saved context is within the margin of the gap."""
        eff, oldest = self.gap_eff, self.oldest_seq()
        return eff is not None and oldest is not None and self.next_seq - oldest >= eff - self.settings.gap_margin

    def proactive(self) -> Io[None]:
        """G2: a margin before the gap, refresh every context older than a fraction of it."""
        eff = self.gap_eff
        if eff is None or not self.due():
            return
        threshold = eff * self.settings.gap_refresh_fraction
        for e in self._candidates(None):
            if e.seq is not None and self.next_seq - e.seq >= threshold:
                if (yield from self.regap(e)):
                    self.registry.count("regaps_proactive")

    def regap_oldest(self, exclude: Space | None) -> Io[bool]:
        """G3: regap the oldest context the RM can; False if there is none."""
        for e in self._candidates(exclude):
            if (yield from self.regap(e)):
                self.registry.count("regaps_reactive")
                return True
        return False

    def guard(self, gen: Io[T], exclude: Space | None) -> Io[T]:
        """Run a step of the kernel's, and when one of its commands meets TPM_RC_CONTEXT_GAP,
        regap and send that command again before the kernel sees the answer."""
        reply: object = None
        while True:
            try:
                req: Request = gen.send(reply)  # type: ignore[arg-type]
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            reply = yield req
            if not isinstance(req, Send):
                continue
            for _ in range(len(self.registry.entries) + 1):
                if not (isinstance(reply, bytes) and len(reply) >= 10 and be32(reply, 6) == RC_CONTEXT_GAP):
                    break
                self.registry.count("gap_rc_seen")
                if not (yield from self.regap_oldest(exclude)):
                    break
                reply = yield req
