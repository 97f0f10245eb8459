# SPDX-License-Identifier: GPL-2.0-only
"""strace output of a program -> a scenario (``python -m cusetpm.conformance from-strace``), or
-> what the program observed (``cusetpm check -- PROGRAM``).

Both are built on :func:`strace_calls`, which yields every call on a node's files with what it
returned.  :func:`scenario_from_strace` writes the calls as a scenario to replay;
:func:`observe_strace` gives each call's operation and its result, normalized exactly as the
conformance runner normalizes a replayed step's (:mod:`.normalize`), for live checking
(:mod:`.live`).
"""

from __future__ import annotations

import os
import re
import select
from dataclasses import dataclass
from typing import Iterator

from .live import ObservedStep
from .normalize import _FileTrack, poll_names

__all__ = ["DEFAULT_NODE_PATTERN", "StraceCall", "strace_calls", "scenario_from_strace", "observe_strace"]


_PID = r"(?:\[pid\s+(?P<p1>\d+)\]\s+|(?P<p2>\d+)\s+)?"
_STRACE_LINE = re.compile(
    _PID
    + r"(?P<call>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+|\?|0x[0-9a-f]+)"
    + r"(?:\s+(?P<errno>E[A-Z0-9]+))?(?P<tail>.*)$"
)
_UNFINISHED = re.compile(r"^(?P<pfx>" + _PID + r")(?P<body>.*?)\s*<unfinished \.\.\.>\s*$")
_RESUMED = re.compile(r"^(?P<pfx>" + _PID + r")<\.\.\. \w+ resumed>\s?(?P<rest>.*)$")
_STRING = r'"(?:[^"\\]|\\.)*"'


def _strace_bytes(s: str) -> bytes:
    """Decode an strace string literal ("\\x80\\x01..."), as printed with -xx."""
    body = s.strip()
    if body.endswith("..."):
        raise ValueError("truncated string in strace output: run strace with -s 65536")
    if not (body.startswith('"') and body.endswith('"')):
        raise ValueError(f"not a string literal: {s[:40]}")
    return body[1:-1].encode("latin-1").decode("unicode_escape").encode("latin-1")


#: The kernel's nodes (/dev/tpmrm0) and cusetpm's own: a FUSE file DIR/tpmrmN, a CUSE /dev/cusetpmrmN.
DEFAULT_NODE_PATTERN = r"(?:.*/)?(?:cuse)?tpmrm\d+"


def _whole_lines(text: str) -> Iterator[str]:
    """The trace's lines, with each call that another process interrupted (``<unfinished
    ...>``) joined to its ``<... resumed>`` rest, as if it had been printed in one piece."""
    pending: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = _UNFINISHED.match(line)
        if m:
            pending[m.group("p1") or m.group("p2") or ""] = m.group("pfx") + m.group("body")
            continue
        m = _RESUMED.match(line)
        if m:
            head = pending.pop(m.group("p1") or m.group("p2") or "", None)
            if head is None:
                continue
            rest = m.group("rest")
            line = head + ("" if rest[:1] in ("", ")", ",") else " ") + rest
        yield line


@dataclass(frozen=True)
class StraceCall:
    """One system call on a node's file, with what it returned."""

    pid: str
    program: str  # the basename of what the process last exec'd ("" if the trace does not say)
    call: str  # open, write, read, pread, poll, setfl, ioctl, lseek, close
    file: str  # a, b, ... by first open; "-" for an open that failed
    words: tuple[str, ...]  # open: rdonly/wronly, nonblock; read: SIZE; poll: in|out|inout, TIMEOUT; ...
    ret: int | None  # the return value (None: strace printed "?", the process died in the call)
    errno: str | None  # its error name when it failed
    data: bytes | None = None  # write: the bytes written; read/pread: the bytes read
    revents: int = 0  # poll: the events returned


def _revents(tail: str) -> int:
    """The mask of ``([{fd=3, revents=POLLIN|POLLRDNORM}])`` after a poll's return value."""
    m = re.search(r"revents=([A-Z|]+)", tail)
    return sum(getattr(select, name, 0) for name in m.group(1).split("|")) if m else 0


