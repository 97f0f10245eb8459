# SPDX-License-Identifier: GPL-2.0-only
"""Differences between the real kernels' transcripts, and the rule named for each."""

from __future__ import annotations

from cusetpm.conformance.kernel_diff import explain, kernel_differences
from cusetpm.conformance.normalize import StepResult, Transcript


def transcript(*steps: tuple[str, str]) -> Transcript:
    rows: list[StepResult] = [
        {"line": i + 2, "op": op, "result": res, "expected": None, "expect_ok": None}
        for i, (op, res) in enumerate(steps)
    ]
    return {"steps": rows, "error": None, "seconds": 0.0}


def test_identical_transcripts_have_no_difference():
    t = transcript(("open a", "0"), ("cmd a 17b 0008", "12"))
    assert kernel_differences("s", {"6.1": t, "6.12": t}) == []


def test_one_kernel_alone_has_nothing_to_differ_from():
    assert kernel_differences("s", {"6.12": transcript(("open a", "0"))}) == []


def test_a_lost_session_is_explained_once_and_later_steps_of_that_file_follow_from_it():
    old = transcript(("open a", "0"), ("cmd a 17b 0008", "EFAULT"), ("read a 4096", "0"), ("cmd b 17b 0008", "12"))
    new = transcript(("open a", "0"), ("cmd a 17b 0008", "12"), ("read a 4096", "20"), ("cmd b 17b 0008", "12"))
    first, second = kernel_differences("s", {"6.12": new, "6.1": old})
    assert (first.step, first.results, first.follows) == (2, {"6.1": "EFAULT", "6.12": "12"}, None)
    assert "another file flushed this file's session" in first.rule and "D2" in first.rule
    assert (second.step, second.follows) == (3, 2)
    assert "follows from step 2" in second.describe() and "why:" not in second.describe()
    assert "why: D2" in first.describe() and "6.1:   EFAULT" in first.describe()
    assert max(len(line) for line in first.describe().splitlines()) <= 100  # wrapped for a terminal


def test_each_rule_is_named():
    assert explain("read a 0", {"6.1": "0", "6.12": "EINVAL"}).startswith("D6")
    assert explain("cmd a 161 00", {"6.1": "EFAULT", "6.12": "EINVAL"}).startswith("D3")
    assert explain("cmd a 17a 00", {"6.1": "EFAULT", "6.12": "22"}).startswith("D2")
    assert explain("cmd a 17a 00", {"6.1": "12", "6.12": "ENOENT"}).startswith("D2")
    vendor = {"6.1": "10 tag=8001 size=10 rc=0xb0143", "6.12": "10 tag=8001 size=10 rc=0x143"}
    assert explain("read a 4096", vendor).startswith("D5")
    assert explain("read a 4096", {"6.1": "12", "6.12": "14"}).startswith("no rule")


def test_a_step_one_kernel_did_not_run_is_a_difference():
    (d,) = kernel_differences(
        "s", {"6.1": transcript(("open a", "0")), "6.12": transcript(("open a", "0"), ("close a", "0"))}
    )
    assert d.results == {"6.1": "<not run>", "6.12": "0"}
