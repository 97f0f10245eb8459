# SPDX-License-Identifier: GPL-2.0-only
"""swtpm, started for the user: the one place its command line is built.

:func:`swtpm_argv` is used by the daemon's managed swtpm, the test support and the bench
alike; :func:`managed_swtpm` starts one on free loopback ports and connects a
:class:`~cusetpm.backends.socket.SocketBackend` to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import AsyncIterator, Sequence

import trio

from .base import BackendError
from .socket import SocketBackend

log = logging.getLogger(__name__)


def default_state_dir() -> Path:
    """Where the managed swtpm keeps its state: the user's runtime dir, else /tmp."""
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/cusetpm-{os.getuid()}"
    return Path(base) / "cusetpm" / "swtpm"


def free_port_pair() -> int:
    """A port P such that P and P+1 are free on loopback (swtpm's data and control ports;
    tpm2-tss's swtpm TCTI expects the control port at P+1)."""
    for _ in range(200):
        port = random.randrange(20000, 60000)
        socks = []
        try:
            for p in (port, port + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise BackendError("no free loopback port pair for swtpm")


def swtpm_argv(
    state_dir: str | os.PathLike[str],
    port: int,
    *,
    flags: str | None = "not-need-init",
    log_level: int = 1,
    exe: str = "swtpm",
    extra: Sequence[str] = (),
) -> list[str]:
    """``swtpm socket --tpm2`` serving commands on 127.0.0.1:port and control on port+1.

    ``flags`` is swtpm's ``--flags`` (None: none, so the TPM waits for the control port's
    init as a freshly powered TPM does).
    """
    state = Path(state_dir)
    argv = [
        exe, "socket", "--tpm2",
        "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
        "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
        "--tpmstate", f"dir={state}",
        "--log", f"file={state / 'swtpm.log'},level={log_level}",
    ]  # fmt: skip
    if flags:
        argv += ["--flags", flags]
    return argv + list(extra)


@contextlib.asynccontextmanager
async def managed_swtpm(state_dir: Path | None = None) -> AsyncIterator[SocketBackend]:
    """Start swtpm on free loopback ports, connect, stop it on exit.

    The chip registration (:meth:`cusetpm.daemon.chip.TpmChip.register`) then sends SelfTest
    and Startup(CLEAR), as the kernel does for a chip that needs it.
    """
    exe = shutil.which("swtpm")
    if exe is None:
        raise BackendError("swtpm is not installed (Debian package 'swtpm'); or pass --tcti")
    state = Path(state_dir) if state_dir else default_state_dir()
    state.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        port = free_port_pair()
        argv = swtpm_argv(state, port, exe=exe)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        backend = SocketBackend("127.0.0.1", port)
        try:
            await _wait_connect(backend, proc)
        except BackendError:
            await _stop(proc)
            if attempt == 4:
                raise
            continue
        log.info("started swtpm (pid %d) on 127.0.0.1:%d, state in %s", proc.pid, port, state)
        try:
            yield backend
        finally:
            with trio.CancelScope(shield=True):
                await backend.aclose()
                await _stop(proc)
        return


def _die_with_parent() -> None:
    """preexec: the managed swtpm gets SIGTERM when the daemon dies, even by SIGKILL, so a
    killed daemon leaves no swtpm behind (PR_SET_PDEATHSIG)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def _wait_connect(backend: SocketBackend, proc: subprocess.Popen[bytes]) -> None:
    with trio.move_on_after(10):
        while proc.poll() is None:
            try:
                await backend.connect()
                return
            except BackendError:
                await trio.sleep(0.02)
    err = proc.stderr.read().decode(errors="replace").strip() if proc.poll() is not None and proc.stderr else ""
    raise BackendError(f"swtpm did not start: {err or 'no connection within 10 s'}")


async def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; waits without blocking the event loop."""
    if proc.poll() is None:
        proc.terminate()
        with trio.move_on_after(grace):
            while proc.poll() is None:
                await trio.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
            await trio.to_thread.run_sync(proc.wait)
    if proc.stderr:
        proc.stderr.close()