def strace_calls(text: str, node_pattern: str = DEFAULT_NODE_PATTERN) -> Iterator[StraceCall]:
    """Every call on a file opened from a path that ``node_pattern`` matches *as a whole*
    (``re.fullmatch``), from strace output (``-f -xx -s 65536``): open/openat, write, read,
    pread64, poll/ppoll, fcntl F_SETFL, ioctl, lseek and close.  Files are named a, b, c, ...
    by first successful open; calls another process interrupted are joined first.
    """
    fds: dict[tuple[str, int], str] = {}
    programs: dict[str, str] = {}
    counter = 0

    def fname() -> str:
        nonlocal counter
        n, counter = counter, counter + 1
        letters = ""
        while True:
            letters = chr(ord("a") + n % 26) + letters
            n = n // 26 - 1
            if n < 0:
                return letters

    for line in _whole_lines(text):
        m = _STRACE_LINE.match(line)
        if not m:
            continue
        pid = m.group("p1") or m.group("p2") or ""
        call, args, ret_text, errno = m.group("call"), m.group("args"), m.group("ret"), m.group("errno")
        ret = None if ret_text == "?" else int(ret_text, 16 if ret_text.startswith("0x") else 10)
        failed = ret is not None and ret < 0
        if call == "execve" and ret == 0:
            pm = re.match(r"\s*(" + _STRING + ")", args)
            if pm:
                programs[pid] = os.path.basename(_strace_bytes(pm.group(1)).decode(errors="replace"))
            continue
        if call in ("clone", "clone3", "fork", "vfork") and ret is not None and ret > 0:
            # The child may have exec'd before the parent's call returned in the trace.
            programs.setdefault(str(ret), programs.get(pid, ""))
            continue
        prog = programs.get(pid, "")
        if call in ("open", "openat"):
            pm = re.search("(" + _STRING + r"),\s*([A-Z_|]+)", args)
            if not pm:
                continue
            path = _strace_bytes(pm.group(1)).decode(errors="replace")
            if not re.fullmatch(node_pattern, path):
                continue
            flags = pm.group(2).split("|")
            words = []
            if "O_RDONLY" in flags:
                words.append("rdonly")
            elif "O_WRONLY" in flags:
                words.append("wronly")
            if "O_NONBLOCK" in flags:
                words.append("nonblock")
            if ret is None or failed:
                yield StraceCall(pid, prog, "open", "-", tuple(words), ret, errno)
                continue
            f = fname()
            fds[(pid, ret)] = f
            yield StraceCall(pid, prog, "open", f, tuple(words), ret, errno)
            continue
        fdm = re.match(r"\s*\[?\{?\s*(?:fd=)?(\d+)", args)
        if not fdm:
            continue
        key = (pid, int(fdm.group(1)))
        if key not in fds:
            continue
        f = fds[key]
        rest = args.split(",", 1)[1] if "," in args else ""
        if call == "write":
            buf, _, count = rest.rpartition(",")
            data = _strace_bytes(buf) if buf.strip().startswith('"') else None
            yield StraceCall(pid, prog, "write", f, (count.strip(),), ret, errno, data)
        elif call in ("read", "pread64"):
            size = rest.split(",")[-2 if call == "pread64" else -1].strip()
            buf = rest.rsplit(",", 2 if call == "pread64" else 1)[0]
            data = _strace_bytes(buf) if ret is not None and ret > 0 else None
            yield StraceCall(pid, prog, "read" if call == "read" else "pread", f, (size,), ret, errno, data)
        elif call in ("poll", "ppoll"):
            ev = re.search(r"events=([A-Z|]+)", args)
            kinds = set(ev.group(1).split("|")) if ev else set()
            which = "inout" if {"POLLIN", "POLLOUT"} <= kinds else "out" if "POLLOUT" in kinds else "in"
            tm = re.search(r"\],\s*\d+,\s*(-?\d+)\s*$", args)
            timeout = tm.group(1) if tm and call == "poll" else "1000"
            if timeout == "-1":
                timeout = "10000"
            yield StraceCall(pid, prog, "poll", f, (which, timeout), ret, errno, revents=_revents(m.group("tail")))
        elif call == "fcntl" and "F_SETFL" in args:
            yield StraceCall(pid, prog, "setfl", f, ("nonblock" if "O_NONBLOCK" in args else "block",), ret, errno)
        elif call == "ioctl":
            yield StraceCall(pid, prog, "ioctl", f, (rest.split(",")[0].strip(),), ret, errno)
        elif call == "lseek":
            yield StraceCall(pid, prog, "lseek", f, (), ret, errno)
        elif call == "close":
            del fds[key]
            yield StraceCall(pid, prog, "close", f, (), ret, errno)


