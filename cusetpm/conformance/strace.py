# SPDX-License-Identifier: GPL-2.0-only
"""strace output of a program -> a scenario (``python -m cusetpm.conformance from-strace``)."""

from __future__ import annotations

import re

__all__ = ["scenario_from_strace"]


_STRACE_LINE = re.compile(r"^(?:\[pid\s+(\d+)\]\s+|(\d+)\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+|\?)(?:\s+(\w+))?")


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


def scenario_from_strace(text: str, node_pattern: str = DEFAULT_NODE_PATTERN, name: str = "recorded") -> str:
    """Turn strace output (``-f -xx -s 65536``) of a program into a scenario.

    Only calls on files opened from a path that ``node_pattern`` matches *as a whole*
    (``re.fullmatch``) are kept: open/openat (access mode and O_NONBLOCK), write, read (the
    size asked for), poll/ppoll, fcntl F_SETFL, close.  Files are named a, b, c, ... by first
    open.  A trace in which no path matches is a ValueError, not an empty scenario.
    """
    fds: dict[tuple[str, int], str] = {}
    out = ["# recorded from strace by cusetpm.conformance from-strace", f"scenario {name}"]
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

    for line in text.splitlines():
        m = _STRACE_LINE.match(line.strip())
        if not m:
            continue
        pid = m.group(1) or m.group(2) or ""
        call, args, ret = m.group(3), m.group(4), m.group(5)
        if call in ("open", "openat"):
            pm = re.search(r'("(?:[^"\\]|\\.)*"),\s*([A-Z_|]+)', args)
            if not pm or ret == "?" or int(ret) < 0:
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
            f = fname()
            fds[(pid, int(ret))] = f
            out.append(" ".join(["open", f, *words]))
            continue
        fdm = re.match(r"\s*\[?\{?\s*(?:fd=)?(\d+)", args)
        if not fdm:
            continue
        key = (pid, int(fdm.group(1)))
        if key not in fds:
            continue
        f = fds[key]
        if call == "write":
            data = _strace_bytes(args.split(",", 1)[1].rsplit(",", 1)[0])
            out.append(f"write {f} {data.hex()}")
        elif call == "read":
            out.append(f"read {f} {args.rsplit(',', 1)[1].strip()}")
        elif call in ("poll", "ppoll"):
            ev = re.search(r"events=([A-Z|]+)", args)
            kinds = set(ev.group(1).split("|")) if ev else set()
            which = "inout" if {"POLLIN", "POLLOUT"} <= kinds else "out" if "POLLOUT" in kinds else "in"
            tm = re.search(r"\],\s*\d+,\s*(-?\d+)\s*$", args)
            timeout = tm.group(1) if tm and call == "poll" else "1000"
            if timeout == "-1":
                timeout = "10000"
            out.append(f"poll {f} {which} {timeout}")
        elif call == "fcntl" and "F_SETFL" in args:
            out.append(f"setfl {f} {'nonblock' if 'O_NONBLOCK' in args else 'block'}")
        elif call == "close":
            out.append(f"close {f}")
            del fds[key]
    if counter == 0:
        raise ValueError(
            f"no file in the trace was opened from a path matching {node_pattern!r} "
            "(the pattern must match the whole path, e.g. '.*/tpmrm0')"
        )
    return "\n".join(out) + "\n"
