# SPDX-License-Identifier: GPL-2.0-only
"""On the host: boot a guest per kernel, compare the two sides' transcripts and report.

:data:`EXPECTED_DIFFERENCES` lists every corpus step where a node cannot give the kernel's
result, with the reason; :func:`compare` runs a guest, :func:`diff_transcripts` compares one
scenario's transcripts step by step.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import KERNELS, NODE_KINDS
from .normalize import GuestRun, Transcript, failed_transcript
from .scenario import ParseError, expand_paths, load_scenarios

__all__ = [
    "ExpectedDifference",
    "EXPECTED_DIFFERENCES",
    "Difference",
    "ScenarioOutcome",
    "Comparison",
    "diff_transcripts",
    "compare",
]


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
_FUSE_READ0 = (
    "FUSE answers read(fd, buf, 0) with 0 itself; 6.1's driver would discard the pending "
    "response (or report and clear a pending async errno)"
)
_FUSE_SETFL = (
    "pyfuse3 does not pass the file's flags of each read and write on to the daemon, so "
    "O_NONBLOCK set by fcntl(F_SETFL) after open is not seen and the write runs "
    "synchronously: errors come from write(2) instead of read(2) (the default FUSE node, "
    "which reads the flags FUSE sends with each request, does not differ)"
)

_FUSE_EFAULT = (
    "FUSE direct I/O pins the user buffer before it sends the request: with an unreadable/"
    "unwritable buffer read(2)/write(2) fail with EFAULT in the FUSE layer and the daemon never "
    "sees the call (kernel: the response is discarded / the buffer zero-filled, so a later short "
    "write inherits command code 0 instead of the old one).  CUSE uses the same fuse_direct_io()"
)
_CUSE_SEEK = (
    "cuse.c gives every CUSE file noop_llseek and never applies FOPEN_NONSEEKABLE, so lseek "
    "returns 0 and pread/pwrite act as read/write (kernel: ESPIPE); the FUSE file does give ESPIPE"
)
_SHORT_FRAME = (
    "a command whose header size is 1..9 cannot be delimited on a stream: the kernel's "
    "vtpm-proxy swtpm never answers it (ETIME after the command's duration) and keeps the "
    "bytes, corrupting the next command; cusetpm's stream backends answer TPM_RC_COMMAND_SIZE "
    "at once (backends/base.py: unframeable).  The TPM's transport decides this, not the RM"
)
BOTH = ("fuse", "cuse")
E = ExpectedDifference

#: Every step where a node is known to differ from the kernel, with the reason.
EXPECTED_DIFFERENCES: tuple[ExpectedDifference, ...] = (
    E("read-efault", "poll a", "OUT|WRNORM", "IN|RDNORM", _FUSE_EFAULT, nodes=BOTH),
    E("read-efault", "read a 4096", "0", "20 tag=8001 size=20 rc=0x0", _FUSE_EFAULT, nodes=BOTH),
    E(
        "write-efault",
        "read a 4096",
        "10 tag=8001 size=10 rc=0xb0143",
        "10 tag=8001 size=10 rc=0x142",
        _FUSE_EFAULT,
        nodes=BOTH,
    ),
    E("write-einval-sizes", "write a", "EINVAL", "0", _FUSE_WRITE0, nodes=BOTH),
    E("read-zero-size", "read a 4096", "0", "20 tag=8001 size=20 rc=0x0", _FUSE_READ0, ("6.1",), BOTH),
    E("read-zero-size", "poll a", "OUT|WRNORM", "IN|RDNORM", _FUSE_READ0, ("6.1",), BOTH),
    E("read-zero-unlocks-write", "cmd a 17b 0010", "12", "EBUSY", _FUSE_READ0, ("6.1",), BOTH),
    E(
        "read-zero-unlocks-write",
        "read a 4096",
        "28 tag=8001 size=28 rc=0x0",
        "20 tag=8001 size=20 rc=0x0",
        _FUSE_READ0,
        ("6.1",),
        BOTH,
    ),
    E("read-zero-async-error", "read a 0", "EINVAL", "0", _FUSE_READ0, ("6.1",), BOTH),
    E("read-zero-async-error", "read a 4096", "0", "EINVAL", _FUSE_READ0, ("6.1",), BOTH),
    E("setfl-nonblock-switch", "cmd a 173 80ffffff", "14", "EINVAL", _FUSE_SETFL, nodes=("pyfuse3",)),
    E("setfl-nonblock-switch", "poll a in 2000", "IN|RDNORM", "none", _FUSE_SETFL, nodes=("pyfuse3",)),
    E("setfl-nonblock-switch", "read a 4096", "EINVAL", "0", _FUSE_SETFL, nodes=("pyfuse3",)),
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
    raw: GuestRun

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
        if (
            (node in e.nodes or (node == "pyfuse3" and "fuse" in e.nodes))
            and kernel in e.kernels
            and e.scenario == scenario
            and e.op == op
            and e.kernel_result == k
            and e.our_result == o
        ):
            return e
    return None


def diff_transcripts(kernel: str, node: str, name: str, ktr: Transcript, otr: Transcript) -> ScenarioOutcome:
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
            failures.append(
                f"step {i + 1} (line {k['line']}) `{k['op']}`: expected {k['expected']!r}, got {k['result']!r}"
            )
    return ScenarioOutcome(kernel, name, diffs, errors, failures)


def node_label(node: str, serve_args: Sequence[str] = ()) -> str:
    """Which node's expected differences apply: ``pyfuse3`` for a FUSE node served by it."""
    args = " ".join(serve_args).replace("=", " ")
    return "pyfuse3" if node == "fuse" and "--fuse-lib pyfuse3" in args else node


