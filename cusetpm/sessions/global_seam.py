# SPDX-License-Identifier: GPL-2.0-only
"""``--sessions global``: the seed thread's global session accounting RFC, on the seam.

The kernel's RM lets one file's sessions exhaust the TPM for every other file (0x905), lets
any file flush any session, and forgets sessions a file saved itself.  This seam keeps one
registry of every session (:mod:`.registry`) exact by reading what each command does (strict
rules A1-A10 of research notes §7.3) with lazy checks behind them (§7.4), and acts on it:

* admission of StartAuthSession (§7.5): a free slot, else evict another file's least
  recently used idle session right before the command is sent (§7.6), else wait in a FIFO
  queue with a deadline (§7.8) without holding the chip;
* what the owner of an evicted session sees (§7.7): RM-layer answers, never sent;
* isolation (§7.12) and quotas (§7.10).

The instance is shared by every node on one chip: one registry per backing TPM.  It runs on
the kernel's load and save, or on lazy swapping's (``swap``: ``--swap lazy``), whose resident
files keep their sessions loaded between commands: those have no saved context, so the
context gap leaves them out, and the regaps that need a free slot put them away first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from tpm2_pytss.constants import TPMA_SESSION

from ..kernel import wire
from ..kernel.request import Io, Wait
from ..kernel.seam import KERNEL, Seam
from ..kernel.structs import NR_SLOTS, Chip, Space
from ..kernel.tpm2_space import EOPNOTSUPP, find_and_validate_cc
from ..kernel.tpm_interface import transmit
from ..kernel.wire import be32, command
from . import parse
from .commands import flush_session, is_handle_error, list_sessions
from .gap import RC_CONTEXT_GAP, ContextGap
from .parse import Command
from .refusals import (
    CC_START_AUTH_SESSION,
    RC_RM_GAP,
    RC_SESSION_HANDLES,
    refusal,
    tombstone_answer,
    uid,
)
from .registry import EVICTED, LOST, Entry, Registry, State, Waiter, is_session, key
from .settings import Settings

if TYPE_CHECKING:
    from ..swap.lazy import LazySwap

CONTINUE_SESSION = int(TPMA_SESSION.CONTINUESESSION)
#: Commands that manage session contexts: a 0x901 answer to them is regapped and resent.
_GAP_COMMANDS = (CC_START_AUTH_SESSION, wire.CC_CONTEXT_SAVE, wire.CC_CONTEXT_LOAD)


@dataclass
class _Cmd:
    """One user command in progress for one file, between before_command and after_response."""

    cmd: Command
    original: bytes
    #: The kernel flushed the work space (an error path): every session of the file is gone.
    flushed: bool = False
    #: No slot could be had before sending: the TPM's answer is final (W4, W6).
    final: bool = False
    referenced: set[int] = field(default_factory=set)


class GlobalSessions(Seam):
    """Global session accounting.  ``clock`` is monotonic seconds (injectable for tests)."""

    may_wait = True

    def __init__(
        self,
        settings: Settings | None = None,
        clock: Callable[[], float] = time.monotonic,
        swap: LazySwap | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.clock = clock
        self.registry = Registry()
        self.gap = ContextGap(self.registry, self.settings, self._remove)
        self._cmds: dict[int, _Cmd] = {}
        #: The command between load and save (unload() is not told whose it is).
        self._running: _Cmd | None = None
        self._running_space: Space | None = None
        #: Lazy swapping underneath (None: the kernel's load and save).
        self.swap = swap
        self.inner: Seam = KERNEL if swap is None else swap
        if swap is not None:
            swap.on_put_away = self._put_away

    @property
    def features(self) -> tuple[Seam, ...]:
        return (self,) if self.swap is None else (self, self.swap)

    def _resident(self, space: Space) -> bool:
        return self.swap is not None and self.swap.is_resident(space)

    # --- the seam's steps ------------------------------------------------------------------

    def before_command(self, chip: Chip, space: Space, buf: bytearray, bufsiz: int) -> Io[int]:
        length = be32(buf, 2)
        cmd = parse.parse_command(chip, buf, min(length, bufsiz))
        if cmd is None:
            return 0
        reg, now = self.registry, self.clock()
        reg.info(space, uid(space))
        ctx = _Cmd(cmd, bytes(buf[:length]))
        ctx.referenced = {key(h) for h in cmd.handles if is_session(h)}
        ctx.referenced |= {key(h) for h, _ in cmd.sessions if is_session(h)}
        answer = tombstone_answer(reg, space, cmd)
        if answer is None:
            for k in ctx.referenced:  # A8
                e = reg.entries.get(k)
                if e is not None and e.owner is space:
                    e.last_used = now
            answer = refusal(reg, self.settings, space, cmd, buf, length)
        if answer is not None:
            return parse.rm_answer(buf, answer)
        self._cmds[id(space)] = ctx
        session_load = cmd.cc == wire.CC_CONTEXT_LOAD and is_session(parse.context_handle(buf))
        if cmd.cc == CC_START_AUTH_SESSION or session_load:
            yield from self._ensure_limits()
        if session_load and (current := self.gap.current_blob(bytes(buf[wire.TPM_HEADER_SIZE : length]))):
            # G4: the file's blob was regapped; load the refreshed one (the same session).
            ctx.original = command(wire.CC_CONTEXT_LOAD, current)
            buf[: len(ctx.original)] = ctx.original
            reg.count("blob_substitutions")
        if self.settings.gap_proactive and self.gap.due():
            yield from self._put_all_away()
            yield from self.gap.proactive()
        if cmd.cc == CC_START_AUTH_SESSION:
            ctx.final = not (yield from self._obtain_slot(chip, space, ctx))
        return 0

    def load(self, chip: Chip, space: Space, buf: bytearray, bufsiz: int) -> Io[int]:
        ctx = self._running = self._cmds.get(id(space))
        self._running_space = space
        valid = find_and_validate_cc(chip, buf, bufsiz) >= 0
        before = [h for h in space.session_tbl if h]
        ret = yield from self.gap.guard(self.inner.load(chip, space, buf, bufsiz), space)
        if ctx is None:
            return ret
        if ret < 0 and ret != EOPNOTSUPP and valid:
            ctx.flushed = True
        elif ret == 0:
            # L2: a session the RM could not load is gone (someone else flushed it).
            for h in before:
                if h not in chip.work_space.session_tbl:
                    self.registry.count("lazy_corrections_load_handle")
                    e = self.registry.get(h)
                    if e is not None and e.owner is space:
                        self._remove(e, LOST, drop_from_table=False)
        return ret

    def unload(self, chip: Chip) -> Io[None]:
        if self._running is not None:
            self._running.flushed = True
            if self.swap is not None and self._running_space is not None:
                # A resident file loses its table here; tell its sessions' owner now.
                self._space_flushed(self._running_space)
        yield from self.inner.unload(chip)

    def save(self, chip: Chip, space: Space, buf: bytearray, length: int) -> Io[int]:
        ret = yield from self.gap.guard(self.inner.save(chip, space, buf, length), space)
        ctx = self._cmds.get(id(space))
        if ctx is not None and ret < 0:
            ctx.flushed = True
        if self._resident(space):
            # Loaded, not saved: no context of these counts in the gap.
            for e in self.registry.of(space, State.ATTACHED):
                e.seq = None
        return ret

    def after_response(self, chip: Chip, space: Space, buf: bytearray, length: int) -> Io[int]:
        ctx = self._cmds.get(id(space))
        if ctx is None:
            return length
        if (
            ctx.cmd.cc == CC_START_AUTH_SESSION
            and not ctx.final
            and length >= wire.TPM_HEADER_SIZE
            and be32(buf, 6) == RC_SESSION_HANDLES
        ):
            length = yield from self._retry_start(chip, space, buf, ctx)
        if ctx.cmd.cc in _GAP_COMMANDS and length >= wire.TPM_HEADER_SIZE and be32(buf, 6) == RC_CONTEXT_GAP:
            length = yield from self._retry_gap(chip, space, buf, ctx)
        self._cmds.pop(id(space), None)
        self._running = self._running_space = None
        now = self.clock()
        if length < 0 or ctx.flushed:
            if ctx.flushed:
                self._space_flushed(space)
        elif length >= wire.TPM_HEADER_SIZE:
            self._observe(chip, space, ctx.cmd, buf, length, now)
        self._reconcile(space, now)
        if not self._resident(space):
            self.gap.note_space(space)
        self._grant(chip)
        return length

    def release(self, chip: Chip, space: Space) -> Io[None]:
        """Close (A7, I2): flush what the registry still gives this file, its client-saved
        sessions become ABANDONED, and the oldest abandoned ones beyond the bound go."""
        reg = self.registry
        self._cmds.pop(id(space), None)
        if self.swap is not None:
            yield from self.swap.release_objects(space)
        for h in space.session_tbl:
            e = reg.get(h) if h else None
            if e is not None and e.owner is space and e.state is State.ATTACHED and e.handle == h:
                yield from flush_session(h)
                reg.remove(h)
        for e in reg.of(space, State.DETACHED):
            e.state, e.owner = State.ABANDONED, None
        reg.forget_space(space)
        abandoned = sorted((e for e in reg.entries.values() if e.state is State.ABANDONED), key=lambda e: e.last_used)
        for e in abandoned[: max(0, len(abandoned) - self.settings.max_abandoned)]:
            yield from flush_session(e.handle)
            self._remove(e, EVICTED)
            reg.count("abandoned_pruned")
        self._grant(chip)

    # --- admission, eviction, waiting -------------------------------------------------------

    def _ensure_limits(self) -> Io[None]:
        """TPM_PT_ACTIVE_SESSIONS_MAX and the gap's limits, asked (in one command) the first
        time a session is started or loaded: with no session, nothing needs them."""
        if self.registry.active_max is None:
            yield from self.gap.read_limits()

    def _obtain_slot(self, chip: Chip, space: Space, ctx: _Cmd) -> Io[bool]:
        """Make room for one new session: free, evicted, or granted after waiting.  False
        when none could be had (the command is then sent anyway and the TPM answers)."""
        reg, s = self.registry, self.settings
        self._grant(chip)
        unreserved = [w for w in reg.queue if w.reserved_at is None]
        if reg.free > 0 and not unreserved:
            return True
        if not unreserved and (yield from self._evict_one(space, ctx)):
            return True
        if s.session_wait <= 0 or len(reg.queue) >= s.max_waiters:
            reg.count("waits_refused")
            return False
        now = self.clock()
        w = reg.enqueue(space, now, now + s.session_wait)
        reg.count("waits")
        try:
            return (yield from self._wait(chip, space, ctx, w))
        finally:
            reg.dequeue(w)
            reg.max_wait = max(reg.max_wait, self.clock() - w.enqueued)
            chip.signal(w.event)  # nobody waits on it any more: lets the driver forget it

    def _wait(self, chip: Chip, space: Space, ctx: _Cmd, w: Waiter) -> Io[bool]:
        reg, s = self.registry, self.settings
        while True:
            now = self.clock()
            if w.reserved_at is not None:
                return True
            head = next((x for x in reg.queue if x.reserved_at is None), None)
            if head is w and (yield from self._evict_one(space, ctx)):
                return True
            if now >= w.deadline:
                reg.count("wait_timeouts")
                return False
            timeout = w.deadline - now
            if head is w and s.evict:
                t = reg.next_eligible(space, s.evict_min_idle, s.evict_foreign, ctx.referenced)
                if t is not None and t > now:
                    timeout = min(timeout, t - now + 0.001)
            yield Wait(w.event, timeout)

    def _grant(self, chip: Chip) -> None:
        """A10/W2: give freed slots to the head waiters and wake them."""
        for w in self.registry.grant(self.clock(), self.settings.reservation_grace):
            chip.signal(w.event)

    def _evict_one(self, space: Space, ctx: _Cmd) -> Io[bool]:
        """Flush the best victim right before the requester's command is sent (§7.6)."""
        reg, s = self.registry, self.settings
        if not s.evict:
            return False
        victim = reg.victim(space, self.clock(), s.evict_min_idle, s.evict_foreign, ctx.referenced)
        if victim is None:
            return False
        ok = yield from flush_session(victim.handle)
        if not ok:
            reg.count("eviction_failures")
            return False
        reg.count(f"evictions_{victim.state.value}")
        self._remove(victim, EVICTED)
        return True

    def _resend(self, chip: Chip, space: Space, buf: bytearray, ctx: _Cmd) -> Io[int]:
        """The file's command once more, as tpm_dev_transmit() runs it (its space was saved)."""
        buf[: len(ctx.original)] = ctx.original
        length = yield from self.load(chip, space, buf, wire.TPM_BUFSIZE)
        if length == 0:
            length = yield from transmit(buf, wire.TPM_BUFSIZE)
            if length < 0:
                yield from self.unload(chip)
            else:
                length = yield from self.save(chip, space, buf, length)
        return length

    def _retry_start(self, chip: Chip, space: Space, buf: bytearray, ctx: _Cmd) -> Io[int]:
        """The TPM had no handle although the registry thought it had (sessions we do not
        know of): recalibrate (L5), make room, send the command again."""
        length = wire.TPM_HEADER_SIZE
        yield from self._put_all_away()
        for _ in range(self.settings.max_evictions_per_request):
            yield from self._recalibrate()
            got = yield from self._obtain_slot(chip, space, ctx)
            length = yield from self._resend(chip, space, buf, ctx)
            if not got or length < wire.TPM_HEADER_SIZE or be32(buf, 6) != RC_SESSION_HANDLES:
                break
        return length

    def _retry_gap(self, chip: Chip, space: Space, buf: bytearray, ctx: _Cmd) -> Io[int]:
        """G3 (c, d): the file's own session-context command met the gap: regap the oldest
        and resend, as often as there are saved sessions; else 0x000B0901 (G5)."""
        length = wire.TPM_HEADER_SIZE
        yield from self._put_all_away()
        for _ in range(len(self.registry.entries) + 1):
            self.registry.count("gap_rc_seen")
            if not (yield from self.gap.regap_oldest(None)):
                break
            length = yield from self._resend(chip, space, buf, ctx)
            if length < wire.TPM_HEADER_SIZE or be32(buf, 6) != RC_CONTEXT_GAP:
                return length
        self.registry.count("gap_unrepaired")
        return parse.rm_answer(buf, RC_RM_GAP)

    # --- keeping the registry exact ----------------------------------------------------------

    def _observe(self, chip: Chip, space: Space, cmd: Command, buf: bytearray, length: int, now: float) -> None:
        """The strict rules (A2-A6, L4, L6) on one response."""
        reg, strict = self.registry, self.settings.strict_tracking
        rc = be32(buf, 6)
        target = cmd.handles[0] if cmd.handles else 0
        if rc == wire.RC_INITIALIZE or (rc == 0 and cmd.cc == wire.CC_STARTUP):
            self._reset()
            return
        if rc != wire.RC_SUCCESS:
            if (
                cmd.cc == wire.CC_FLUSH_CONTEXT
                and is_session(target)
                and is_handle_error(rc)
                and (e := reg.get(target)) is not None
            ):
                reg.count("lazy_corrections_flush_handle")  # L4: it was gone already
                self._remove(e, LOST)
            return
        if cmd.cc == wire.CC_FLUSH_CONTEXT and is_session(target) and strict:  # A3
            e = reg.get(target)
            if e is not None:
                self._remove(e, None if e.owner is space else LOST)
        if strict and cmd.sessions:  # A4
            attrs = parse.response_session_attrs(chip, cmd.cc, buf, length)
            for (h, _), a in zip(cmd.sessions, attrs, strict=False):
                if is_session(h) and not a & CONTINUE_SESSION and (e := reg.get(h)) is not None:
                    self._remove(e, None if e.owner is space else LOST)
        if cmd.cc == wire.CC_CONTEXT_SAVE and is_session(target):  # A6
            e = reg.get(target)
            if e is not None and e.owner is space and e.state is State.ATTACHED:
                blob = bytes(buf[wire.TPM_HEADER_SIZE : length])
                e.state, e.client_blob, e.rm_blob, e.last_used = State.DETACHED, blob, blob, now
                self.gap.note(e, blob)
        if cmd.cc == wire.CC_CONTEXT_LOAD and length >= wire.TPM_HEADER_SIZE + 4:  # A2
            h = be32(buf, wire.TPM_HEADER_SIZE)
            e = reg.get(h) if is_session(h) else None
            if e is not None and e.state in (State.DETACHED, State.ABANDONED, State.FOREIGN):
                e.state, e.owner, e.uid = State.ATTACHED, space, uid(space)
                e.client_blob = e.rm_blob = None
                e.last_used = now

    def _reconcile(self, space: Space, now: float) -> None:
        """The file's table is the truth for its ATTACHED sessions: the kernel's save drops a
        session the TPM no longer has (L1), and a new handle in it is a new session (A1),
        unless another entry had that handle (L3: it died unnoticed)."""
        reg = self.registry
        table = {key(h): h for h in space.session_tbl if h}
        for gone in reg.of(space, State.ATTACHED):
            if key(gone.handle) not in table:
                reg.count("lazy_corrections_save_ref_h0")
                reg.remove(gone.handle)
        for k, h in table.items():
            e = reg.entries.get(k)
            if e is not None and e.owner is space and e.state is State.ATTACHED and e.handle == h:
                continue
            if e is not None:
                reg.count("lazy_corrections_handle_collision")
                self._remove(e, LOST)
            reg.add(h, State.ATTACHED, space, uid(space), now)
            reg.drop_tombstone(space, h)  # T3: the TPM gave this file the handle again

    def _space_flushed(self, space: Space) -> None:
        """An error path of the kernel flushed every session of the file; they are gone, and
        the file is told so on its next use of them instead of meeting a reused handle."""
        for h in list(space.session_tbl):
            e = self.registry.get(h) if h else None
            if e is not None and e.owner is space:
                self._remove(e, LOST, drop_from_table=False)
        space.session_tbl[:] = [0] * NR_SLOTS

    def _remove(self, e: Entry, reason: str | None, drop_from_table: bool = True) -> None:
        """Take a session out of the registry (a slot-free event, A10) and out of its file."""
        reg, now = self.registry, self.clock()
        reg.remove(e.handle)
        if e.state is State.ATTACHED and e.owner is not None:
            if drop_from_table and self._resident(e.owner):
                # Loaded: the table is all there is (its buffer is refilled when put away).
                table = e.owner.session_tbl
                if e.handle in table:
                    table[table.index(e.handle)] = 0
            elif drop_from_table:
                parse.drop_session(e.owner, e.handle)
            if reason is not None:
                reg.tombstone(e.owner, e.handle, reason, now, self.settings.max_tombstones_per_space)
        elif e.client_blob is not None and reason is not None:
            reg.evicted_blobs.append(e.client_blob)

    def tpm_restarted(self) -> None:
        """The daemon reconnected to a restarted TPM: L6."""
        self._reset()
        if self.swap is not None:
            self.swap.tpm_restarted()

    def loaded_flushed(self) -> None:
        """The daemon flushed everything loaded: the resident files' sessions are gone, and
        their owners are told so (as after the kernel's error path) on their next use."""
        if self.swap is not None:
            for space, _ in self.swap.residents:
                self._space_flushed(space)
            self.swap.loaded_flushed()

    # --- lazy swapping underneath --------------------------------------------------------------

    def _put_all_away(self) -> Io[None]:
        """Before a regap or a resend: every session saved and every slot free, as the
        kernel leaves the TPM between commands."""
        if self.swap is not None:
            yield from self.swap.put_all_away()

    def _put_away(self, space: Space, saved: bool) -> None:
        """Lazy swapping put a resident file away: its sessions now have saved contexts (or,
        if the save failed, are gone, as after the kernel's failed commit)."""
        if not saved:
            self._space_flushed(space)
            return
        self._reconcile(space, self.clock())
        self.gap.note_space(space)

    def _reset(self) -> None:
        """L6: the TPM was (re)started; none of its sessions survive."""
        for e in list(self.registry.entries.values()):
            self._remove(e, LOST)
        self.registry.count("resets")

    def _recalibrate(self) -> Io[None]:
        """L5: list the TPM's sessions; unknown ones are FOREIGN, missing ones are gone."""
        reg = self.registry
        present = yield from list_sessions()
        if present is None:
            return
        now = self.clock()
        for k, e in list(reg.entries.items()):
            if k not in present:
                self._remove(e, LOST)
        for k, h in present.items():
            if k not in reg.entries:
                reg.add(h, State.FOREIGN, None, -1, now)
                reg.count("foreign_found")
        reg.count("recalibrations")

    def snapshot(self) -> dict[str, object]:
        """The status: registry counts, waiters, counters, per file its handles and tombstones."""
        snap = self.registry.snapshot()
        snap["mode"] = "global"
        snap["strict_tracking"] = self.settings.strict_tracking
        snap["gap"] = {
            "gap_max": self.gap.gap_max,
            "gap_eff": self.gap.gap_eff,
            "next_seq": self.gap.next_seq,
            "oldest_seq": self.gap.oldest_seq(),
        }
        return snap
