# SPDX-License-Identifier: GPL-2.0-only
"""Differential conformance: run the same syscall scenarios against the real kernel's
/dev/tpmrm<N> and against cusetpm's node, and compare normalized transcripts.

Scenario files
==============

A scenario is a list of system calls on one or more open files of a TPM resource-manager
node.  Files are plain text, one operation per line; ``#`` starts a comment (to the end of
the line), blank lines are ignored.  A file may hold several scenarios, each started by a
``scenario NAME`` line; lines before the first ``scenario`` line are file-wide ``let``
definitions.  A file without any ``scenario`` line is one scenario named after the file.
Every scenario runs on a *fresh* TPM and starts with no open file.

Operations (``FD`` is a name you choose, e.g. ``a``; it stands for one open file)::

    open FD [rdwr|rdonly|wronly] [nonblock]   open(2) the node (default O_RDWR)
    close FD                                  close(2)
    write FD DATA...                          write(2) exactly these bytes
    cmd FD [tag=HHHH] CC DATA...              write(2) a TPM command: tag (default 8001),
                                              the size computed, command code CC (hex),
                                              then DATA
    read FD SIZE [raw]                        read(2) up to SIZE bytes (``raw``: record
                                              every byte read, for deterministic data)
    poll FD [in|out|inout] [TIMEOUT_MS]       poll(2) one fd; default events in|out and
                                              timeout 0.  ``in`` = POLLIN|POLLRDNORM,
                                              ``out`` = POLLOUT|POLLWRNORM
    setfl FD nonblock|block                   fcntl(F_SETFL) O_NONBLOCK on or off
    lseek FD                                  lseek(fd, 0, SEEK_CUR)
    pread FD SIZE                             pread(2) at offset 0
    ioctl FD                                  ioctl(fd, TCGETS) (a command the node lacks)
    readfault FD SIZE / writefault FD SIZE    read(2)/write(2) with an inaccessible buffer
    save VAR FD OFFSET [LENGTH]               capture bytes of the last response read on
                                              FD (all of it from OFFSET when no LENGTH)
    let VAR DATA...                           define VAR as bytes
    sleep SECONDS                             pause

``DATA`` is hex, split into tokens anywhere you like (``80010000000c`` or ``8001 0000000c``).
A token ``HEX*N`` repeats HEX N times (``00*32``), ``${VAR}`` inserts a variable.  Example:
read the handle a CreatePrimary returned and save that object's context, then load the
context on a second file::

    cmd a tag=8002 131 ${primary}      # CreatePrimary, body defined by a `let`
    read a 4096
    save h1 a 10 4                     # the (virtual) object handle
    cmd a 162 ${h1}                    # ContextSave(h1)
    read a 4096
    save ctx1 a 10                     # the TPMS_CONTEXT blob
    open b
    cmd b 161 ${ctx1}                  # ContextLoad on another file

Any operation may end in an expectation, ``=> TOKENS``, optionally for one kernel only,
``=>6.1 TOKENS`` / ``=>6.12 TOKENS``.  It holds when every token appears in the step's result
(below).  Expectations document what a step is meant to exercise and are checked on the
real kernel, so the corpus cannot silently drift away from the rule it covers; they never
hide a difference between the kernel and cusetpm.

Results (the transcript)
========================

Each step produces one result string, compared verbatim between the kernel and cusetpm:

* an error is the errno name: ``EINVAL``, ``EBUSY``, ``ENODATA``, ...;
* ``open``, ``setfl``, ``save``, ``let`` and ``sleep`` give ``ok``; ``close`` gives ``0``;
  ``write``/``cmd`` the byte count write(2) returned;
* ``poll`` the returned events, ``IN|RDNORM``, ``OUT|WRNORM``, ... or ``none`` (timeout);
* ``read`` the byte count, then what does not depend on TPM randomness:
  ``tag=8001 size=20 rc=0x0`` when the read covers the whole 10-byte header (bytes of
  a header read in pieces as ``hdr[4:10]=...``), and once the response is complete (the
  bytes read add up to its header size) and rc is 0, by command code: ``handle=0x80ffffff``
  for commands that return a handle (CreatePrimary, Load, ContextLoad, StartAuthSession,
  HashSequenceStart, ...), ``more= cap= count= handles=...`` for GetCapability(HANDLES)
  (``body=`` hex for other capabilities, which are deterministic), ``saved= hier= blob=``
  (the blob's length only) for ContextSave.  Random bytes, nonces, keys, names and
  context blobs are never recorded, except with ``read ... raw``.

Running
=======

``cusetpm conformance [--kernel 6.1|6.12|all] [--node fuse|cuse] [FILE...]`` boots one
qemu guest per kernel (:mod:`cusetpm.rig`); inside it each scenario runs against a fresh
``swtpm chardev --vtpm-proxy`` chip (the genuine kernel resource manager, ``/dev/tpmrmN``)
and against a fresh ``cusetpm serve`` daemon with the matching ``--kernel`` profile and its
own fresh swtpm.  Every difference is printed; exit status 1 if any.

``python -m cusetpm.conformance run --node PATH FILE...`` runs scenarios against any node
without a guest (e.g. the host's own /dev/tpmrm0) and prints the transcript, and
``python -m cusetpm.conformance from-strace LOG`` turns ``strace -f -xx -s 65536 -e
trace=openat,open,read,write,close,poll,ppoll,fcntl`` output of your program into a
scenario.  See conformance/README.md.

Known differences of the FUSE node
==================================

A FUSE file is not a character device; the kernel's FUSE layer answers some calls before
the daemon sees them.  For ``--node fuse`` only, :data:`EXPECTED_DIFFERENCES` lists each such
step of the corpus (scenario, step, kernel result, our result) with the reason: write(fd, buf,
0) and read(fd, buf, 0) answered by FUSE itself, O_NONBLOCK from fcntl(F_SETFL) not reaching
the daemon, and EFAULT raised by FUSE's page pinning before the daemon sees the call.  They are
printed as expected, never silently dropped, and never apply to ``--node cuse``.  FUSE also
delivers RELEASE after close(2) has returned, so on FUSE the runner waits after each close
until the daemon has answered it (:func:`fuse_close_waiter`; the kernel's close is synchronous).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "Step",
    "Scenario",
    "ParseError",
    "parse_text",
    "parse_file",
    "load_scenarios",
    "default_corpus",
    "run_scenario",
    "Difference",
    "Comparison",
    "compare",
    "diff_transcripts",
    "EXPECTED_DIFFERENCES",
    "add_conformance_parser",
    "run_conformance",
    "scenario_from_strace",
    "expand_paths",
    "fuse_close_waiter",
    "guest_run",
]

KERNELS = ("6.1", "6.12")
NODE_KINDS = ("fuse", "cuse")
#: Seconds the runner waits after close(2) of a FUSE file (FUSE sends RELEASE asynchronously).
FUSE_CLOSE_SETTLE = 0.25
#: Wall-clock limit for one scenario on one side.
SCENARIO_TIMEOUT = 90.0
SCENARIO_SUFFIX = ".scn"
#: How many scenarios ahead the in-guest driver starts kernel chips and daemons.
LOOKAHEAD = 2

# Commands whose TPMA_CC has rHandle: the handle at offset 10 of a successful response.
RHANDLE_CCS = {
    0x107: "MAC_Start",
    0x131: "CreatePrimary",
    0x157: "Load",
    0x15B: "HMAC_Start",
    0x161: "ContextLoad",
    0x167: "LoadExternal",
    0x176: "StartAuthSession",
    0x186: "HashSequenceStart",
    0x191: "CreateLoaded",
}
CC_GET_CAPABILITY = 0x17A
CC_CONTEXT_SAVE = 0x162
CAP_HANDLES = 1

_POLL_NAMES = [
    (select.POLLIN, "IN"),
    (select.POLLPRI, "PRI"),
    (select.POLLOUT, "OUT"),
    (select.POLLERR, "ERR"),
    (select.POLLHUP, "HUP"),
    (select.POLLNVAL, "NVAL"),
    (select.POLLRDNORM, "RDNORM"),
    (select.POLLRDBAND, "RDBAND"),
    (select.POLLWRNORM, "WRNORM"),
    (select.POLLWRBAND, "WRBAND"),
]
_POLL_EVENTS = {
    "in": select.POLLIN | select.POLLRDNORM,
    "out": select.POLLOUT | select.POLLWRNORM,
    "inout": select.POLLIN | select.POLLRDNORM | select.POLLOUT | select.POLLWRNORM,
}
_OPEN_MODES = {"rdwr": os.O_RDWR, "rdonly": os.O_RDONLY, "wronly": os.O_WRONLY}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ------------------------------------------------------------------------------------------
# parsing


class ParseError(ValueError):
    """A scenario file is malformed; the message names file and line."""


@dataclass(frozen=True)
class Step:
    """One operation of a scenario."""

    line: int  # line number in its file
    op: str  # open, close, write, cmd, read, poll, setfl, lseek, pread, ioctl, save, let, sleep
    args: tuple[str, ...]
    text: str  # the operation as written (without comment and expectation)
    #: Expected result tokens: key "" for every kernel, "6.1"/"6.12" for one kernel.
    expect: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def expected_for(self, kernel: str | None) -> tuple[str, ...] | None:
        """The tokens this step must produce on ``kernel``, or None if nothing is expected."""
        found = None
        for key, tokens in self.expect:
            if key == "":
                found = tokens if found is None else found + tokens
            elif kernel is not None and key == kernel:
                found = tokens if found is None else found + tokens
        return found


@dataclass
class Scenario:
    name: str
    file: str
    steps: list[Step] = field(default_factory=list)
    #: File-wide ``let`` definitions (name -> DATA tokens), in effect from the start.
    lets: dict[str, tuple[str, ...]] = field(default_factory=dict)


_ARITY: dict[str, tuple[int, int | None]] = {
    # op: (min args, max args or None for "any")
    "open": (1, 3),
    "close": (1, 1),
    "write": (1, None),
    "cmd": (2, None),
    "read": (2, 3),
    "poll": (1, 3),
    "setfl": (2, 2),
    "lseek": (1, 1),
    "pread": (2, 2),
    "ioctl": (1, 1),
    "save": (3, 4),
    "let": (1, None),
    "sleep": (1, 1),
    "readfault": (2, 2),
    "writefault": (2, 2),
}


def _split_expect(body: str, where: str) -> tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]:
    """Split ``op args => tokens =>6.1 tokens`` into the op text and its expectations."""
    parts = re.split(r"=>(\S*)", body)
    text = parts[0].strip()
    expect = []
    for i in range(1, len(parts), 2):
        key = parts[i]
        if key not in ("",) + KERNELS:
            raise ParseError(f"{where}: unknown kernel {key!r} in '=>{key}' (use => or =>6.1 / =>6.12)")
        tokens = tuple(parts[i + 1].split())
        if not tokens:
            raise ParseError(f"{where}: empty expectation")
        expect.append((key, tokens))
    return text, tuple(expect)


def _check_data(tokens: Sequence[str], where: str) -> None:
    """Validate DATA tokens (hex, HEX*N, ${VAR}) without resolving variables."""
    for tok in tokens:
        try:
            pieces = _split_data_token(tok)
        except ParseError as exc:
            raise ParseError(f"{where}: {exc}") from None
        for piece in pieces:
            if piece.startswith("${"):
                continue
            hexpart, _, count = piece.partition("*")
            if count and not count.isdigit():
                raise ParseError(f"{where}: bad repeat count in {tok!r}")
            if len(hexpart) % 2 or not re.fullmatch(r"[0-9A-Fa-f]*", hexpart):
                raise ParseError(f"{where}: {tok!r} is not an even number of hex digits")


def _split_data_token(tok: str) -> list[str]:
    """``ab${x}cd*2`` -> ['ab', '${x}', 'cd*2']."""
    out = []
    pos = 0
    for m in _VAR_REF.finditer(tok):
        if m.start() > pos:
            out.append(tok[pos : m.start()])
        out.append(m.group(0))
        pos = m.end()
    if pos < len(tok):
        out.append(tok[pos:])
    for piece in out:
        if "$" in piece and not _VAR_REF.fullmatch(piece):
            raise ParseError(f"bad variable reference in {tok!r} (write ${{NAME}})")
    return out


def _is_hex(s: str, *, max_digits: int = 8) -> bool:
    return bool(re.fullmatch(r"(0x)?[0-9A-Fa-f]{1,%d}" % max_digits, s))


def _validate(op: str, args: tuple[str, ...], where: str) -> None:
    lo, hi = _ARITY[op]
    if len(args) < lo or (hi is not None and len(args) > hi):
        raise ParseError(f"{where}: '{op}' takes {lo}{'+' if hi is None else '' if hi == lo else f'..{hi}'} arguments")
    if op in ("let", "save"):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args[0]):
            raise ParseError(f"{where}: bad variable name {args[0]!r}")
    else:
        if op != "sleep" and not _NAME.match(args[0]):
            raise ParseError(f"{where}: bad file name {args[0]!r}")
    if op == "open":
        for flag in args[1:]:
            if flag not in _OPEN_MODES and flag != "nonblock":
                raise ParseError(f"{where}: unknown open flag {flag!r}")
    elif op == "write":
        _check_data(args[1:], where)
    elif op == "cmd":
        rest = list(args[1:])
        if rest and rest[0].startswith("tag="):
            if not _is_hex(rest[0][4:], max_digits=4):
                raise ParseError(f"{where}: bad tag {rest[0]!r}")
            rest.pop(0)
        if not rest or not _is_hex(rest[0]):
            raise ParseError(f"{where}: 'cmd' needs a command code (hex)")
        _check_data(rest[1:], where)
    elif op in ("readfault", "writefault"):
        if not args[1].isdigit():
            raise ParseError(f"{where}: size must be a decimal number")
    elif op in ("read", "pread"):
        if not args[1].isdigit():
            raise ParseError(f"{where}: size must be a decimal number")
        if op == "read" and len(args) == 3 and args[2] != "raw":
            raise ParseError(f"{where}: unknown read option {args[2]!r}")
    elif op == "poll":
        for a in args[1:]:
            if a not in _POLL_EVENTS and not re.fullmatch(r"-?\d+", a):
                raise ParseError(f"{where}: poll takes in|out|inout and a timeout in ms")
    elif op == "setfl":
        if args[1] not in ("nonblock", "block"):
            raise ParseError(f"{where}: setfl takes nonblock or block")
    elif op == "save":
        if not _NAME.match(args[1]) or not args[2].isdigit() or (len(args) == 4 and not args[3].isdigit()):
            raise ParseError(f"{where}: save VAR FD OFFSET [LENGTH] (decimal numbers)")
    elif op == "let":
        _check_data(args[1:], where)
    elif op == "sleep":
        try:
            if float(args[0]) < 0:
                raise ValueError
        except ValueError:
            raise ParseError(f"{where}: sleep takes seconds") from None


def parse_text(text: str, file: str = "<string>", default_name: str | None = None) -> list[Scenario]:
    """Parse scenario text into scenarios (see the module docstring for the format)."""
    scenarios: list[Scenario] = []
    lets: dict[str, tuple[str, ...]] = {}
    current: Scenario | None = None
    names: set[str] = set()
    pending: list[Step] = []  # steps before any `scenario` line (file without scenarios)
    for lineno, raw in enumerate(text.splitlines(), 1):
        where = f"{file}:{lineno}"
        body = raw.split("#", 1)[0].strip()
        if not body:
            continue
        if body.split()[0] == "scenario":
            words = body.split()
            if len(words) != 2 or not _NAME.match(words[1]):
                raise ParseError(f"{where}: write 'scenario NAME' (letters, digits, _ . -)")
            if pending:
                raise ParseError(f"{where}: operations before the first 'scenario' line (only 'let' may be there)")
            if words[1] in names:
                raise ParseError(f"{where}: scenario {words[1]!r} defined twice")
            names.add(words[1])
            current = Scenario(words[1], file, lets=dict(lets))
            scenarios.append(current)
            continue
        op_text, expect = _split_expect(body, where)
        words = op_text.split()
        if not words:
            raise ParseError(f"{where}: expectation without an operation")
        op, args = words[0], tuple(words[1:])
        if op not in _ARITY:
            raise ParseError(f"{where}: unknown operation {op!r}; known: {', '.join(sorted(_ARITY))}")
        _validate(op, args, where)
        if op == "let" and current is None:
            if expect:
                raise ParseError(f"{where}: a file-wide 'let' takes no expectation")
            lets[args[0]] = args[1:]
            continue
        step = Step(lineno, op, args, " ".join(words), expect)
        if current is None:
            pending.append(step)
        else:
            current.steps.append(step)
    if pending:
        name = default_name or Path(file).stem
        if not _NAME.match(name):
            raise ParseError(f"{file}: cannot name the scenario after the file; add a 'scenario NAME' line")
        scenarios.append(Scenario(name, file, pending, dict(lets)))
    for sc in scenarios:
        if not sc.steps:
            raise ParseError(f"{sc.file}: scenario {sc.name!r} has no operations")
    return scenarios


def parse_file(path: str | os.PathLike[str]) -> list[Scenario]:
    p = Path(path)
    return parse_text(p.read_text(), str(p), default_name=p.stem)


def default_corpus() -> Path:
    """The corpus shipped in the repository (``conformance/`` at the top level)."""
    return Path(__file__).resolve().parent.parent / "conformance"


def expand_paths(paths: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Expand directories to their ``*.scn`` files (sorted); default: the shipped corpus."""
    out: list[Path] = []
    paths = list(paths) or [default_corpus()]
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*" + SCENARIO_SUFFIX))
            if not found:
                raise ParseError(f"{p}: no *{SCENARIO_SUFFIX} scenario files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ParseError(f"{p}: no such scenario file or directory")
    return [q.resolve() for q in out]


def load_scenarios(paths: Iterable[str | os.PathLike[str]] = ()) -> list[Scenario]:
    """Parse every scenario of the given files/directories; names must be unique."""
    out: list[Scenario] = []
    seen: dict[str, str] = {}
    for f in expand_paths(paths):
        for sc in parse_file(f):
            if sc.name in seen:
                raise ParseError(f"{f}: scenario {sc.name!r} is also defined in {seen[sc.name]}")
            seen[sc.name] = str(f)
            out.append(sc)
    return out


class _Undefined(Exception):
    pass


def build_data(tokens: Sequence[str], variables: dict[str, bytes]) -> bytes:
    """Resolve DATA tokens to bytes; raises _Undefined for an unknown ${VAR}."""
    out = bytearray()
    for tok in tokens:
        for piece in _split_data_token(tok):
            m = _VAR_REF.fullmatch(piece)
            if m:
                if m.group(1) not in variables:
                    raise _Undefined(m.group(1))
                out += variables[m.group(1)]
                continue
            hexpart, star, count = piece.partition("*")
            chunk = bytes.fromhex(hexpart)
            out += chunk * (int(count) if star else 1)
    return bytes(out)


def build_command(args: Sequence[str], variables: dict[str, bytes]) -> bytes:
    """The bytes of ``cmd FD [tag=HHHH] CC DATA...`` (args without FD)."""
    rest = list(args)
    tag = 0x8001
    if rest and rest[0].startswith("tag="):
        tag = int(rest.pop(0)[4:], 16)
    cc = int(rest.pop(0), 16)
    body = build_data(rest, variables)
    return tag.to_bytes(2, "big") + (10 + len(body)).to_bytes(4, "big") + cc.to_bytes(4, "big") + body


# ------------------------------------------------------------------------------------------
# normalization


def _be32(b: bytes | bytearray, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "big")


def poll_names(mask: int) -> str:
    if not mask:
        return "none"
    names = [name for bit, name in _POLL_NAMES if mask & bit]
    rest = mask & ~sum(bit for bit, _ in _POLL_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names)


def response_fields(cc: int | None, rsp: bytes) -> list[str]:
    """Deterministic fields of a complete response body (the header is reported apart)."""
    if cc is None or len(rsp) < 10 or _be32(rsp, 6) != 0:
        return []
    body = rsp[10:]
    if cc in RHANDLE_CCS and len(body) >= 4:
        return [f"handle=0x{_be32(body, 0):08x}"]
    if cc == CC_GET_CAPABILITY and len(body) >= 9:
        more, cap, count = body[0], _be32(body, 1), _be32(body, 5)
        fields = [f"more={more}", f"cap={cap}", f"count={count}"]
        if cap == CAP_HANDLES:
            handles = [f"{_be32(body, 9 + 4 * i):08x}" for i in range((len(body) - 9) // 4)]
            fields.append("handles=" + (",".join(handles) or "-"))
        else:
            fields.append("body=" + body[9:].hex())
        return fields
    if cc == CC_CONTEXT_SAVE and len(body) >= 18:
        blob = int.from_bytes(body[16:18], "big")
        return [f"saved=0x{_be32(body, 8):08x}", f"hier=0x{_be32(body, 12):08x}", f"blob={blob}"]
    return []


@dataclass
class _FileTrack:
    """What the runner knows about one open file: its fd and the response being read."""

    fd: int
    last_cc: int | None = None
    resp: bytearray = field(default_factory=bytearray)
    complete: bool = False

    def written(self, data: bytes) -> None:
        self.last_cc = _be32(data, 6) if len(data) >= 10 else None
        self.resp = bytearray()
        self.complete = False

    def got(self, data: bytes, raw: bool) -> str:
        """The normalized result of a read(2) that returned ``data``."""
        if not data:
            self.resp = bytearray()
            self.complete = False
            return "0"
        if self.complete:
            self.resp = bytearray()
            self.complete = False
        start = len(self.resp)
        self.resp += data
        fields = [str(len(data))]
        end = min(len(self.resp), 10)
        if start == 0 and end == 10:
            r = self.resp
            fields += [f"tag={r[0]:02x}{r[1]:02x}", f"size={_be32(r, 2)}", f"rc=0x{_be32(r, 6):x}"]
        elif start < end:
            fields.append(f"hdr[{start}:{end}]={self.resp[start:end].hex()}")
        if len(self.resp) >= 10 and len(self.resp) == _be32(self.resp, 2):
            self.complete = True
            fields += response_fields(self.last_cc, bytes(self.resp))
        if raw:
            fields.append("bytes=" + data.hex())
        return " ".join(fields)


# ------------------------------------------------------------------------------------------
# running one scenario against one node


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, f"errno{exc.errno}")


class _Runner:
    def __init__(self, scenario: Scenario, node: str, kernel: str | None,
                 after_close: Callable[[], None] | None) -> None:
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
    scenario: Scenario, node: str, *, kernel: str | None = None, close_settle: float = 0.0,
    after_close: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` against ``node`` with real syscalls; return its transcript.

    The transcript is ``{"steps": [{"line", "op", "result", "expected", "expect_ok"}...],
    "error": None | str, "seconds": float}``.  ``kernel`` selects kernel-specific
    expectations (``=>6.1``); ``after_close`` runs after each close(2) (FUSE: wait for the
    RELEASE, see :func:`fuse_close_waiter`), else ``close_settle`` seconds of pause.
    """
    if after_close is None and close_settle:
        after_close = lambda: time.sleep(close_settle)  # noqa: E731
    runner = _Runner(scenario, node, kernel, after_close)
    for name, tokens in scenario.lets.items():
        runner.vars[name] = build_data(tokens, runner.vars)
    steps: list[dict[str, Any]] = []
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
            steps.append({
                "line": step.line, "op": step.text, "result": result,
                "expected": " ".join(want) if want is not None else None, "expect_ok": ok,
            })
    except Exception as exc:  # noqa: BLE001 - reported in the transcript
        error = f"{type(exc).__name__}: {exc}"
    finally:
        runner.close_all()
    return {"steps": steps, "error": error, "seconds": round(time.monotonic() - t0, 3)}


# ------------------------------------------------------------------------------------------
# inside the guest: fresh kernel chips and fresh daemons


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
                ["swtpm", "chardev", "--vtpm-proxy", "--tpm2", "--tpmstate", f"dir={state}",
                 "--flags", "not-need-init", "--log", f"file={state}/swtpm.log,level=1"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
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
    ``--state-dir`` (so its own fresh swtpm); forking only saves the seconds Python needs to
    import trio, pyfuse3 and tpm2-pytss under TCG for every scenario.
    """

    def __init__(self, workdir: Path, kernel: str, node_kind: str, index: int) -> None:
        from . import cli  # noqa: F401 - imported before fork, in the parent

        self.base = workdir
        self.kernel = kernel
        self.node_kind = node_kind
        self.index = index
        self.attempts = 0
        self.node: str | None = None
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
        self.argv = ["serve", *where, "--kernel", self.kernel, "--state-dir", str(self.workdir / "state")]
        self.returncode: int | None = None
        self._terminated = False
        self.started = time.monotonic()
        sys.stdout.flush()
        sys.stderr.flush()
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pid = os.fork()
        if pid == 0:  # child
            rc = 70
            try:
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.closerange(3, 4096)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
                    signal.signal(sig, signal.SIG_DFL)
                sys.argv = ["cusetpm", *self.argv]
                from .cli import main

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
        self.pid = pid

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

    #: A daemon that exits before its "serving" line is started again with a fresh state
    #: directory: under TCG and a loaded host, a fresh swtpm's first SelfTest can exceed the
    #: kernel's 2 s duration, which the daemon reproduces faithfully.
    READY_TIMEOUT = 60.0

    def _restart(self) -> None:
        self._fork()

    def _wait(self, timeout: float) -> str:
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            m = re.search(r"^cusetpm: serving (\S+)", self.log(), re.M)
            if m:
                self.node = m.group(1)
                return self.node
            if self._reap(block=False):
                raise SideError(f"cusetpm exited with status {self.returncode}:\n{self.log()}")
            time.sleep(0.02)
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
        mnt = self.workdir / "mnt"
        if mnt.exists() and os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        return self.returncode


def _with_watchdog(timeout: float, on_timeout: Callable[[], None], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run fn; if it takes longer than ``timeout``, kill the side (which unblocks its
    syscalls: EPIPE from a dead chip, ENOTCONN from a dead FUSE/CUSE daemon)."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        on_timeout()

    timer = threading.Timer(timeout, fire)
    timer.daemon = True
    timer.start()
    try:
        result = fn()
    finally:
        timer.cancel()
        timer.join()
    if fired.is_set():
        result["error"] = (result.get("error") or "") + f" TIMEOUT after {timeout}s (side killed)"
    return result


def guest_run(kernel: str, node_kind: str, files: Sequence[str], out: str, *,
              only: Sequence[str] = (), timeout: float = SCENARIO_TIMEOUT) -> int:
    """The in-guest driver: each scenario on a fresh kernel chip and a fresh daemon.

    Writes ``{"kernel", "release", "node", "kernel_side": {name: transcript},
    "ours": {name: transcript}, "seconds": ...}`` to ``out``.  Resources for the next
    scenario are started while the current one runs.
    """
    t_start = time.monotonic()
    scenarios = load_scenarios(files)
    if only:
        scenarios = [s for s in scenarios if s.name in set(only)]
    base = Path(tempfile.mkdtemp(prefix="cusetpm-conf-", dir="/run" if os.path.isdir("/run") else None))
    if node_kind == "fuse":
        mount_fusectl()
    result: dict[str, Any] = {
        "kernel": kernel, "release": os.uname().release, "node": node_kind,
        "kernel_side": {}, "ours": {}, "order": [s.name for s in scenarios],
    }

    def new_chip(i: int) -> KernelChip | SideError:
        try:
            return KernelChip(base / f"k{i}")
        except OSError as exc:
            return SideError(f"cannot start swtpm: {exc}")

    def new_daemon(i: int) -> ForkedDaemon:
        return ForkedDaemon(base / f"d{i}", kernel, node_kind, i)

    chips: dict[int, KernelChip | SideError] = {}
    daemons: dict[int, ForkedDaemon] = {}
    phases: dict[str, float] = {}
    retries = {"chips": 0, "daemons": 0}

    @contextlib.contextmanager
    def phase(name: str):
        t = time.monotonic()
        try:
            yield
        finally:
            phases[name] = phases.get(name, 0.0) + time.monotonic() - t

    if scenarios:
        chips[0] = new_chip(0)
    t_import = time.monotonic()
    from . import cli  # noqa: F401 - the slow import, while the first chip registers

    result["import_seconds"] = round(time.monotonic() - t_import, 2)
    if scenarios:
        daemons[0] = new_daemon(0)
    started = {0} if scenarios else set()
    stopping_chips: list[KernelChip] = []
    stopping_daemons: list[tuple[str, ForkedDaemon]] = []

    def finish_daemon(name: str, d: ForkedDaemon) -> None:
        rc = d.stop()
        t = result["ours"][name]
        if rc != 0 and not t.get("error"):
            t["error"] = f"cusetpm exited with status {rc}:\n{d.log()[-3000:]}"

    def reap(block: bool) -> None:
        for c in list(stopping_chips):
            if block or c.done():
                c.wait()
                stopping_chips.remove(c)
        for name, d in list(stopping_daemons):
            if block or d.done():
                finish_daemon(name, d)
                stopping_daemons.remove((name, d))

    try:
        for i, sc in enumerate(scenarios):
            # Start what the next scenarios need; no scenario file is open now, so the
            # forked daemons inherit nothing of the kernel side.
            with phase("start"):
                for j in range(i, min(i + 1 + LOOKAHEAD, len(scenarios))):
                    if j not in started:
                        started.add(j)
                        chips[j] = new_chip(j)
                        if j not in daemons:
                            daemons[j] = new_daemon(j)
                reap(block=False)
            chip = chips.pop(i)
            if isinstance(chip, SideError):
                result["kernel_side"][sc.name] = {"steps": [], "error": str(chip), "seconds": 0}
            else:
                try:
                    with phase("chip-ready"):
                        try:
                            node = chip.ready()
                        finally:
                            retries["chips"] += chip.attempts - 1
                    result["kernel_side"][sc.name] = _with_watchdog(
                        timeout, chip.kill, lambda: run_scenario(sc, node, kernel=kernel))
                except SideError as exc:
                    result["kernel_side"][sc.name] = {"steps": [], "error": str(exc), "seconds": 0}
                finally:
                    chip.terminate()
                    stopping_chips.append(chip)
            d = daemons.pop(i)
            try:
                with phase("daemon-ready"):
                    try:
                        node = d.ready()
                    finally:
                        retries["daemons"] += d.attempts - 1
                waiter = d.close_waiter()
                t = _with_watchdog(timeout, d.kill,
                                   lambda: run_scenario(sc, node, kernel=kernel, after_close=waiter))
            except SideError as exc:
                t = {"steps": [], "error": str(exc), "seconds": 0}
            result["ours"][sc.name] = t
            d.terminate()
            stopping_daemons.append((sc.name, d))
        with phase("final-stop"):
            reap(block=True)
    finally:
        for c in chips.values():
            if isinstance(c, KernelChip):
                c.stop()
        for d in daemons.values():
            d.stop()
        for c in stopping_chips:
            c.stop()
        for _, d in stopping_daemons:
            d.stop()
    result["seconds"] = round(time.monotonic() - t_start, 2)
    result["phases"] = {k: round(v, 2) for k, v in phases.items()}
    result["retries"] = retries
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, out)
    return 0


# ------------------------------------------------------------------------------------------
# on the host: boot, compare, report


@dataclass(frozen=True)
class ExpectedDifference:
    """A difference a node cannot avoid, for one step of the corpus.

    Each is decided outside cusetpm's code: by the kernel's FUSE/CUSE layer before the
    daemon sees the call, or by the backing TPM's transport.
    """

    scenario: str
    op: str  # the step's operation text, exactly
    kernel_result: str
    our_result: str
    reason: str
    kernels: tuple[str, ...] = KERNELS
    nodes: tuple[str, ...] = ("fuse",)


_FUSE_WRITE0 = "FUSE answers write(fd, buf, 0) with 0 itself; the driver is never called (kernel: EINVAL)"
_FUSE_READ0 = ("FUSE answers read(fd, buf, 0) with 0 itself; 6.1's driver would discard the pending "
               "response (or report and clear a pending async errno)")
_FUSE_SETFL = ("FUSE does not pass O_NONBLOCK set by fcntl(F_SETFL) after open to the daemon, so "
               "the write runs synchronously: errors come from write(2) instead of read(2)")

_FUSE_EFAULT = ("FUSE direct I/O pins the user buffer before it sends the request: with an unreadable/"
                "unwritable buffer read(2)/write(2) fail with EFAULT in the FUSE layer and the daemon never "
                "sees the call (kernel: the response is discarded / the buffer zero-filled, so a later short "
                "write inherits command code 0 instead of the old one).  CUSE uses the same fuse_direct_io()")
_CUSE_SEEK = ("cuse.c gives every CUSE file noop_llseek and never applies FOPEN_NONSEEKABLE, so lseek "
              "returns 0 and pread/pwrite act as read/write (kernel: ESPIPE); the FUSE file does give ESPIPE")
_SHORT_FRAME = ("a command whose header size is 1..9 cannot be delimited on a stream: the kernel's "
                "vtpm-proxy swtpm never answers it (ETIME after the command's duration) and keeps the "
                "bytes, corrupting the next command; cusetpm's stream backends answer TPM_RC_COMMAND_SIZE "
                "at once (backends.py: unframeable).  The TPM's transport decides this, not the RM")
BOTH = ("fuse", "cuse")
E = ExpectedDifference

#: Every step where a node is known to differ from the kernel, with the reason.
EXPECTED_DIFFERENCES: tuple[ExpectedDifference, ...] = (
    E("read-efault", "poll a", "OUT|WRNORM", "IN|RDNORM", _FUSE_EFAULT, nodes=BOTH),
    E("read-efault", "read a 4096", "0", "20 tag=8001 size=20 rc=0x0", _FUSE_EFAULT, nodes=BOTH),
    E("write-efault", "read a 4096", "10 tag=8001 size=10 rc=0xb0143", "10 tag=8001 size=10 rc=0x142",
      _FUSE_EFAULT, nodes=BOTH),
    E("write-einval-sizes", "write a", "EINVAL", "0", _FUSE_WRITE0, nodes=BOTH),
    E("read-zero-size", "read a 4096", "0", "20 tag=8001 size=20 rc=0x0", _FUSE_READ0, ("6.1",), BOTH),
    E("read-zero-size", "poll a", "OUT|WRNORM", "IN|RDNORM", _FUSE_READ0, ("6.1",), BOTH),
    E("read-zero-unlocks-write", "cmd a 17b 0010", "12", "EBUSY", _FUSE_READ0, ("6.1",), BOTH),
    E("read-zero-unlocks-write", "read a 4096", "28 tag=8001 size=28 rc=0x0", "20 tag=8001 size=20 rc=0x0",
      _FUSE_READ0, ("6.1",), BOTH),
    E("read-zero-async-error", "read a 0", "EINVAL", "0", _FUSE_READ0, ("6.1",), BOTH),
    E("read-zero-async-error", "read a 4096", "0", "EINVAL", _FUSE_READ0, ("6.1",), BOTH),
    E("setfl-nonblock-switch", "cmd a 173 80ffffff", "14", "EINVAL", _FUSE_SETFL),
    E("setfl-nonblock-switch", "poll a in 2000", "IN|RDNORM", "none", _FUSE_SETFL),
    E("setfl-nonblock-switch", "read a 4096", "EINVAL", "0", _FUSE_SETFL),
    E("access-modes", "lseek w", "ESPIPE", "0", _CUSE_SEEK, nodes=("cuse",)),
    E("access-modes", "pread r 16", "ESPIPE", "0", _CUSE_SEEK, nodes=("cuse",)),
    E("short-frame-header-8", "write a 8001 00000008 0000017b 0008", "ETIME", "12", _SHORT_FRAME, nodes=BOTH),
    E("short-frame-stale-cc", "write a 8001 00000007 00", "ETIME", "7", _SHORT_FRAME, nodes=BOTH),
)


@dataclass(frozen=True)
class Difference:
    kernel: str
    scenario: str
    step: int  # 1-based index in the scenario
    line: int
    op: str
    kernel_result: str
    our_result: str
    expected: ExpectedDifference | None = None

    def describe(self) -> str:
        where = f"[{self.kernel}] {self.scenario} step {self.step} (line {self.line}) `{self.op}`"
        text = f"{where}:\n    kernel: {self.kernel_result}\n    ours:   {self.our_result}"
        if self.expected is not None:
            text += f"\n    expected for --node {'/'.join(self.expected.nodes)}: {self.expected.reason}"
        return text


@dataclass
class ScenarioOutcome:
    kernel: str
    scenario: str
    differences: list[Difference]
    errors: list[str]  # harness errors (a side did not run)
    expectation_failures: list[str]  # steps whose `=>` did not hold on the real kernel

    @property
    def identical(self) -> bool:
        return not self.errors and all(d.expected is not None for d in self.differences)


@dataclass
class Comparison:
    """The outcome of :func:`compare` for one kernel."""

    kernel: str
    node: str
    outcomes: list[ScenarioOutcome]
    seconds: float
    guest_seconds: float
    raw: dict[str, Any]

    @property
    def identical(self) -> int:
        return sum(o.identical for o in self.outcomes)

    @property
    def differ(self) -> int:
        return len(self.outcomes) - self.identical

    @property
    def differences(self) -> list[Difference]:
        return [d for o in self.outcomes for d in o.differences if d.expected is None]

    @property
    def expected_differences(self) -> list[Difference]:
        return [d for o in self.outcomes for d in o.differences if d.expected is not None]

    @property
    def errors(self) -> list[str]:
        return [f"[{o.kernel}] {o.scenario}: {e}" for o in self.outcomes for e in o.errors]

    @property
    def expectation_failures(self) -> list[str]:
        return [f"[{o.kernel}] {o.scenario}: {e}" for o in self.outcomes for e in o.expectation_failures]

    def report(self) -> str:
        lines = []
        for d in self.differences:
            lines.append("DIFFERENCE " + d.describe())
        for e in self.errors:
            lines.append("ERROR " + e)
        for d in self.expected_differences:
            lines.append("expected " + d.describe())
        for e in self.expectation_failures:
            lines.append("EXPECTATION NOT MET ON THE REAL KERNEL " + e)
        lines.append(
            f"{self.kernel}: {self.identical} scenarios identical, {self.differ} differ "
            f"(node {self.node}, {len(self.expected_differences)} expected differences, "
            f"guest {self.guest_seconds:.0f}s)"
        )
        return "\n".join(lines)


def _match_expected(kernel: str, node: str, scenario: str, op: str, k: str, o: str) -> ExpectedDifference | None:
    for e in EXPECTED_DIFFERENCES:
        if (node in e.nodes and kernel in e.kernels and e.scenario == scenario and e.op == op
                and e.kernel_result == k and e.our_result == o):
            return e
    return None


def diff_transcripts(kernel: str, node: str, name: str, ktr: dict[str, Any], otr: dict[str, Any]) -> ScenarioOutcome:
    """Compare one scenario's transcripts step by step."""
    errors = []
    if ktr.get("error"):
        errors.append(f"kernel side: {ktr['error']}")
    if otr.get("error"):
        errors.append(f"cusetpm side: {otr['error']}")
    diffs = []
    ks, os_ = ktr.get("steps", []), otr.get("steps", [])
    for i in range(max(len(ks), len(os_))):
        k = ks[i] if i < len(ks) else None
        o = os_[i] if i < len(os_) else None
        ref = k or o
        assert ref is not None
        kr = k["result"] if k else "<not run>"
        or_ = o["result"] if o else "<not run>"
        if kr != or_:
            exp = _match_expected(kernel, node, name, ref["op"], kr, or_)
            diffs.append(Difference(kernel, name, i + 1, ref["line"], ref["op"], kr, or_, exp))
    failures = []
    for i, k in enumerate(ks):
        if k.get("expect_ok") is False:
            failures.append(f"step {i + 1} (line {k['line']}) `{k['op']}`: "
                            f"expected {k['expected']!r}, got {k['result']!r}")
    return ScenarioOutcome(kernel, name, diffs, errors, failures)


def compare(kernel: str, scenario_files: Sequence[str | os.PathLike[str]] = (), *, node: str = "fuse",
            only: Sequence[str] = (), timeout: float = 1500.0) -> Comparison:
    """Boot one guest running ``kernel`` and compare every scenario (fresh TPMs each side).

    ``scenario_files``: files or directories (default: the shipped corpus); ``node``: which
    cusetpm node to test, ``"fuse"`` or ``"cuse"``; ``only``: scenario names to run.
    Raises :class:`cusetpm.rig.RigError` if the guest cannot produce a result.
    """
    from . import rig

    if node not in NODE_KINDS:
        raise ValueError(f"node must be one of {NODE_KINDS}")
    files = [str(p) for p in expand_paths(scenario_files)]
    scenarios = load_scenarios(files)  # fail early on a malformed file
    unknown = set(only) - {s.name for s in scenarios}
    if unknown:
        raise ParseError(f"no scenario named {', '.join(sorted(unknown))}")
    names = [s.name for s in scenarios if not only or s.name in set(only)]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cusetpm-conformance-") as share:
        out = os.path.join(share, "result.json")
        argv = [sys.executable, "-m", "cusetpm.conformance", "guest", "--kernel", kernel, "--node", node,
                "--out", out, *(a for n in only for a in ("--only", n)), *files]
        repo = str(Path(__file__).resolve().parent.parent)
        command = f"cd {shlex.quote(repo)} && " + " ".join(shlex.quote(a) for a in argv)
        res = rig.run_in_guest(kernel, command, timeout=timeout, share=share)
        if res.returncode != 0 or not os.path.exists(out):
            raise rig.RigError(
                f"conformance: the in-guest run failed (status {res.returncode}):\n{res.output[-6000:]}"
                f"\n--- console tail ---\n{res.console[-3000:]}"
            )
        with open(out) as fh:
            raw = json.load(fh)
    outcomes = []
    for name in names:
        ktr = raw["kernel_side"].get(name, {"steps": [], "error": "not run"})
        otr = raw["ours"].get(name, {"steps": [], "error": "not run"})
        outcomes.append(diff_transcripts(kernel, node, name, ktr, otr))
    return Comparison(kernel, node, outcomes, time.monotonic() - t0, res.seconds, raw)


# ------------------------------------------------------------------------------------------
# strace -> scenario


_STRACE_LINE = re.compile(r"^(?:\[pid\s+(\d+)\]\s+|(\d+)\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+|\?)(?:\s+(\w+))?")


def _strace_bytes(s: str) -> bytes:
    """Decode an strace string literal ("\\x80\\x01..."), as printed with -xx."""
    body = s.strip()
    if body.endswith("..."):
        raise ValueError("truncated string in strace output: run strace with -s 65536")
    if not (body.startswith('"') and body.endswith('"')):
        raise ValueError(f"not a string literal: {s[:40]}")
    return body[1:-1].encode("latin-1").decode("unicode_escape").encode("latin-1")


def scenario_from_strace(text: str, node_pattern: str = r"/dev/tpmrm\d+", name: str = "recorded") -> str:
    """Turn strace output (``-f -xx -s 65536``) of a program into a scenario.

    Only calls on files opened from a path matching ``node_pattern`` are kept: open/openat
    (access mode and O_NONBLOCK), write, read (the size asked for), poll/ppoll, fcntl
    F_SETFL, close.  Files are named a, b, c, ... by first open.
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
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------
# command lines


def _add_conformance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default="all", choices=[*KERNELS, "all"], help="kernel(s) to compare with")
    p.add_argument("--node", default="fuse", choices=NODE_KINDS, help="which cusetpm node to test")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this scenario (repeatable)")
    p.add_argument("--timeout", type=float, default=1500.0, help="limit for one guest run (seconds)")
    p.add_argument("--json", metavar="FILE", help="also write the raw transcripts to FILE")
    p.add_argument("files", nargs="*", metavar="SCENARIO_FILE",
                   help="scenario files or directories (default: the corpus in conformance/)")


def add_conformance_parser(subparsers: Any) -> None:
    """Add ``cusetpm conformance`` to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "conformance",
        help="compare cusetpm with the real kernel /dev/tpmrm0 on scenario files (boots qemu guests)",
        description="Run each scenario against the real kernel resource manager and against cusetpm "
                    "(each on a fresh TPM, inside a qemu guest per kernel) and print every difference.",
    )
    _add_conformance_args(p)
    p.set_defaults(func=run_conformance)


def run_conformance(args: argparse.Namespace) -> int:
    """``cusetpm conformance``: exit status 0 if identical, 1 if any scenario differs, 2 on
    a usage or rig error."""
    from . import rig

    kernels = KERNELS if args.kernel == "all" else (args.kernel,)
    try:
        names = {s.name for s in load_scenarios(args.files)}
        unknown = set(args.only) - names
        if unknown:
            raise ParseError(f"no scenario named {', '.join(sorted(unknown))}")
    except (ParseError, OSError) as exc:
        print(f"cusetpm conformance: {exc}", file=sys.stderr)
        return 2
    total_same = total_diff = 0
    raw = {}
    for k in kernels:
        try:
            c = compare(k, args.files, node=args.node, only=args.only, timeout=args.timeout)
        except rig.RigError as exc:
            print(f"cusetpm conformance: kernel {k}: {exc}", file=sys.stderr)
            return 2
        print(c.report(), flush=True)
        total_same += c.identical
        total_diff += c.differ
        raw[k] = c.raw
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)
    print(f"{total_same} scenarios identical, {total_diff} differ")
    return 1 if total_diff else 0


def _print_transcript(name: str, tr: dict[str, Any]) -> None:
    print(f"scenario {name} ({tr['seconds']}s)")
    for i, s in enumerate(tr["steps"], 1):
        mark = "" if s["expect_ok"] is not False else f"   <-- expected {s['expected']}"
        print(f"  {i:3} L{s['line']:<4} {s['op'][:60]:60} -> {s['result']}{mark}")
    if tr["error"]:
        print(f"  ERROR {tr['error']}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cusetpm.conformance", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run scenarios against an existing node and print the transcripts")
    r.add_argument("--node", required=True, help="the device or file to open, e.g. /dev/tpmrm0")
    r.add_argument("--kernel", choices=KERNELS, help="check =>6.1 / =>6.12 expectations for this kernel")
    r.add_argument("--close-settle", type=float, default=0.0,
                   help="pause after each close (default: none; on a FUSE file, wait for the RELEASE)")
    r.add_argument("--out", help="write the transcripts as JSON")
    r.add_argument("--only", action="append", default=[])
    r.add_argument("files", nargs="*")
    g = sub.add_parser("guest", help="(inside a rig guest) fresh chip + fresh daemon per scenario")
    g.add_argument("--kernel", required=True, choices=KERNELS)
    g.add_argument("--node", default="fuse", choices=NODE_KINDS)
    g.add_argument("--out", required=True)
    g.add_argument("--only", action="append", default=[])
    g.add_argument("--timeout", type=float, default=SCENARIO_TIMEOUT)
    g.add_argument("files", nargs="*")
    _add_conformance_args(sub.add_parser("compare", help="the same as `cusetpm conformance`"))
    s = sub.add_parser("from-strace", help="make a scenario from strace output")
    s.add_argument("log", help="strace output (-f -xx -s 65536), '-' for stdin")
    s.add_argument("--node-pattern", default=r"/dev/tpmrm\d+", help="regex of the node path to keep")
    s.add_argument("--name", default="recorded")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            results = {}
            bad = 0
            for sc in load_scenarios(args.files):
                if args.only and sc.name not in args.only:
                    continue
                tr = run_scenario(sc, args.node, kernel=args.kernel, close_settle=args.close_settle,
                                  after_close=None if args.close_settle else _auto_close_waiter(args.node))
                results[sc.name] = tr
                bad += any(s["expect_ok"] is False for s in tr["steps"]) or bool(tr["error"])
                _print_transcript(sc.name, tr)
            if args.out:
                with open(args.out, "w") as fh:
                    json.dump(results, fh, indent=1)
            return 1 if bad else 0
        if args.cmd == "guest":
            return guest_run(args.kernel, args.node, args.files, args.out, only=args.only, timeout=args.timeout)
        if args.cmd == "compare":
            return run_conformance(args)
        text = sys.stdin.read() if args.log == "-" else Path(args.log).read_text()
        sys.stdout.write(scenario_from_strace(text, args.node_pattern, args.name))
        return 0
    except (ParseError, ValueError, OSError) as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
