# SPDX-License-Identifier: GPL-2.0-only
"""A swtpm started synchronously for a test or the benchmark.

The command line comes from :func:`cusetpm.backends.swtpm_argv`, the one place it is built.
:meth:`Swtpm.start` picks a free loopback port pair, waits until both the data and the
control channel accept, and :meth:`Swtpm.stop` stops it and removes its state.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cusetpm.backends import free_port_pair, swtpm_argv
from cusetpm.backends.swtpm import PROBE, abstract_listener

#: swtpm's --flags for a TPM that is up and started (Startup(CLEAR) done by swtpm itself).
STARTED = "not-need-init,startup-clear"
#: ... and for one that still wants Startup, as a freshly powered TPM (cusetpm's managed one).
NEEDS_STARTUP = "not-need-init"


def can_connect(port: int, timeout: float = 1.0) -> bool:
    """Does something accept on 127.0.0.1:port?  (The probe connection is closed at once.)
    A probe that connected to itself (its source port picked as ``port``, see
    cusetpm.backends.socket.connect_tcp) found nobody."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as probe:
            return probe.getsockname() != probe.getpeername()
    except OSError:
        return False


@dataclass
class Swtpm:
    """``swtpm socket --tpm2`` on 127.0.0.1:``port`` (control channel on ``port + 1``)."""

    proc: subprocess.Popen[bytes]
    port: int
    state_dir: Path
    #: swtpm's stderr, a file in the state dir.
    stderr_path: Path
    keep_state: bool = False
    #: The Unix socket it serves on instead (:meth:`start_unix`; ``port`` is then 0).
    unix: str | None = None

    @classmethod
    def start_unix(
        cls, state_dir: str | os.PathLike[str], *, flags: str | None = STARTED, timeout: float = 10.0
    ) -> Swtpm:
        """A fresh swtpm serving on a Unix socket in the abstract namespace, as cusetpm's
        managed swtpm does (:class:`cusetpm.backends.swtpm.ManagedSwtpm`); no control channel."""
        state = Path(state_dir)
        state.mkdir(parents=True, exist_ok=True)
        stderr_path = state / "swtpm.stderr"
        listener, address = abstract_listener("cusetpm-bench-swtpm")
        with listener, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                swtpm_argv(state, 0, flags=flags, listen_fd=listener.fileno()),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, pass_fds=(listener.fileno(),),
            )  # fmt: skip
        swtpm = cls(proc, 0, state, stderr_path, unix=address)
        try:  # an answer to a probe says it serves (a connect() succeeds before that)
            with swtpm.connect(timeout) as probe:
                probe.sendall(PROBE)
                if len(probe.recv(4096)) < 10:
                    raise OSError("no answer")
        except OSError as exc:
            swtpm.stop()
            raise RuntimeError(f"swtpm did not start ({exc}): {swtpm.stderr().strip()[-400:]}") from None
        return swtpm

    @classmethod
    def start(
        cls,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        flags: str | None = STARTED,
        attempts: int = 5,
        timeout: float = 10.0,
        keep_state: bool = False,
        extra: Sequence[str] = (),
    ) -> Swtpm:
        """A fresh swtpm with state in ``state_dir`` (None: a new temporary directory) and
        swtpm's ``--flags`` (None: none, the TPM then waits for an init on the control port).

        Retries on other ports when one was taken meanwhile; raises RuntimeError with swtpm's
        stderr when it does not come up.
        """
        state = Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(prefix="cusetpm-swtpm-"))
        state.mkdir(parents=True, exist_ok=True)
        stderr_path = state / "swtpm.stderr"
        why = "no attempt"
        for _ in range(attempts):
            port = free_port_pair()
            with open(stderr_path, "wb") as err:
                proc = subprocess.Popen(
                    swtpm_argv(state, port, flags=flags, extra=extra),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                )  # fmt: skip
            swtpm = cls(proc, port, state, stderr_path, keep_state)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                # Both channels listen; the probes close before any real client connects
                # (swtpm serves one data client at a time).
                if can_connect(port + 1) and can_connect(port):
                    return swtpm
                time.sleep(0.02)
            if proc.poll() is None:
                why = f"not accepting on 127.0.0.1:{port} within {timeout:.0f} s"
            else:
                why = f"exited with status {proc.returncode}"
            text = swtpm.stderr().strip()
            if text:
                why += f": {text[-400:]}"
            swtpm._terminate()
        if not keep_state:
            shutil.rmtree(state, ignore_errors=True)
        raise RuntimeError(f"swtpm did not start ({why})")

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def connect(self, timeout: float | None = 30.0) -> socket.socket:
        """A data-channel connection (TCP_NODELAY; ``timeout`` None: blocking); swtpm serves
        one such client at a time."""
        if self.unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.unix)
            except OSError:
                sock.close()
                raise
            return sock
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def running(self) -> bool:
        return self.proc.poll() is None

    def _terminate(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it hangs), then remove the state dir unless ``keep_state``."""
        self._terminate()
        if not self.keep_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)
