# SPDX-License-Identifier: GPL-2.0-only
"""The Microsoft/IBM TPM 2.0 simulator (``mssim:host=H,port=P``) on trio, with no thread.

Its protocol has two ports.  The command port frames every command as ``u32
TPM_SEND_COMMAND, u8 locality, u32 size, bytes`` and answers ``u32 size, bytes, u32 0``; the
platform port (``port + 1``) takes signals such as power-on and NV-on, each acknowledged with
``u32 0``.  Like tpm2-tss's mssim TCTI, the backend powers the simulator on and turns its NV on
when it connects.  The exchange is :class:`~.socket.SocketBackend`'s, with this framing.
"""

from __future__ import annotations

import socket
import struct

from .base import BackendError
from .socket import SocketBackend, connect_tcp, recv_some, send_all, tcp_address

SEND_COMMAND = 8
SESSION_END = 20
POWER_ON = 1
NV_ON = 11
#: tpm2-tss's default locality for the simulator.
LOCALITY = 0


async def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += await recv_some(sock, n - len(data))
    return data


class MssimBackend(SocketBackend):
    """The simulator's command port; the platform port is used at each connection."""

    async def connect(self) -> None:
        await super().connect()  # the command port first: its address is the one users give
        try:
            platform = await connect_tcp(self.host, self.port + 1)
        except BackendError:
            self._drop()
            raise
        try:
            for signal_ in (POWER_ON, NV_ON):
                await send_all(platform, struct.pack(">I", signal_))
                (rc,) = struct.unpack(">I", await _recv_exact(platform, 4))
                if rc:
                    raise BackendError(f"the simulator refused platform signal {signal_}: {rc}")
            await send_all(platform, struct.pack(">I", SESSION_END))
        except (OSError, EOFError) as exc:
            self._drop()
            raise BackendError(f"the simulator's platform port {self.host}:{self.port + 1}: {exc}") from None
        finally:
            platform.close()

    def _frame(self, data: bytes) -> bytes:
        return struct.pack(">IBI", SEND_COMMAND, LOCALITY, len(data)) + data

    def _take(self, got: bytes) -> bytes | None:
        """``u32 size, bytes, u32 0``: the bytes, once all of it (the acknowledgement too) is in."""
        if len(got) < 4:
            return None
        (size,) = struct.unpack_from(">I", got)
        return got[4 : 4 + size] if len(got) >= 8 + size else None


def mssim_address(conf: str) -> tuple[str, int] | None:
    """(host, port) of an ``mssim:`` TCTI configuration, else None."""
    return tcp_address(conf, "mssim")
