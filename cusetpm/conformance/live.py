# SPDX-License-Identifier: GPL-2.0-only
"""Live checking, the comparison: what a program observed of the node and of each real kernel.

``cusetpm check -- PROGRAM`` runs the program itself in every environment (a fresh node on the
host, each kernel's genuine /dev/tpmrm0 in its guest) instead of replaying recorded bytes, so
HMAC sessions get their own nonces and contexts saved by one process load in the next, as they
do for a user.  Each run is an :class:`LiveRun`: the program's exit status and, per call on the
node, an :class:`ObservedStep` (:func:`.strace.observe_strace`), whose result is normalized as a
replayed step's is, so no random byte is ever compared.

This module is sans-I/O: :func:`compare_live` is a pure function from runs to a
:class:`LiveReport`; :mod:`.live_run` does the running.  Findings use the replay mode's words:
``DIFFERENCE`` (the node and a kernel), ``KERNELS DIFFER`` (with the D1-D6 rule of
:func:`.kernel_diff.explain`), and later steps of the same file "follow from" the first.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import TypedDict

from .kernel_diff import explain

__all__ = ["ObservedStep", "LiveRun", "Finding", "LiveReport", "failed_run", "compare_runs", "compare_live"]


class ObservedStep(TypedDict):
    """One call a program made on the node, and what it got."""

    file: str  # a, b, ... by first open ("-": an open that failed)
    op: str  # e.g. "open a nonblock", "write a len=12 cc=0x17b", "read a 10", "poll a in"
    result: str  # normalized as the conformance runner normalizes a replayed step's result
    program: str  # the program (basename of its execve) that made the call


class LiveRun(TypedDict):
    """The program run once in one environment."""

    status: int | None  # its exit status (negative: killed by that signal); None: it did not finish
    steps: list[ObservedStep]
    error: str | None  # the environment could not run it, and why
    output: str  # the end of its stdout and stderr, shown when the exit statuses differ


def failed_run(error: str) -> LiveRun:
    """The run of an environment that could not run the program at all."""
    return {"status": None, "steps": [], "error": error, "output": ""}


_GONE = "<no more calls on the node>"
_TIMING = "every call so far was answered the same: the program may depend on timing"


@dataclass(frozen=True)
class Finding:
    """One place where two environments did not observe the same thing."""

    kind: str  # "DIFFERENCE" (node and kernel) or "KERNELS DIFFER"
    where: str  # "[6.1] sh" or "sh"
    step: int | None  # 1-based; None: the exit status
    program: str  # the program that made the call ("" if unknown or not the same)
    op: str | None  # the operation, if every side made the same one; None: they took different paths
    answers: dict[str, str]  # side ("kernel"/"ours", or a kernel) -> what it got
    why: str | None = None  # the rule that explains it (first difference of its file)
    follows: int | None = None  # the earlier step it follows from
    follows_what: str = "the same file"  # which earlier step that is
    outputs: dict[str, str] = field(default_factory=dict)  # exit status: each side's output tail

    def describe(self) -> str:
        prog = f" ({self.program})" if self.program else ""
        if self.step is None:
            head = f"{self.where} exit status"
        elif self.op is None:
            head = f"{self.where} step {self.step}{prog}: the program made different calls (later ones not compared)"
        else:
            head = f"{self.where} step {self.step}{prog} `{self.op}`"
        width = max(6, max(len(k) + 1 for k in self.answers))
        lines = [f"{self.kind} {head}:"]
        lines += [f"    {k + ':':{width}} {r}" for k, r in self.answers.items()]
        if self.follows is not None:
            lines.append(f"    follows from step {self.follows} ({self.follows_what})")
        elif self.why:
            lines += textwrap.wrap(f"why: {self.why}", 96, initial_indent="    ", subsequent_indent="         ")
        for k, out in self.outputs.items():
            tail = out.rstrip().splitlines()[-6:]
            if tail:
                lines.append(f"    {k} printed:")
                lines += [f"      | {t}" for t in tail]
        return "\n".join(lines)


def _status(run: LiveRun) -> str:
    return "did not finish" if run["status"] is None else str(run["status"])


def compare_runs(kind: str, where: str, runs: dict[str, LiveRun], *, rules: bool = False) -> list[Finding]:
    """Every step where ``runs`` (side -> run, in the order to print) did not observe the same,
    and the exit status.  Steps are compared by position: while every side made the same call
    (operation and program), a different result is a finding; at the first call that is not
    the same the program took different paths, which is one finding, and the rest is not
    compared.  ``rules``: name the kernel rule behind the first difference of each file."""
    labels = list(runs)
    first_of_file: dict[str, int] = {}
    first: int | None = None
    out: list[Finding] = []
    for i in range(max((len(r["steps"]) for r in runs.values()), default=0)):
        here = {k: runs[k]["steps"][i] if i < len(runs[k]["steps"]) else None for k in labels}
        ref = next(s for s in here.values() if s is not None)
        if all(s is not None and (s["op"], s["program"]) == (ref["op"], ref["program"]) for s in here.values()):
            answers = {k: s["result"] for k, s in here.items() if s is not None}
            if len(set(answers.values())) == 1:
                continue
            follows = first_of_file.get(ref["file"])
            why = None
            if follows is None:
                first_of_file[ref["file"]] = i + 1
                why = explain(ref["op"], answers) if rules else None
            out.append(Finding(kind, where, i + 1, ref["program"], ref["op"], answers, why, follows))
            first = i + 1 if first is None else first
            continue
        paths = {k: f"{s['program'] or '?'} `{s['op']}` -> {s['result']}" if s else _GONE for k, s in here.items()}
        files = {s["file"] for s in here.values() if s is not None}
        same_file = min((first_of_file[f] for f in files if f in first_of_file), default=None)
        follows = same_file if same_file is not None else first
        what = "the same file" if same_file is not None else "the first difference"
        why = None if follows is not None else _TIMING
        out.append(Finding(kind, where, i + 1, "", None, paths, why, follows, what))
        first = i + 1 if first is None else first
        break
    statuses = {k: _status(r) for k, r in runs.items()}
    if len(set(statuses.values())) > 1:
        why = None if first is not None else "every call on the node was answered the same: it differs elsewhere"
        outputs = {k: r["output"] for k, r in runs.items()}
        out.append(Finding(kind, where, None, "", None, statuses, why, first, "the first difference", outputs))
    return out


@dataclass
class LiveReport:
    """The outcome of :func:`compare_live`."""

    name: str
    node_kind: str
    node_findings: dict[str, list[Finding]]  # kernel -> the node's differences from it
    kernel_findings: list[Finding]  # where the kernels differ from each other
    errors: list[str]
    runs: dict[str, tuple[LiveRun, LiveRun]]  # kernel -> (node run, kernel run)

    @property
    def exit_status(self) -> int:
        """0: everything identical; 1: a finding; 2: an environment could not run the program."""
        if self.errors:
            return 2
        return 1 if self.kernel_findings or any(self.node_findings.values()) else 0

    def text(self) -> str:
        lines = [f.describe() for fs in self.node_findings.values() for f in fs]
        lines += [f.describe() for f in self.kernel_findings]
        lines += [f"ERROR {e}" for e in self.errors]
        for k, (ours, theirs) in self.runs.items():
            if ours["error"] or theirs["error"]:
                lines.append(f"[{k}] node and kernel: not compared (node {self.node_kind})")
            elif self.node_findings[k]:
                lines.append(f"[{k}] node and kernel: {len(self.node_findings[k])} differences (node {self.node_kind})")
            else:
                lines.append(f"[{k}] node and kernel: identical ({_what(theirs)}, node {self.node_kind})")
        kernels = [k for k, (_, theirs) in self.runs.items() if not theirs["error"]]
        if len(self.runs) > 1 and len(kernels) == len(self.runs):
            both = " and ".join(kernels)
            if self.kernel_findings:
                n = len(self.kernel_findings)
                lines.append(f"kernels {both}: {n} differences between them (the program depends on the kernel)")
            else:
                lines.append(f"kernels {both}: identical ({_what(self.runs[kernels[0]][1])})")
        if not self.errors and not any(r["steps"] for pair in self.runs.values() for r in pair):
            lines.append(
                f"note: {self.name} made no call on the node: does it use $TPM2TOOLS_TCTI, $TCTI or $CUSETPM_DEVICE?"
            )
        return "\n".join(lines)


def _what(run: LiveRun) -> str:
    return f"{len(run['steps'])} calls, exit status {_status(run)}"


def compare_live(name: str, node: dict[str, LiveRun], kernel: dict[str, LiveRun], node_kind: str) -> LiveReport:
    """Compare program ``name``'s runs: ``node`` (kernel -> the run on a node serving that
    kernel's profile) with ``kernel`` (kernel -> the run on that kernel's /dev/tpmrm0), and the
    kernels with each other, oldest first.  An environment that could not run the program is
    an error, and nothing is compared with it."""
    order = sorted(kernel, key=lambda k: tuple(int(p) for p in k.split(".")))
    errors: list[str] = []
    node_findings: dict[str, list[Finding]] = {}
    for k in order:
        ours, theirs = node.get(k, failed_run("not run")), kernel[k]
        for side, run in (("kernel side", theirs), ("node side", ours)):
            if run["error"]:
                errors.append(f"[{k}] {name}: {side}: {run['error']}")
        ok = not ours["error"] and not theirs["error"]
        node_findings[k] = compare_runs("DIFFERENCE", f"[{k}] {name}", {"kernel": theirs, "ours": ours}) if ok else []
    kernel_findings: list[Finding] = []
    if len(order) > 1 and not any(kernel[k]["error"] for k in order):
        kernel_findings = compare_runs("KERNELS DIFFER", name, {k: kernel[k] for k in order}, rules=True)
    runs = {k: (node.get(k, failed_run("not run")), kernel[k]) for k in order}
    return LiveReport(name, node_kind, node_findings, kernel_findings, errors, runs)
