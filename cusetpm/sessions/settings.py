# SPDX-License-Identifier: GPL-2.0-only
"""Every setting of global session accounting, with the defaults of the design (research
notes §7.1), in one frozen value so a daemon's configuration cannot drift while it serves."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settings:
    """What ``--sessions global`` does; times are in seconds."""

    #: Parse destruction events (FlushContext, continueSession clear); False: only notice a
    #: dead session when the RM's own save or load of it fails (the lazy scheme).
    strict_tracking: bool = True
    #: Evict another file's idle session when the TPM has no session handle left.
    evict: bool = True
    #: A session is evictable only once it has been unused this long (the RFC's 2 s).
    evict_min_idle: float = 2.0
    #: Whether sessions the daemon did not create (found by recalibration) may be evicted.
    evict_foreign: bool = False
    #: Bound on evict-and-resend rounds for one command.
    max_evictions_per_request: int = 3
    #: How long a StartAuthSession waits for a slot before the TPM's own answer (0: never).
    session_wait: float = 5.0
    #: Waiters beyond this get the TPM's answer at once.
    max_waiters: int = 64
    #: How long a slot freed for the head waiter stays reserved for it.
    reservation_grace: float = 1.0
    #: ATTACHED sessions per file; 3 is the kernel's table (beyond it: 0x000B0903).
    max_sessions_per_space: int = 3
    #: Sessions a file may hold context-saved itself (DETACHED).
    max_detached_per_space: int = 8
    #: ATTACHED + DETACHED sessions over every file of one uid (0: unlimited).
    max_sessions_per_uid: int = 0
    #: Sessions kept after their file closed (ABANDONED), LRU-pruned beyond this.
    max_abandoned: int = 4
    #: Refuse FlushContext of a session another live file owns.
    isolate_session_flush: bool = True
    #: Tombstones kept per file; the oldest is dropped beyond this.
    max_tombstones_per_space: int = 16
    #: Refresh old saved contexts before the context gap is reached.
    gap_proactive: bool = True
    #: Start regapping this many context saves before the effective gap.
    gap_margin: int = 256
    #: On a proactive regap, refresh every saved session older than this fraction of the gap.
    gap_refresh_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.max_sessions_per_space <= 3:
            raise ValueError("max_sessions_per_space must be 1..3 (the kernel's table holds 3)")
        for name in ("evict_min_idle", "session_wait", "reservation_grace"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_evictions_per_request < 1:
            raise ValueError("max_evictions_per_request must be at least 1")
        if self.gap_margin < 8:
            raise ValueError("gap_margin must be at least 8 (one command can cause 4 saves)")
