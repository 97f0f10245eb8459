# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py's rig: every process, mount and directory the benchmark makes.

The swtpms come from :mod:`cusetpm.testing.swtpm`, the daemons from
:mod:`cusetpm.testing.daemon` and the counting relays from :mod:`cusetpm.testing.relay`;
this adds tpm2-abrmd on a private D-Bus session bus, and undoes everything in phases.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .daemon import DaemonError, start_serve, unmount
from .relay import CountingRelay
from .swtpm import NEEDS_STARTUP, STARTED, Swtpm

#: The working tree the daemons run from (``python -m cusetpm`` in it).
ROOT = Path(__file__).resolve().parent.parent.parent

# --- processes ---------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream:
            stream.close()


def wait_until(
    pred: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with status {proc.returncode}")
        time.sleep(0.02)
    raise RuntimeError(f"{what}: not ready within {timeout:.0f} s")


def serve_offers(option: str) -> bool:
    """Does this tree's ``cusetpm serve`` have ``option`` (its ``--help`` names it)?"""
    r = subprocess.run(
        [sys.executable, "-m", "cusetpm", "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    return r.returncode == 0 and re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", r.stdout) is not None


class Rig:
    """Owns every process, mount and directory the benchmark makes; undoes them all."""

    def __init__(self) -> None:
        self.base = contextlib.ExitStack()
        self.tmp = Path(tempfile.mkdtemp(prefix="cusetpm-bench-"))
        self.base.callback(shutil.rmtree, self.tmp, ignore_errors=True)
        #: Where what is started now is undone: the current phase's stack (see phase()).
        self.stack = self.base
        self._n = 0
        self._bus: str | None = None
        self._abrmds = 0
        #: The server process behind each node path and abrmd TCTI conf this rig returned.
        self.pids: dict[str, int] = {}

    def close(self) -> None:
        self.base.close()

    @contextlib.contextmanager
    def phase(self) -> Iterator[None]:
        """Everything started inside is stopped on leaving (the bus and temp dir stay)."""
        with contextlib.ExitStack() as stack:
            self.stack = stack
            try:
                yield
            finally:
                self.stack = self.base

    def dir(self, name: str) -> Path:
        self._n += 1
        d = self.tmp / f"{self._n:02d}-{name}"
        d.mkdir()
        return d

    def popen(self, argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        with open(log, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err, **kw)
        self.stack.callback(stop_process, proc)
        return proc

    def swtpm(self, name: str, startup: bool = True) -> int:
        """A fresh swtpm with cusetpm's managed arguments; returns its data port."""
        return self.start_swtpm(name, startup).port

    def start_swtpm(self, name: str, startup: bool = True, unix: bool = False) -> Swtpm:
        """The same, the whole :class:`Swtpm` (its process, for one the bench pins to a CPU);
        ``unix``: on a Unix socket, as the daemon's managed swtpm."""
        flags = STARTED if startup else NEEDS_STARTUP
        swtpm = Swtpm.start_unix(self.dir(name), flags=flags) if unix else Swtpm.start(self.dir(name), flags=flags)
        self.stack.callback(swtpm.stop)
        return swtpm

    def node(self, name: str, kernel: str, tcti: str | None = None, extra: tuple[str, ...] = ()) -> str:
        """``cusetpm serve --fuse``; returns the node's path once the daemon says it serves
        (on its ``--ready-fd``)."""
        work = self.dir(name)
        mnt = work / "mnt"
        args = ["--fuse", str(mnt), "--kernel", kernel]
        args += ["--tcti", tcti] if tcti else ["--state-dir", str(work / "swtpm")]
        args += ["--control", "off", *extra]
        # Registered before the daemon so it runs after it stopped: a daemon that could not
        # unmount (killed) leaves a dead mount behind.
        self.stack.callback(unmount, mnt)
        try:
            served = start_serve(args, log_path=work / "stderr", mount=mnt, cwd=ROOT, timeout=30)
        except DaemonError as exc:
            if exc.why.startswith("exited"):
                raise RuntimeError(f"cusetpm ({name}) {exc.why}: {exc.log.strip()[-400:]}") from None
            raise RuntimeError(f"cusetpm ({name}) did not serve within 30 s") from None
        self.stack.callback(served.stop, timeout=10.0)
        self.pids[str(served.node)] = served.proc.pid
        return str(served.node)

    def bus(self) -> str:
        """One private D-Bus session bus for the whole run (GLib keeps one session-bus
        connection per process, so the tabrmd TCTI must find the same bus every time)."""
        if self._bus is None:
            work = self.dir("dbus")
            stack, self.stack = self.stack, self.base
            try:
                bus = self.popen(
                    ["dbus-daemon", "--session", "--nofork", "--print-address=1",
                     f"--address=unix:path={work / 'bus'}"],
                    work / "stderr", stdout=subprocess.PIPE)  # fmt: skip
            finally:
                self.stack = stack
            assert bus.stdout is not None
            address = bus.stdout.readline().decode().strip()
            if not address:
                raise RuntimeError("dbus-daemon printed no address")
            os.environ["DBUS_SESSION_BUS_ADDRESS"] = address
            self._bus = address
        return self._bus

    def abrmd(self, name: str, tpm_port: int, extra: tuple[str, ...] = ()) -> str:
        """tpm2-abrmd on the private bus under a name of its own; returns the client TCTI conf."""
        work = self.dir(name)
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.bus())
        self._abrmds += 1
        dbus_name = f"com.intel.tss2.Tabrmd.Bench{self._abrmds}"
        proc = self.popen(
            ["tpm2-abrmd", "--session", "--allow-root", "--logger=stdout", f"--dbus-name={dbus_name}",
             f"--tcti=swtpm:host=127.0.0.1,port={tpm_port}", *extra],
            work / "stderr", stdout=subprocess.DEVNULL, env=env)  # fmt: skip

        def owned() -> bool:
            r = subprocess.run(
                ["dbus-send", "--session", "--print-reply", "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                 "org.freedesktop.DBus.NameHasOwner", f"string:{dbus_name}"],
                env=env, capture_output=True, text=True)  # fmt: skip
            return "boolean true" in r.stdout

        wait_until(owned, 20, "tpm2-abrmd", proc)
        conf = f"bus_name={dbus_name},bus_type=session"
        self.pids[conf] = proc.pid
        return conf

    def relay(self, target_port: int) -> CountingRelay:
        r = CountingRelay(target_port)
        self.stack.callback(r.close)
        return r
