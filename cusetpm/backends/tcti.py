# SPDX-License-Identifier: GPL-2.0-only
"""Any tpm2-tss TCTI through tpm2-pytss (``mssim:``, ``device:/dev/tpm0``, ``tabrmd:``, ...)."""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

import trio
from tpm2_pytss.constants import TSS2_RC

from ..kernel import wire
from .base import BackendError

log = logging.getLogger(__name__)


class TctiBackend:
    """Any tpm2-tss TCTI (``swtpm:port=2321``, ``mssim:...``, ``device:/dev/tpm0``, ...).

    The TCTI is a blocking C library, so each exchange runs in a worker thread; the chip lock
    above guarantees one exchange at a time.
    """

    def __init__(self, conf: str) -> None:
        # tpm2-tss logs to stderr on its own; its failures reach the user as our one-line
        # error instead.  TSS2_LOG set by the user wins.
        os.environ.setdefault("TSS2_LOG", "all+NONE")
        self._conf = conf
        self._tcti = self._open(conf)
        self.commands_sent = 0

    @staticmethod
    def _open(conf: str) -> Any:
        from tpm2_pytss.TCTILdr import TCTILdr

        name, _, rest = conf.partition(":")
        try:
            return TCTILdr(name, rest or None)
        except Exception as exc:  # tpm2-pytss raises TSS2_Exception with a message
            raise BackendError(f"cannot open TCTI {conf!r}: {exc}") from None

    def _exchange(self, data: bytes, timeout: float) -> bytes | int:
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        try:
            self._tcti.transmit(data)
            return self._tcti.receive(wire.TPM_BUFSIZE, int(timeout * 1000))
        except TSS2_Exception as exc:
            if exc.rc & 0xFFFF == TSS2_RC.BASE_RC_TRY_AGAIN:  # no answer in time
                return -errno.ETIME
            log.warning("TCTI error: %s", exc)
            # The TPM behind it went away (a simulator or abrmd that stopped): reconnect.
            return -errno.EPIPE if exc.rc & 0xFFFF == TSS2_RC.BASE_RC_IO_ERROR else -errno.EIO

    async def transmit(self, data: bytes, timeout: float) -> bytes | int:
        self.commands_sent += 1
        return await trio.to_thread.run_sync(self._exchange, data, timeout)

    async def reconnect(self) -> None:
        old, self._tcti = self._tcti, None
        if old is not None:
            old.close()
        self._tcti = await trio.to_thread.run_sync(self._open, self._conf)

    async def aclose(self) -> None:
        if self._tcti is not None:
            self._tcti.close()
