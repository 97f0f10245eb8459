# SPDX-License-Identifier: GPL-2.0-only
"""What every backing TPM offers the daemon, and the errors they share.

``transmit(data, timeout)`` sends one command and returns the whole response, or a negative
errno as a kernel TPM driver would report it: ``-ETIME`` when the TPM does not answer within
the command's duration, ``-EPIPE`` when the TPM has gone away (the daemon then calls
``reconnect()`` until it is back), ``-EIO`` for other transport failures.  Nothing a backend does blocks the event loop.

A backend may also offer ``async watch()``, a task the chip runs while it serves, which times
the exchanges out for it (:class:`.socket.SocketBackend`: cheaper than a cancel scope each).
"""

from __future__ import annotations

from typing import Protocol

from tpm2_pytss.constants import TPM2_RC

from ..kernel import wire


class Backend(Protocol):
    """Where commands go.  ``transmit`` returns the response, or a negative errno."""

    commands_sent: int

    async def transmit(self, data: bytes, timeout: float) -> bytes | int: ...

    async def reconnect(self) -> None:
        """After ``-EPIPE``: reach the TPM again (a managed swtpm that died is started again
        on its state).  Raises :class:`BackendError` while it cannot."""
        ...

    async def aclose(self) -> None: ...


class BackendError(Exception):
    """The backing TPM cannot be reached (reported as one line, exit status 1)."""


def unframeable(data: bytes) -> bytes | None:
    """The answer to a command a stream transport cannot delimit, or None.

    The kernel sends ``header.length`` bytes even when that is 1..9 (a stale or short
    header).  A message transport (vtpm_proxy) hands such a frame to the TPM whole; swtpm's
    and the simulator's stream sockets wait for a 10-byte header that never comes and hang.
    So stream backends answer these frames as a TPM does, with TPM_RC_COMMAND_SIZE.
    """
    if len(data) >= wire.TPM_HEADER_SIZE:
        return None
    return wire.command(int(TPM2_RC.COMMAND_SIZE))
