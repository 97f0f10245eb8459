# SPDX-License-Identifier: GPL-2.0-only
"""The session registry: every session the TPM holds for this daemon, one per backing TPM.

Pure bookkeeping, no TPM traffic: :mod:`.global_seam` decides, this remembers.  Entries are
keyed by the low 24 bits of the handle because GetCapability lists saved sessions under the
loaded-session prefix (a reference-implementation quirk) while the index is what the TPM
allocates.  Each entry has a state (research notes §7.0): ATTACHED (in its file's table, the
kernel's only state), DETACHED (its file context-saved it itself), ABANDONED (that file has
closed) or FOREIGN (in the TPM, not created through us).  A tombstone tells one file "handle h
of yours was removed by the RM (evicted) or found dead (lost)", so its next use of h gets a
clear RM-layer answer instead of reaching whichever session the TPM gave that handle next.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..kernel import wire
from ..kernel.structs import Space


class State(enum.Enum):
    ATTACHED = "attached"
    DETACHED = "detached"
    ABANDONED = "abandoned"
    FOREIGN = "foreign"


#: Victim tiers (§7.6.1): abandoned and client-saved sessions pay first.
TIER = {State.ABANDONED: 1, State.DETACHED: 2, State.ATTACHED: 3, State.FOREIGN: 4}

EVICTED = "evicted"
LOST = "lost"


def key(handle: int) -> int:
    """The session index, the same for a loaded (0x02/0x03) and a saved listing."""
    return handle & wire.HR_HANDLE_MASK


def is_session(handle: int) -> bool:
    return handle & wire.HR_RANGE_MASK in (wire.HT_HMAC_SESSION, wire.HT_POLICY_SESSION)


@dataclass(eq=False)
class Entry:
    """One session the TPM holds."""

    handle: int
    state: State
    #: The file it belongs to (None once ABANDONED, and for FOREIGN).
    owner: Space | None
    uid: int
    created: float
    last_used: float
    #: Sequence number of its newest saved context (first 8 bytes of a TPMS_CONTEXT).
    seq: int | None = None
    #: The blob its file holds (DETACHED/ABANDONED): what a later ContextLoad will bring.
    client_blob: bytes | None = None
    #: The blob the RM loads instead (differs from ``client_blob`` once regapped).
    rm_blob: bytes | None = None


@dataclass(frozen=True, slots=True)
class Tombstone:
    handle: int
    reason: str
    at: float


@dataclass(eq=False)
class Waiter:
    """A StartAuthSession waiting for a slot (FIFO, one per file: one command in flight)."""

    id: int
    space: Space
    enqueued: float
    deadline: float
    #: When a freed slot was set aside for it (None: not yet).
    reserved_at: float | None = None

    @property
    def event(self) -> str:
        return f"session-slot:{self.id}"


@dataclass(eq=False)
class SpaceInfo:
    """What the registry knows of one open file besides its sessions."""

    space: Space
    uid: int
    tombstones: dict[int, Tombstone] = field(default_factory=dict)


class Registry:
    """Sessions, files, waiters and counters of one backing TPM."""

    def __init__(self) -> None:
        #: TPM_PT_ACTIVE_SESSIONS_MAX, read the first time it is needed (None until then).
        self.active_max: int | None = None
        self.entries: dict[int, Entry] = {}
        self.spaces: dict[int, SpaceInfo] = {}
        self.queue: list[Waiter] = []
        #: Client blobs of evicted DETACHED/ABANDONED sessions (their ContextLoad is refused).
        self.evicted_blobs: deque[bytes] = deque(maxlen=64)
        self.counters: dict[str, int] = {}
        self.max_wait = 0.0
        self._ids = itertools.count(1)

    # --- counters ----------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # --- files -------------------------------------------------------------------------

    def info(self, space: Space, uid: int = -1) -> SpaceInfo:
        si = self.spaces.get(id(space))
        if si is None:
            si = self.spaces[id(space)] = SpaceInfo(space, uid)
        return si

    def forget_space(self, space: Space) -> None:
        """The file closed: its tombstones and its waiter go (A7, W7)."""
        self.spaces.pop(id(space), None)
        self.queue = [w for w in self.queue if w.space is not space]

    def live(self, space: Space | None) -> bool:
        return space is not None and id(space) in self.spaces

    # --- entries -------------------------------------------------------------------------

    def get(self, handle: int) -> Entry | None:
        return self.entries.get(key(handle))

    def add(self, handle: int, state: State, owner: Space | None, uid: int, now: float) -> Entry:
        entry = Entry(handle, state, owner, uid, now, now)
        self.entries[key(handle)] = entry
        return entry

    def remove(self, handle: int) -> Entry | None:
        return self.entries.pop(key(handle), None)

    @property
    def known(self) -> int:
        return len(self.entries)

    @property
    def reserved(self) -> int:
        return sum(1 for w in self.queue if w.reserved_at is not None)

    @property
    def free(self) -> int:
        """Slots nobody holds nor was promised; large until the limit is known."""
        if self.active_max is None:
            return 1 << 30
        return self.active_max - self.known - self.reserved

    def of(self, space: Space, state: State) -> list[Entry]:
        return [e for e in self.entries.values() if e.owner is space and e.state is state]

    def of_uid(self, uid: int) -> int:
        """ATTACHED + DETACHED sessions of every live file of ``uid`` (quota Q3)."""
        return sum(1 for e in self.entries.values() if e.uid == uid and e.state in (State.ATTACHED, State.DETACHED))

    def by_client_blob(self, blob: bytes) -> Entry | None:
        for e in self.entries.values():
            if e.client_blob is not None and e.client_blob == blob:
                return e
        return None

    # --- tombstones ----------------------------------------------------------------------

    def tombstone(self, space: Space, handle: int, reason: str, now: float, limit: int) -> None:
        si = self.spaces.get(id(space))
        if si is None:
            return
        si.tombstones.pop(key(handle), None)
        si.tombstones[key(handle)] = Tombstone(handle, reason, now)
        while len(si.tombstones) > limit:
            del si.tombstones[next(iter(si.tombstones))]

    def tombstoned(self, space: Space, handle: int) -> Tombstone | None:
        si = self.spaces.get(id(space))
        if si is None:
            return None
        tomb = si.tombstones.get(key(handle))
        # Only the very handle removed, not another session type with the same index.
        return tomb if tomb is not None and tomb.handle == handle else None

    def drop_tombstone(self, space: Space, handle: int) -> None:
        si = self.spaces.get(id(space))
        if si is not None:
            si.tombstones.pop(key(handle), None)

    # --- victims (§7.6.1) ----------------------------------------------------------------

    def _candidates(self, requester: Space, evict_foreign: bool, exclude: set[int]) -> list[Entry]:
        out = []
        for k, e in self.entries.items():
            if k in exclude or e.owner is requester:
                continue
            if e.state is State.FOREIGN and not evict_foreign:
                continue
            out.append(e)
        return out

    @staticmethod
    def _eligible_at(e: Entry, min_idle: float) -> float:
        return -float("inf") if e.state is State.ABANDONED else e.last_used + min_idle

    def victim(
        self, requester: Space, now: float, min_idle: float, evict_foreign: bool, exclude: set[int]
    ) -> Entry | None:
        """The session to evict for ``requester``: never its own, never one in use; tiers,
        then least recently used, then oldest, then lowest handle."""
        ready = [
            e for e in self._candidates(requester, evict_foreign, exclude) if self._eligible_at(e, min_idle) <= now
        ]
        if not ready:
            return None
        return min(ready, key=lambda e: (TIER[e.state], e.last_used, e.created, key(e.handle)))

    def next_eligible(self, requester: Space, min_idle: float, evict_foreign: bool, exclude: set[int]) -> float | None:
        """When the first candidate becomes evictable (the waiters' eligibility timer)."""
        times = [self._eligible_at(e, min_idle) for e in self._candidates(requester, evict_foreign, exclude)]
        return min(times, default=None)

    # --- waiters (§7.8) --------------------------------------------------------------------

    def enqueue(self, space: Space, now: float, deadline: float) -> Waiter:
        w = Waiter(next(self._ids), space, now, deadline)
        self.queue.append(w)
        return w

    def dequeue(self, w: Waiter) -> None:
        if w in self.queue:
            self.queue.remove(w)

    def grant(self, now: float, grace: float) -> list[Waiter]:
        """Give free slots to waiters in queue order; returns the newly reserved ones (to be
        woken).  A reservation unused for ``grace`` seconds lapses."""
        for w in self.queue:
            if w.reserved_at is not None and now - w.reserved_at > grace:
                w.reserved_at = None
                self.count("reservations_lapsed")
        granted = []
        for w in self.queue:
            if self.free <= 0:
                break
            if w.reserved_at is None:
                w.reserved_at = now
                granted.append(w)
        return granted

    # --- status (§7.14) --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        states = {s.value: 0 for s in State}
        for e in self.entries.values():
            states[e.state.value] += 1
        files = []
        for si in self.spaces.values():
            files.append(
                {
                    "uid": si.uid,
                    "handles": {
                        f"0x{e.handle:08x}": e.state.value for e in self.entries.values() if e.owner is si.space
                    },
                    "tombstones": {f"0x{t.handle:08x}": t.reason for t in si.tombstones.values()},
                }
            )
        return {
            "active_max": self.active_max,
            "known": self.known,
            "states": states,
            "free": self.free if self.active_max is not None else None,
            "reserved": self.reserved,
            "queue": len(self.queue),
            "max_wait_ms": round(self.max_wait * 1000, 1),
            "counters": dict(sorted(self.counters.items())),
            "files": files,
        }
