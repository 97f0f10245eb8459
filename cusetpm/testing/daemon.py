# SPDX-License-Identifier: GPL-2.0-only
"""``python -m cusetpm serve`` as a subprocess, for tests and the benchmark.

:func:`start_serve` passes the daemon a pipe as ``--ready-fd`` and returns once the daemon
has written the node's path to it (never by reading its output); :meth:`Served.stop` sends
SIGTERM and waits, and if the daemon hangs kills it and lazily unmounts its FUSE mount.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class DaemonError(RuntimeError):
    """The daemon did not come up: ``why`` ("exited with status N" or "did not serve within
    T s"), its command line and its output so far."""

    def __init__(self, why: str, argv: Sequence[str], log: str) -> None:
        super().__init__(f"cusetpm did not start ({why}): {' '.join(argv)}\nlog:\n{log}")
        self.why = why
        self.argv = list(argv)
        self.log = log


def mounted(path: str | os.PathLike[str]) -> bool:
    """Is ``path`` a mount point in this mount namespace?  (Also for a dead FUSE mount,
    where ``os.path.ismount`` cannot stat it.)"""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == target:
                return True
    return False


def unmount(mount: str | os.PathLike[str]) -> bool:
    """Lazily unmount a FUSE mount a daemon left behind; True if it is gone."""
    if not mounted(mount):
        return True
    for argv in (["fusermount3", "-u", "-z", str(mount)], ["umount", "-l", str(mount)]):
        if subprocess.run(argv, capture_output=True).returncode == 0:
            return True
    return not mounted(mount)


@dataclass
class Served:
    """One running ``cusetpm serve``: its process, the node it serves and its output."""

    proc: subprocess.Popen[bytes]
    node: Path
    #: stdout and stderr of the daemon, together.
    log_path: Path
    argv: list[str]
    #: The FUSE mount directory, unmounted by :meth:`stop` if the daemon had to be killed.
    mount: Path | None = None
    returncode: int | None = field(default=None, init=False)
    #: Set by :meth:`stop` when the daemon did not exit by itself in time.
    killed: bool = field(default=False, init=False)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` (once) and wait for the exit status.  A daemon that does not exit in
        ``timeout`` seconds is killed and its mount lazily unmounted (``killed`` is set)."""
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.returncode = self.proc.returncode
        return self.returncode

    def kill(self) -> None:
        """SIGKILL, wait, ``fusermount3 -u -z`` the mount."""
        self.killed = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.mount is not None:
            unmount(self.mount)


def serve_argv(args: Sequence[str], python: str = sys.executable) -> list[str]:
    # No control socket unless the caller asks: tests and benches run many daemons at once,
    # and the default path is one per user.
    control = [] if "--control" in args else ["--control", "off"]
    return [python, "-m", "cusetpm", "serve", *args, *control]


def start_serve(
    args: Sequence[str],
    *,
    log_path: Path,
    mount: Path | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT,
    python: str = sys.executable,
) -> Served:
    """Run ``python -m cusetpm serve ARGS --ready-fd N`` and wait for the node's path on N.

    stdout and stderr go to ``log_path``.  The daemon runs in a session of its own, so a ^C
    meant for the caller does not reach it twice.  Raises :class:`DaemonError` (with the
    daemon's output) if it exits first or says nothing within ``timeout`` seconds; a daemon
    that timed out is killed first.
    """
    read_fd, write_fd = os.pipe()
    argv = serve_argv([*args, "--ready-fd", str(write_fd)], python)
    try:
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=None if env is None else dict(env), stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT, pass_fds=(write_fd,), start_new_session=True,
            )  # fmt: skip
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    served = Served(proc, Path(), log_path, argv, mount)
    try:
        line = _read_line(read_fd, time.monotonic() + timeout)
    finally:
        os.close(read_fd)
    if line is None:  # timed out
        served.kill()
        raise DaemonError(f"did not serve within {timeout:.0f} s", argv, served.log())
    if not line.endswith(b"\n"):  # EOF: it exited (or closed the pipe) without serving
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            served.kill()
        raise DaemonError(f"exited with status {proc.returncode}", argv, served.log())
    served.node = Path(line.decode().rstrip("\n"))
    return served


def _read_line(fd: int, deadline: float) -> bytes | None:
    """What arrives on ``fd`` up to a newline or EOF; None if the deadline passes first."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data
