# SPDX-License-Identifier: GPL-2.0-only
"""The two sides of a comparison, started fresh inside the guest for every scenario.

:class:`KernelChip` is the genuine kernel resource manager behind a ``swtpm chardev
--vtpm-proxy``; :class:`ForkedDaemon` is ``cusetpm serve`` with its own fresh swtpm.  On FUSE,
:func:`fuse_close_waiter` makes close(2) as synchronous as the kernel's.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["SideError", "KernelChip", "ForkedDaemon", "fuse_close_waiter", "mount_fusectl"]

#: Seconds the runner waits after close(2) of a FUSE file (FUSE sends RELEASE asynchronously).
FUSE_CLOSE_SETTLE = 0.25


class _Side:
    """One side of a comparison that may need to be started more than once."""

    MAX_ATTEMPTS = 3
    READY_TIMEOUT = 20.0
    attempts: int

    def _wait(self, timeout: float) -> str:
        raise NotImplementedError

    def _restart(self) -> None:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def ready(self, timeout: float | None = None) -> str:
        """Wait until the side serves its node; start it again (up to MAX_ATTEMPTS times in
        all) if it fails to.  Returns the node path."""
        while True:
            try:
                return self._wait(self.READY_TIMEOUT if timeout is None else timeout)
            except SideError:
                if self.attempts >= self.MAX_ATTEMPTS:
                    raise
                self.stop()
                self._restart()


class SideError(RuntimeError):
    """A kernel chip or a daemon could not be started."""


class KernelChip(_Side):
    """A fresh ``swtpm chardev --vtpm-proxy``: the real kernel RM at /dev/tpmrmN."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.node: str | None = None
        self.attempts = 0
        self._start()

    def _start(self) -> None:
        self.attempts += 1
        state = self.workdir / f"state{self.attempts}"
        state.mkdir(parents=True)
        self.out = self.workdir / f"swtpm{self.attempts}.out"
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    "swtpm",
                    "chardev",
                    "--vtpm-proxy",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={state}",
                    "--flags",
                    "not-need-init",
                    "--log",
                    f"file={state}/swtpm.log,level=1",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started = time.monotonic()

    #: Registration can time out under load; ready() then retries with a new swtpm.
    READY_TIMEOUT = 20.0

    def _restart(self) -> None:
        self._start()

    def _wait(self, timeout: float) -> str:
        deadline = self.started + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            m = re.search(rb"New TPM device: /dev/tpm(\d+)", self.out.read_bytes())
            if m:
                n = int(m.group(1))
                node = f"/dev/tpmrm{n}"
                if os.path.exists(f"/sys/class/tpmrm/tpmrm{n}") and _is_chardev(node):
                    self.node = node
                    return node
            if self.proc.poll() is not None:
                out = self.out.read_text(errors="replace")
                raise SideError(f"swtpm chardev exited ({self.proc.returncode}): {out}")
            time.sleep(0.02)
        raise SideError(f"kernel chip did not appear in {timeout}s: {self.out.read_text(errors='replace')}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def terminate(self) -> None:
        """Ask swtpm to exit; the kernel then unregisters the chip.  See :meth:`wait`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait(self, timeout: float = 2.0) -> None:
        """Reap swtpm; SIGKILL if it ignores SIGTERM (it does while it waits for the rest of
        a short frame)."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self.node = None

    def done(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def stop(self) -> None:
        self.terminate()
        self.wait()


def _is_chardev(path: str) -> bool:
    import stat

    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


FUSECTL = "/sys/fs/fuse/connections"


def fuse_close_waiter(node: str, timeout: float = 10.0) -> Callable[[], None]:
    """After close(2) of a FUSE file, wait for the daemon to finish the RELEASE.

    The kernel's /dev/tpmrm0 flushes sessions before close returns; FUSE queues RELEASE in
    the background.  The FUSE control file system counts every request the daemon has not
    answered yet (``waiting``, background requests included), so "0" means the release has
    run.  Without fusectl this falls back to a fixed pause of FUSE_CLOSE_SETTLE seconds.
    """
    st = os.stat(node)
    conn = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
    waiting = os.path.join(FUSECTL, str(conn), "waiting")
    if not os.path.exists(waiting):
        return lambda: time.sleep(FUSE_CLOSE_SETTLE)

    def wait() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(waiting) as fh:
                if fh.read().strip() == "0":
                    return
            time.sleep(0.002)

    return wait


def _auto_close_waiter(node: str) -> Callable[[], None] | None:
    """The FUSE close waiter if ``node`` is a file on a FUSE mount (with fusectl), else None."""
    try:
        st = os.stat(node)
    except OSError:
        return None
    conn = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
    if os.path.exists(os.path.join(FUSECTL, str(conn), "waiting")) and not _is_chardev(node):
        return fuse_close_waiter(node)
    return None


def mount_fusectl() -> None:
    """Mount the FUSE control file system if it is not (needs root; the guest is root)."""
    with open("/proc/mounts") as fh:
        if any(line.split()[2] == "fusectl" for line in fh):
            return
    if os.path.isdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)


class ForkedDaemon(_Side):
    """``cusetpm serve`` as a child process, forked from this (pre-imported) interpreter.

    The child runs the real command line, :func:`cusetpm.cli.main`, with a fresh
    ``--state-dir`` (so its own fresh swtpm) and ``--ready-fd``: the write end of a pipe on
    which the daemon writes its node's path once it serves; forking only saves the seconds
    Python needs to import trio, pyfuse3 and tpm2-pytss under TCG for every scenario.
    """

    #: The child's descriptor for the write end of the ready pipe.
    READY_FD = 3

    def __init__(self, workdir: Path, kernel: str, node_kind: str, index: int, extra: Sequence[str] = ()) -> None:
        from .. import cli  # noqa: F401 - imported before fork, in the parent

        self.base = workdir
        self.kernel = kernel
        self.node_kind = node_kind
        self.index = index
        self.extra = list(extra)
        self.attempts = 0
        self.node: str | None = None
        self._ready_r: int | None = None  # the read end of the current try's ready pipe
        self._ready = b""
        self._fork()

    def _fork(self) -> None:
        self.attempts += 1
        self.workdir = self.base / f"try{self.attempts}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "daemon.log"
        if self.node_kind == "fuse":
            where = ["--fuse", str(self.workdir / "mnt")]
        elif self.node_kind == "cuse":
            where = ["--cuse", f"cusetpm-conf{os.getpid()}-{self.index}-{self.attempts}"]
        else:
            raise ValueError(f"unknown node kind {self.node_kind!r}")
        self.argv = [
            "serve",
            *where,
            "--kernel",
            self.kernel,
            "--state-dir",
            str(self.workdir / "state"),
            "--ready-fd",
            str(self.READY_FD),
            "--control",
            "off",
            *self.extra,
        ]
        self.returncode: int | None = None
        self._terminated = False
        self.started = time.monotonic()
        sys.stdout.flush()
        sys.stderr.flush()
        self._close_ready()
        self._ready = b""
        ready_r, ready_w = os.pipe()
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pid = os.fork()
        if pid == 0:  # child
            rc = 70
            try:
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                if ready_w != self.READY_FD:
                    os.dup2(ready_w, self.READY_FD)
                os.closerange(self.READY_FD + 1, 4096)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
                    signal.signal(sig, signal.SIG_DFL)
                sys.argv = ["cusetpm", *self.argv]
                from ..cli import main

                rc = main(self.argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(rc)
        os.close(log_fd)
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        self._ready_r = ready_r
        self.pid = pid

    def _close_ready(self) -> None:
        if self._ready_r is not None:
            os.close(self._ready_r)
            self._ready_r = None

    def _ready_line(self, wait: float) -> str | None:
        """The node path from the ready pipe once its line is complete, else None after
        waiting up to ``wait`` seconds for more of it."""
        if self._ready_r is None:  # EOF without a line: the daemon is on its way out
            time.sleep(wait)
            return None
        readable, _, _ = select.select([self._ready_r], [], [], wait)
        if readable:
            data = os.read(self._ready_r, 4096)
            if not data:
                self._close_ready()
            self._ready += data
        line, newline, _ = self._ready.partition(b"\n")
        return line.decode(errors="replace") if newline and line else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _reap(self, block: bool) -> bool:
        if self.returncode is not None:
            return True
        pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.returncode = os.waitstatus_to_exitcode(status)
        return True

    #: A daemon that exits before it signals readiness is started again with a fresh state
    #: directory: under TCG and a loaded host, a fresh swtpm's first SelfTest can exceed the
    #: kernel's 2 s duration, which the daemon reproduces faithfully.
    READY_TIMEOUT = 60.0

    def _restart(self) -> None:
        self._fork()

    def _wait(self, timeout: float) -> str:
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            node = self._ready_line(min(0.02, max(0.0, deadline - time.monotonic())))
            if node:
                self.node = node
                self._close_ready()
                return self.node
            if self._reap(block=False):
                raise SideError(f"cusetpm exited with status {self.returncode}:\n{self.log()}")
        self.kill()
        raise SideError(f"cusetpm did not start in {timeout}s:\n{self.log()}")

    def close_waiter(self) -> Callable[[], None] | None:
        """For FUSE: a function that waits until the daemon has answered every request of
        this mount -- in particular the RELEASE that FUSE sends after close(2) returned."""
        if self.node_kind != "fuse" or self.node is None:
            return None
        return fuse_close_waiter(self.node)

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM, once (a second one during the daemon's shutdown would kill it)."""
        if self.returncode is None and not self._terminated:
            self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)

    def done(self) -> bool:
        return self._reap(block=False)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; SIGKILL (and a lazy unmount) if it does not exit in time."""
        if self.returncode is None:
            self.terminate()
            deadline = time.monotonic() + timeout
            while not self._reap(block=False) and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.returncode is None:
                self.kill()
                self._reap(block=True)
                self.returncode = self.returncode if self.returncode is not None else -9
        self._close_ready()
        mnt = self.workdir / "mnt"
        if mnt.exists() and os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        return self.returncode
