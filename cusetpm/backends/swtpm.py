# SPDX-License-Identifier: GPL-2.0-only
"""swtpm, started for the user: the one place its command line is built.

:func:`swtpm_argv` is used by the daemon's managed swtpm, the test support and the bench
alike; :func:`managed_swtpm` starts one on a Unix socket of its own and connects a
:class:`~cusetpm.backends.socket.SocketBackend` to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import struct
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
    listen_fd: int | None = None,
) -> list[str]:
    """``swtpm socket --tpm2`` serving commands on 127.0.0.1:port and control on port+1, or,
    with ``listen_fd``, commands on that listening Unix socket and no control channel.

    ``flags`` is swtpm's ``--flags`` (None: none, so the TPM waits for the control port's
    init as a freshly powered TPM does).
    """
    state = Path(state_dir)
    if listen_fd is not None:
        channels = ["--server", f"type=unixio,fd={listen_fd}"]
    else:
        channels = [
            "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
        ]  # fmt: skip
    argv = [
        exe, "socket", "--tpm2", *channels,
        "--tpmstate", f"dir={state}",
        "--log", f"file={state / 'swtpm.log'},level={log_level}",
    ]  # fmt: skip
    if flags:
        argv += ["--flags", flags]
    return argv + list(extra)


def abstract_listener(prefix: str) -> tuple[socket.socket, str]:
    """A listening Unix socket in the abstract namespace, named ``prefix``, this process's pid
    and a random part (no file to remove; gone with the last descriptor), and its address
    (a leading NUL), for ``swtpm_argv(listen_fd=...)``."""
    address = f"\0{prefix}-{os.getpid()}-{secrets.token_hex(8)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
        listener.listen(1)
    except OSError:
        listener.close()
        raise
    return listener, address


class ManagedSwtpm(SocketBackend):
    """A swtpm the daemon started, and starts again on the same state if it dies.

    It serves on a Unix socket in the abstract namespace, which the daemon binds and hands
    to swtpm (``--server type=unixio,fd=N``): an exchange costs 10 to 20 µs less than over
    loopback TCP (issue 9), no port can be taken meanwhile, and no file is left behind.  It
    has no control channel: the daemon never uses one.

    The restart is what a power cycle is to a real TPM: the daemon's recovery
    (:mod:`cusetpm.daemon.recovery`) sees a TPM waiting for Startup and starts a new epoch.
    """

    def __init__(self, exe: str, state: Path) -> None:
        super().__init__("127.0.0.1", 0)
        self.exe = exe
        self.state = state
        self.proc: subprocess.Popen[bytes] | None = None
        #: How many times swtpm had to be started again.
        self.restarts = 0

    async def start(self, attempts: int = 5) -> None:
        for attempt in range(attempts):
            listener, self.unix = abstract_listener("cusetpm-swtpm")
            try:
                proc = subprocess.Popen(
                    swtpm_argv(self.state, 0, exe=self.exe, listen_fd=listener.fileno()),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    pass_fds=(listener.fileno(),),
                    preexec_fn=_die_with_parent,
                )
            finally:
                listener.close()  # swtpm's now: once it dies, a connect() is refused
            try:
                await _wait_connect(self, proc)
            except BackendError:
                await _stop(proc)
                if attempt == attempts - 1:
                    raise
                continue
            self.proc = proc
            log.info("started swtpm (pid %d) on @%s, state in %s", proc.pid, self.unix[1:], self.state)
            return

    async def reconnect(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            await super().reconnect()  # swtpm lives: only the connection was lost
            return
        self._drop()
        if proc is not None:
            log.warning("swtpm (pid %d) exited with status %s; starting it again", proc.pid, proc.returncode)
            if proc.stderr:
                proc.stderr.close()
        self.proc = None
        self.restarts += 1
        await self.start(attempts=1)

    async def stop(self) -> None:
        await self.aclose()
        if self.proc is not None:
            await _stop(self.proc)
            self.proc = None


@contextlib.asynccontextmanager
async def managed_swtpm(state_dir: Path | None = None) -> AsyncIterator[ManagedSwtpm]:
    """Start swtpm on free loopback ports, connect, stop it on exit.

    The chip registration (:meth:`cusetpm.daemon.chip.TpmChip.register`) then sends SelfTest
    and Startup(CLEAR), as the kernel does for a chip that needs it.
    """
    exe = shutil.which("swtpm")
    if exe is None:
        raise BackendError("swtpm is not installed (Debian package 'swtpm'); or pass --tcti")
    state = Path(state_dir) if state_dir else default_state_dir()
    state.mkdir(parents=True, exist_ok=True)
    backend = ManagedSwtpm(exe, state)
    await backend.start()
    try:
        yield backend
    finally:
        with trio.CancelScope(shield=True):
            await backend.stop()


def _die_with_parent() -> None:
    """preexec: the managed swtpm gets SIGTERM when the daemon dies, even by SIGKILL, so a
    killed daemon leaves no swtpm behind (PR_SET_PDEATHSIG)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


#: GetTestResult: any answer (before Startup, TPM_RC_INITIALIZE) says swtpm serves.
PROBE = struct.pack(">HII", 0x8001, 10, 0x17C)


async def _wait_connect(backend: SocketBackend, proc: subprocess.Popen[bytes]) -> None:
    """Connect, and see swtpm answer: a connect() to its socket succeeds before swtpm has even
    read its state, so only an answer tells that it started."""
    with trio.move_on_after(10):
        while proc.poll() is None:
            try:
                await backend.connect()
                await backend.probe(PROBE)
                return
            except (BackendError, OSError, EOFError):
                backend.close()
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
