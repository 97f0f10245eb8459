# SPDX-License-Identifier: GPL-2.0-only
"""The scenario language: parse scenario files, find the shipped corpus, build the bytes.

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
"""

from __future__ import annotations

import os
import re
import select
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from . import KERNELS

__all__ = [
    "Step",
    "Scenario",
    "ParseError",
    "parse_text",
    "parse_file",
    "load_scenarios",
    "default_corpus",
    "expand_paths",
    "build_data",
    "build_command",
]

SCENARIO_SUFFIX = ".scn"

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
    return bool(re.fullmatch(rf"(0x)?[0-9A-Fa-f]{{1,{max_digits}}}", s))


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
    """The corpus shipped with the package (package data: ``cusetpm/conformance/corpus/``)."""
    corpus = resources.files("cusetpm.conformance") / "corpus"
    # A regular (unzipped) install gives a Path; scenario files are read from it and, inside
    # a guest, from the same path on the host root.
    return corpus if isinstance(corpus, Path) else Path(str(corpus))


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
