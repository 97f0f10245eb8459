# SPDX-License-Identifier: GPL-2.0-only
"""Backing TPMs behind one small async interface (:class:`Backend`).

* :mod:`.socket`: raw TPM commands over TCP (swtpm's data channel), no thread hop.
* :mod:`.device`: a TPM character device (``device:/dev/tpm0``), no thread hop.
* :mod:`.mssim`: the Microsoft/IBM simulator's two-port protocol (``mssim:``), no thread hop.
* :mod:`.tcti`: any tpm2-tss TCTI through tpm2-pytss, in a worker thread.
* :mod:`.swtpm`: the swtpm command line, and a swtpm started for the user.

Back ends never import front ends, nor the daemon (a test checks).
"""

import contextlib
from pathlib import Path
from typing import AsyncIterator

from .base import Backend, BackendError, unframeable
from .device import DeviceBackend, device_path
from .mssim import MssimBackend, mssim_address
from .socket import SocketBackend, swtpm_address
from .swtpm import default_state_dir, free_port_pair, managed_swtpm, swtpm_argv
from .tcti import TctiBackend

__all__ = [
    "Backend", "BackendError", "DeviceBackend", "SocketBackend", "TctiBackend", "default_state_dir", "device_path",
    "free_port_pair", "managed_swtpm", "MssimBackend", "mssim_address", "open_backend", "swtpm_address",
    "swtpm_argv", "unframeable",
]  # fmt: skip


@contextlib.asynccontextmanager
async def open_backend(tcti: str | None, state_dir: Path | None = None) -> AsyncIterator[Backend]:
    """The backing TPM a ``--tcti`` value names (None: a managed swtpm in ``state_dir``),
    closed (or stopped) on exit.  ``swtpm:``, ``mssim:`` and ``device:`` configurations take a
    native path (no worker thread); the rest go through tpm2-tss."""
    if not tcti:
        async with managed_swtpm(state_dir) as managed:
            yield managed
        return
    address, device, sim = swtpm_address(tcti), device_path(tcti), mssim_address(tcti)
    backend: SocketBackend | DeviceBackend | TctiBackend
    if address:
        backend = SocketBackend(*address)
        await backend.connect()
    elif sim:
        backend = MssimBackend(*sim)
        await backend.connect()
    elif device:
        backend = DeviceBackend(device)
        backend.open()
    else:
        backend = TctiBackend(tcti)
    try:
        yield backend
    finally:
        await backend.aclose()
