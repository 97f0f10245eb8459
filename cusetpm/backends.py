# SPDX-License-Identifier: GPL-2.0-only
"""Backing TPMs behind one small async interface (see :class:`cusetpm.device.Backend`).

``transmit(data, timeout)`` sends one command and returns the whole response, or a negative
errno as a kernel TPM driver would report it: ``-ETIME`` when the TPM does not answer within
the command's duration, ``-EPIPE`` when the TPM has gone away, ``-EIO`` for other transport
failures.  Nothing here blocks the event loop.

* :class:`SocketBackend`: raw TPM commands over TCP (swtpm's data channel).
* :class:`TctiBackend`: any tpm2-tss TCTI through tpm2-pytss, run in a worker thread.
* :func:`managed_swtpm`: starts swtpm for the user and connects a SocketBackend to it.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import shutil
import socket
import subprocess
from pathlib import Path
from typing import AsyncIterator

import trio

from . import tpm
from .tpm import be32

log = logging.getLogger(__name__)


class BackendError(Exception):
    """The backing TPM cannot be reached (reported as one line, exit status 1)."""


#: TPM_RC_COMMAND_SIZE: what a TPM answers a command shorter than its header.
RC_COMMAND_SIZE = 0x142


def unframeable(data: bytes) -> bytes | None:
    """The answer to a command a stream transport cannot delimit, or None.

    The kernel sends ``header.length`` bytes even when that is 1..9 (a stale or short
    header).  A message transport (vtpm_proxy) hands such a frame to the TPM whole; swtpm's
    and the simulator's stream sockets wait for a 10-byte header that never comes and hang.
    So stream backends answer these frames as a TPM does, with TPM_RC_COMMAND_SIZE.
    """
    if len(data) >= tpm.TPM_HEADER_SIZE:
        return None
    return tpm.command(RC_COMMAND_SIZE)


class SocketBackend:
    """A TPM that speaks raw TPM 2.0 commands on a TCP stream, as swtpm's server port does.

    Uses a plain non-blocking socket and trio's readiness waits: this is on every command's
    path, and trio's socket wrappers cost as much again as the exchange itself.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.commands_sent = 0
        self._sock: socket.socket | None = None

    async def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            try:
                sock.connect((self.host, self.port))
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
        except OSError as exc:
            sock.close()
            raise BackendError(f"cannot connect to TPM at {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._sock = sock

    async def transmit(self, data: bytes, timeout: float) -> bytes | int:
        self.commands_sent += 1
        short = unframeable(data)
        if short is not None:
            return short
        try:
            with trio.fail_after(timeout):
                if self._sock is None:
                    await self.connect()
                return await self._exchange(data)
        except trio.TooSlowError:
            # The late answer would desynchronize the stream: start a new connection.
            self._drop()
            return -errno.ETIME
        except (OSError, BackendError, EOFError) as exc:
            log.warning("TPM transport error: %s", exc)
            self._drop()
            return -errno.EPIPE

    async def _exchange(self, data: bytes) -> bytes:
        sock = self._sock
        assert sock is not None
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
        rsp = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not chunk:
                raise EOFError("TPM closed the connection")
            rsp += chunk
            if len(rsp) >= tpm.TPM_HEADER_SIZE and len(rsp) >= be32(rsp, 2):
                return rsp

    def _drop(self) -> None:
        if self._sock is not None:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
            self._sock = None

    async def aclose(self) -> None:
        self._drop()


def swtpm_address(conf: str) -> tuple[str, int] | None:
    """(host, port) of a ``swtpm:`` TCTI configuration, else None.

    Such a TPM speaks raw commands on a socket, so :class:`SocketBackend` serves it without
    a thread hop per command (tpm2-tss's defaults: localhost, port 2321).
    """
    name, _, rest = conf.partition(":")
    if name != "swtpm":
        return None
    options = dict(item.partition("=")[::2] for item in rest.split(",") if item)
    if set(options) - {"host", "port"}:
        return None
    return options.get("host", "localhost"), int(options.get("port", "2321"))


class TctiBackend:
    """Any tpm2-tss TCTI (``swtpm:port=2321``, ``mssim:...``, ``device:/dev/tpm0``, ...).

    The TCTI is a blocking C library, so each exchange runs in a worker thread; the chip lock
    above guarantees one exchange at a time.
    """

    def __init__(self, conf: str) -> None:
        # tpm2-tss logs to stderr on its own; its failures reach the user as our one-line
        # error instead.  TSS2_LOG set by the user wins.
        os.environ.setdefault("TSS2_LOG", "all+NONE")
        from tpm2_pytss.TCTILdr import TCTILdr

        name, _, rest = conf.partition(":")
        try:
            self._tcti = TCTILdr(name, rest or None)
        except Exception as exc:  # tpm2-pytss raises TSS2_Exception with a message
            raise BackendError(f"cannot open TCTI {conf!r}: {exc}") from None
        self.commands_sent = 0

    def _exchange(self, data: bytes, timeout: float) -> bytes | int:
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        try:
            self._tcti.transmit(data)
            return self._tcti.receive(tpm.TPM_BUFSIZE, int(timeout * 1000))
        except TSS2_Exception as exc:
            if exc.rc & 0xFFFF == 9:  # TSS2_BASE_RC_TRY_AGAIN: no answer in time
                return -errno.ETIME
            log.warning("TCTI error: %s", exc)
            return -errno.EIO

    async def transmit(self, data: bytes, timeout: float) -> bytes | int:
        self.commands_sent += 1
        return await trio.to_thread.run_sync(self._exchange, data, timeout)

    async def aclose(self) -> None:
        self._tcti.close()


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


@contextlib.asynccontextmanager
async def managed_swtpm(state_dir: Path | None = None) -> AsyncIterator[SocketBackend]:
    """Start ``swtpm socket --tpm2`` on free loopback ports, connect, stop it on exit.

    The chip registration (:meth:`TpmDevice.register`) then sends SelfTest and
    Startup(CLEAR), as the kernel does for a chip that needs it.
    """
    exe = shutil.which("swtpm")
    if exe is None:
        raise BackendError("swtpm is not installed (Debian package 'swtpm'); or pass --tcti")
    state = Path(state_dir) if state_dir else default_state_dir()
    state.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        port = free_port_pair()
        argv = [
            exe, "socket", "--tpm2",
            "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--tpmstate", f"dir={state}",
            "--flags", "not-need-init",
            "--log", f"file={state / 'swtpm.log'},level=1",
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        backend = SocketBackend("127.0.0.1", port)
        try:
            await _wait_connect(backend, proc)
        except BackendError:
            _stop(proc)
            if attempt == 4:
                raise
            continue
        log.info("started swtpm (pid %d) on 127.0.0.1:%d, state in %s", proc.pid, port, state)
        try:
            yield backend
        finally:
            await backend.aclose()
            _stop(proc)
        return


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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()
