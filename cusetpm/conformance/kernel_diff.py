# SPDX-License-Identifier: GPL-2.0-only
"""Where the real kernels disagree with each other, and which kernel rule explains it.

``cusetpm check`` runs a user's scenario on every kernel; a program that only works on one of
them is the regression a developer wants to hear about, even when the node reproduces each
kernel exactly.  :func:`kernel_differences` compares the real kernels' transcripts step by
step; :func:`explain` names the rule (docs/kernel-rules.md, "Where 6.1 and 6.12 differ",
D1..D6) behind the first difference of each file, and later differences of that file are
reported as following from it (a 6.1 file that got EFAULT keeps getting it).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from .normalize import Transcript

__all__ = ["KernelDifference", "kernel_differences", "explain"]

_D2 = (
    "D2 (with D1): one of this file's saved contexts could not be loaded, because the TPM "
    "answered TPM_RC_HANDLE for it; typically another file flushed this file's session with "
    "FlushContext. 6.1 keeps the parameter bit when it masks the code (tpm2_rc_value() & 0xFF), "
    "so tpm2_load_context() does not recognise TPM_RC_HANDLE and fails the command with EFAULT, "
    "and every later command of the file fails the same way until it is closed. 6.12 masks "
    "with 0xBF, forgets the lost session (an object: ENOENT) and runs the command"
)
_D3 = (
    "D3: a ContextLoad of one of this file's contexts was answered TPM_RC_INTEGRITY; "
    "tpm2_load_context() gives EFAULT on 6.1 and EINVAL on 6.12"
)
_D5 = (
    "D5: a vendor command (0x2000xxxx): tpm2_find_cc() on 6.1 compares the command index only, "
    "so the command is never found and the RM answers 0x000B0143 (TPM_RC_COMMAND_CODE from the "
    "RM layer); 6.12 also compares the V bit and sends it"
)
_D6 = (
    "D6: read(fd, buf, 0): 6.1's tpm_common_read() takes the lock and processes it, which "
    "throws away a pending response; 6.12 returns 0 before taking the lock"
)
_UNKNOWN = (
    "no rule of docs/kernel-rules.md names this; it may follow from an earlier difference of "
    "another file, or be a difference the project does not know yet (please report it)"
)


@dataclass(frozen=True)
class KernelDifference:
    """One step whose result is not the same on every kernel."""

    scenario: str
    step: int  # 1-based
    line: int
    op: str
    results: dict[str, str]  # kernel -> its result
    rule: str  # the explanation, or "follows from step N"
    follows: int | None = field(default=None)  # the earlier step of the same file it follows from

    def describe(self) -> str:
        where = f"{self.scenario} step {self.step} (line {self.line}) `{self.op}`"
        lines = [f"KERNELS DIFFER {where}:"]
        lines += [f"    {k + ':':6} {r}" for k, r in self.results.items()]
        if self.follows is not None:
            lines.append(f"    follows from step {self.follows} (the same file)")
        else:
            lines += textwrap.wrap(f"why: {self.rule}", 96, initial_indent="    ", subsequent_indent="         ")
        return "\n".join(lines)


def _file_of(op: str) -> str | None:
    words = op.split()
    return words[1] if len(words) > 1 else None


def explain(op: str, results: dict[str, str]) -> str:
    """The kernel rule that explains a step's different results on 6.1 and 6.12."""
    old, new = results.get("6.1", ""), results.get("6.12", "")
    words = op.split()
    if words[:1] == ["read"] and words[2:3] == ["0"]:
        return _D6
    if old.startswith("EFAULT") and new.startswith("EINVAL"):
        return _D3
    if old.startswith("EFAULT") or (new.startswith("ENOENT") and not old.startswith("ENOENT")):
        return _D2
    if "rc=0xb0143" in old and "rc=0xb0143" not in new:
        return _D5
    return _UNKNOWN


def kernel_differences(name: str, transcripts: dict[str, Transcript]) -> list[KernelDifference]:
    """Every step of scenario ``name`` whose result differs between the kernels' transcripts
    (kernel -> the real kernel's transcript), oldest kernel first."""
    kernels = sorted(transcripts, key=lambda k: tuple(int(p) for p in k.split(".")))
    if len(kernels) < 2:
        return []
    steps = {k: transcripts[k].get("steps", []) for k in kernels}
    first_of_file: dict[str, int] = {}
    out: list[KernelDifference] = []
    for i in range(max(len(s) for s in steps.values())):
        ref = next(s[i] for s in steps.values() if i < len(s))
        results = {k: steps[k][i]["result"] if i < len(steps[k]) else "<not run>" for k in kernels}
        if len(set(results.values())) == 1:
            continue
        f = _file_of(ref["op"])
        follows = first_of_file.get(f) if f is not None else None
        if follows is None and f is not None:
            first_of_file[f] = i + 1
        rule = f"follows from step {follows}" if follows is not None else explain(ref["op"], results)
        out.append(KernelDifference(name, i + 1, ref["line"], ref["op"], results, rule, follows))
    return out