def scenario_from_strace(text: str, node_pattern: str = DEFAULT_NODE_PATTERN, name: str = "recorded") -> str:
    """Turn strace output (``-f -xx -s 65536``) of a program into a scenario.

    Only calls on files opened from a path that ``node_pattern`` matches *as a whole*
    (``re.fullmatch``) are kept: open/openat (access mode and O_NONBLOCK), write, read (the
    size asked for), poll/ppoll, fcntl F_SETFL, close.  Files are named a, b, c, ... by first
    open.  A trace in which no path matches is a ValueError, not an empty scenario.
    """
    out = ["# recorded from strace by cusetpm.conformance from-strace", f"scenario {name}"]
    opened = False
    for c in strace_calls(text, node_pattern):
        if c.call == "open":
            if c.file != "-":
                opened = True
                out.append(" ".join(["open", c.file, *c.words]))
        elif c.call == "write":
            if c.data is None:
                raise ValueError(f"the bytes of a write on file {c.file} are not in the trace (run strace with -xx)")
            out.append(f"write {c.file} {c.data.hex()}")
        elif c.call in ("read", "poll", "setfl", "close"):
            out.append(" ".join([c.call, c.file, *c.words]))
    if not opened:
        raise ValueError(
            f"no file in the trace was opened from a path matching {node_pattern!r} "
            "(the pattern must match the whole path, e.g. '.*/tpmrm0')"
        )
    return "\n".join(out) + "\n"


def _observed(c: StraceCall, tracks: dict[str, _FileTrack]) -> tuple[str, str]:
    """The operation and the normalized result of one call, as the runner gives a replayed
    step's (:class:`~.normalize._FileTrack` tracks each file's response being read)."""
    track = tracks.setdefault(c.file, _FileTrack(-1))
    if c.call == "write":
        size = len(c.data) if c.data is not None else int(c.words[0]) if c.words[0].isdigit() else 0
        head = f" cc=0x{int.from_bytes(c.data[6:10], 'big'):x}" if c.data is not None and len(c.data) >= 10 else ""
        op = f"write {c.file} len={size}{head}"  # never the bytes: they carry nonces
    elif c.call == "poll":
        op = f"poll {c.file} {c.words[0]}"  # not the timeout: a program may compute it
    else:
        op = " ".join([c.call, c.file, *c.words])
    if c.ret is None:
        return op, "?"
    if c.ret < 0:
        if c.call in ("read", "pread"):
            track.resp = bytearray()
            track.complete = False
        return op, c.errno or f"errno{-c.ret}"
    if c.call == "open":
        tracks[c.file] = _FileTrack(c.ret)
        return op, "ok"
    if c.call == "write":
        if c.ret > 0 and c.data is not None:
            track.written(c.data)
        return op, str(c.ret)
    if c.call in ("read", "pread"):
        return op, track.got(c.data or b"", raw=False)
    if c.call == "poll":
        return op, poll_names(c.revents if c.ret > 0 else 0)
    if c.call in ("setfl", "ioctl"):
        return op, "ok" if c.ret == 0 else str(c.ret)
    if c.call == "close":
        tracks.pop(c.file, None)
    return op, str(c.ret)


def observe_strace(text: str, node_pattern: str = DEFAULT_NODE_PATTERN) -> list[ObservedStep]:
    """What a program observed of a node, from strace output (``-f -xx -s 65536``): per call,
    the file, the operation (a write's length and command code, never its bytes), the result
    normalized as :mod:`.runner` normalizes it (random bytes are never kept), and the program
    that made it.  A trace in which no path matches gives no steps."""
    tracks: dict[str, _FileTrack] = {}
    steps: list[ObservedStep] = []
    for c in strace_calls(text, node_pattern):
        op, result = _observed(c, tracks)
        steps.append({"file": c.file, "op": op, "result": result, "program": c.program})
    return steps
