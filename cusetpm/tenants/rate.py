# SPDX-License-Identifier: GPL-2.0-only
"""``commands_per_second``: a token bucket that says how long a command must wait.

Sans-I/O: :meth:`TokenBucket.delay` takes the time and returns the wait.  A tenant over its
rate is slowed down, never refused: a blocking write() waits that long before its command
goes to the TPM (an O_NONBLOCK one returns at once and its command waits), so a client sees
a slower TPM, not an error it would have to handle.  Waits are reserved in arrival order, so
the tenant's own files are served first come, first served.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` commands a second on average, bursts of up to ``burst`` (default: one second's)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1.0, rate if burst is None else burst)
        self.tokens = self.burst
        self.last: float | None = None

    def delay(self, now: float) -> float:
        """Take one token; the seconds to wait before using it (0: go now)."""
        self._refill(now)
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def take_now(self, now: float) -> bool:
        """Take one token if the command may go now (what :meth:`delay` would answer 0 for);
        False, having taken nothing, if it would have to wait.  The request loop runs a
        command only if it need not wait; one that must is left to :meth:`delay`."""
        self._refill(now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def _refill(self, now: float) -> None:
        """The tokens earned since the last call, up to the burst."""
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