def compare(
    kernel: str,
    scenario_files: Sequence[str | os.PathLike[str]] = (),
    *,
    node: str = "fuse",
    only: Sequence[str] = (),
    timeout: float = 1500.0,
    serve_args: Sequence[str] = (),
) -> Comparison:
    """Boot one guest running ``kernel`` and compare every scenario (fresh TPMs each side).

    ``scenario_files``: files or directories (default: the shipped corpus); ``node``: which
    cusetpm node to test, ``"fuse"`` or ``"cuse"``; ``only``: scenario names to run;
    ``serve_args``: more arguments for the node's ``cusetpm serve`` (an opt-in feature).
    Raises :class:`cusetpm.rig.RigError` if the guest cannot produce a result.
    """
    from .. import rig

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
        argv = [
            sys.executable,
            "-m",
            "cusetpm.conformance",
            "guest",
            "--kernel",
            kernel,
            "--node",
            node,
            "--out",
            out,
            *(a for n in only for a in ("--only", n)),
            *(f"--serve-arg={a}" for a in serve_args),
            *files,
        ]
        repo = str(Path(__file__).resolve().parents[2])  # the directory holding the cusetpm package
        command = f"cd {shlex.quote(repo)} && " + " ".join(shlex.quote(a) for a in argv)
        res = rig.run_in_guest(kernel, command, timeout=timeout, share=share)
        if res.returncode != 0 or not os.path.exists(out):
            raise rig.RigError(
                f"conformance: the in-guest run failed (status {res.returncode}):\n{res.output[-6000:]}"
                f"\n--- console tail ---\n{res.console[-3000:]}"
            )
        with open(out) as fh:
            raw: GuestRun = json.load(fh)
    outcomes = []
    for name in names:
        ktr = raw["kernel_side"].get(name, failed_transcript("not run"))
        otr = raw["ours"].get(name, failed_transcript("not run"))
        outcomes.append(diff_transcripts(kernel, node_label(node, serve_args), name, ktr, otr))
    return Comparison(kernel, node, outcomes, time.monotonic() - t0, res.seconds, raw)
