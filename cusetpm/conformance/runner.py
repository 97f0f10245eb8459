# SPDX-License-Identifier: GPL-2.0-only
"""Run one scenario against one node with real system calls: :func:`run_scenario`."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import time
from typing import Callable

from .normalize import StepResult, Transcript, _FileTrack, poll_names
from .scenario import _OPEN_MODES, _POLL_EVENTS, Scenario, Step, _Undefined, build_command, build_data

__all__ = ["run_scenario"]


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, f"errno{exc.errno}")


class _Runner:
    def __init__(
        self, scenario: Scenario, node: str, kernel: str | None, after_close: Callable[[], None] | None
    ) -> None:
        self.sc = scenario
        self.node = node
        self.kernel = kernel
        self.after_close = after_close
        self.files: dict[str, _FileTrack] = {}
        self.vars: dict[str, bytes] = {}

    def _file(self, name: str) -> _FileTrack:
        try:
            return self.files[name]
        except KeyError:
            raise _HarnessError(f"file {name!r} is not open") from None

    def do(self, step: Step) -> str:
        op, a = step.op, step.args
        try:
            if op == "open":
                if a[0] in self.files:
                    raise _HarnessError(f"file {a[0]!r} is already open")
                flags = os.O_RDWR
                for word in a[1:]:
                    if word in _OPEN_MODES:
                        flags = (flags & ~os.O_ACCMODE) | _OPEN_MODES[word]
                    else:
                        flags |= os.O_NONBLOCK
                self.files[a[0]] = _FileTrack(os.open(self.node, flags | os.O_CLOEXEC))
                return "ok"
            if op == "close":
                f = self.files.pop(a[0], None)
                if f is None:
                    raise _HarnessError(f"file {a[0]!r} is not open")
                os.close(f.fd)
                if self.after_close is not None:
                    self.after_close()
                return "0"
            if op in ("write", "cmd"):
                f = self._file(a[0])
                data = build_data(a[1:], self.vars) if op == "write" else build_command(a[1:], self.vars)
                n = os.write(f.fd, data)
                if n > 0:
                    f.written(data)
                return str(n)
            if op == "read":
                f = self._file(a[0])
                try:
                    data = os.read(f.fd, int(a[1]))
                except OSError:
                    f.resp = bytearray()
                    f.complete = False
                    raise
                return f.got(data, raw=len(a) == 3)
            if op == "poll":
                f = self._file(a[0])
                events = _POLL_EVENTS["inout"]
                timeout = 0
                for x in a[1:]:
                    if x in _POLL_EVENTS:
                        events = _POLL_EVENTS[x]
                    else:
                        timeout = int(x)
                p = select.poll()
                p.register(f.fd, events)
                got = p.poll(timeout)
                return poll_names(got[0][1] if got else 0)
            if op == "setfl":
                f = self._file(a[0])
                flags = fcntl.fcntl(f.fd, fcntl.F_GETFL)
                flags = flags | os.O_NONBLOCK if a[1] == "nonblock" else flags & ~os.O_NONBLOCK
                fcntl.fcntl(f.fd, fcntl.F_SETFL, flags)
                return "ok"
            if op == "lseek":
                return str(os.lseek(self._file(a[0]).fd, 0, os.SEEK_CUR))
            if op == "pread":
                f = self._file(a[0])
                return f.got(os.pread(f.fd, int(a[1]), 0), raw=False)
            if op == "ioctl":
                import termios

                fcntl.ioctl(self._file(a[0]).fd, termios.TCGETS, bytes(64))
                return "ok"
            if op == "save":
                f = self._file(a[1])
                off = int(a[2])
                end = off + int(a[3]) if len(a) == 4 else len(f.resp)
                if off > len(f.resp) or end > len(f.resp) or end <= off:
                    return f"ERR save: the last response on {a[1]} has {len(f.resp)} bytes"
                self.vars[a[0]] = bytes(f.resp[off:end])
                return "ok"
            if op == "let":
                self.vars[a[0]] = build_data(a[1:], self.vars)
                return "ok"
            if op == "sleep":
                time.sleep(float(a[0]))
                return "ok"
            if op in ("readfault", "writefault"):
                f = self._file(a[0])
                n = _fault_io(op == "readfault", f.fd, int(a[1]))
                if op == "readfault":
                    f.resp = bytearray()
                    f.complete = False
                return str(n)
            raise _HarnessError(f"unknown operation {op}")
        except OSError as exc:
            return _errname(exc)
        except _Undefined as exc:
            return f"ERR undefined variable {exc.args[0]}"

    def close_all(self) -> None:
        for f in self.files.values():
            with contextlib.suppress(OSError):
                os.close(f.fd)
        self.files.clear()


def _fault_io(read: bool, fd: int, size: int) -> int:
    """read(2)/write(2) with a buffer in an inaccessible (PROT_NONE) mapping: EFAULT."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    length = max(mmap.PAGESIZE, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
    prot_none = 0
    addr = libc.mmap(None, length, prot_none, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise _HarnessError("mmap failed")
    try:
        call = libc.read if read else libc.write
        call.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        call.restype = ctypes.c_ssize_t
        n = call(fd, addr, size)
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return n
    finally:
        libc.munmap(addr, length)


class _HarnessError(Exception):
    """The scenario itself is wrong (e.g. uses a file it never opened)."""


def run_scenario(
    scenario: Scenario,
    node: str,
    *,
    kernel: str | None = None,
    close_settle: float = 0.0,
    after_close: Callable[[], None] | None = None,
) -> Transcript:
    """Run ``scenario`` against ``node`` with real syscalls; return its transcript.

    The transcript (:class:`~.normalize.Transcript`) is ``{"steps": [{"line", "op", "result",
    "expected", "expect_ok"}...], "error": None | str, "seconds": float}``.  ``kernel``
    selects kernel-specific expectations (``=>6.1``); ``after_close`` runs after each
    close(2) (FUSE: wait for the RELEASE, see :func:`.sides.fuse_close_waiter`), else
    ``close_settle`` seconds of pause.
    """
    if after_close is None and close_settle:
        after_close = lambda: time.sleep(close_settle)  # noqa: E731
    runner = _Runner(scenario, node, kernel, after_close)
    for name, tokens in scenario.lets.items():
        runner.vars[name] = build_data(tokens, runner.vars)
    steps: list[StepResult] = []
    error = None
    t0 = time.monotonic()
    try:
        for step in scenario.steps:
            try:
                result = runner.do(step)
            except _HarnessError as exc:
                result = f"ERR {exc}"
            want = step.expected_for(kernel)
            ok = None
            if want is not None:
                got = result.split()
                ok = all(t in got for t in want)
            steps.append(
                {
                    "line": step.line,
                    "op": step.text,
                    "result": result,
                    "expected": " ".join(want) if want is not None else None,
                    "expect_ok": ok,
                }
            )
    except Exception as exc:  # noqa: BLE001 - reported in the transcript
        error = f"{type(exc).__name__}: {exc}"
    finally:
        runner.close_all()
    return {"steps": steps, "error": error, "seconds": round(time.monotonic() - t0, 3)}
