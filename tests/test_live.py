# SPDX-License-Identifier: GPL-2.0-only
"""Live checking (``cusetpm check -- PROGRAM``): strace output -> what the program observed
(:func:`observe_strace`), and the comparison of those observations (:func:`compare_live`).

No guest here: the traces are made by hand the way ``strace -f -xx -s 65536`` prints them, and
the transcripts are small.  tests/test_record.py runs ``check`` against the real kernels.
"""

from __future__ import annotations

import struct
import subprocess
import sys

from cusetpm.conformance.live import LiveRun, ObservedStep, compare_live, compare_runs, failed_run
from cusetpm.conformance.strace import observe_strace, scenario_from_strace, strace_calls

NODE = "/dev/tpmrm0"


def esc(data: bytes) -> str:
    """A string literal as strace -xx prints it."""
    return '"' + "".join(f"\\x{b:02x}" for b in data) + '"'


def command(cc: int, body: bytes, tag: int = 0x8001) -> bytes:
    return struct.pack(">HII", tag, 10 + len(body), cc) + body


def response(rc: int, body: bytes = b"", tag: int = 0x8001) -> bytes:
    return struct.pack(">HII", tag, 10 + len(body), rc) + body


def trace(random: bytes, nonce: bytes, rc: int = 0, pid: int = 4242) -> str:
    """tpm2-tss's device TCTI as strace shows it: GetRandom (the answer is TPM randomness), then
    a StartAuthSession (the command carries a caller nonce, the answer the TPM's), each read as
    a header and then the rest, after a poll."""
    start = struct.pack(">IIH", 0x40000007, 0x40000007, len(nonce)) + nonce + struct.pack(">HBHH", 0, 0, 0x10, 0x0B)
    answer = struct.pack(">IH", 0x03000000, 16) + random[::-1] + random if rc == 0 else b""
    lines = [
        f"{pid} execve({esc(b'/usr/bin/tpm2_startauthsession')}, [{esc(b'tpm2_startauthsession')}], 0x7ffd /* 9 vars */) = 0",
        f"{pid} openat(AT_FDCWD, {esc(NODE.encode())}, O_RDWR|O_NONBLOCK) = 3",
    ]
    for cmd, rsp in (
        (command(0x17B, b"\x00\x10"), response(0, struct.pack(">H", 16) + random)),
        (command(0x176, start), response(rc, answer)),
    ):
        lines += [
            f"{pid} write(3, {esc(cmd)}, {len(cmd)}) = {len(cmd)}",
            f"{pid} poll([{{fd=3, events=POLLIN}}], 1, -1) = 1 ([{{fd=3, revents=POLLIN}}])",
            f"{pid} read(3, {esc(rsp[:10])}, 10) = 10",
        ]
        if len(rsp) > 10:
            lines += [
                f"{pid} poll([{{fd=3, events=POLLIN}}], 1, -1) = 1 ([{{fd=3, revents=POLLIN}}])",
                f"{pid} read(3, {esc(rsp[10:])}, {len(rsp) - 10}) = {len(rsp) - 10}",
            ]
    lines += [f"{pid} close(3)                          = 0", f"{pid} +++ exited with 0 +++"]
    return "\n".join(lines) + "\n"


def run(steps: list[ObservedStep], status: int | None = 0, output: str = "") -> LiveRun:
    return {"status": status, "steps": steps, "error": None, "output": output}


def steps(*rows: tuple[str, str]) -> list[ObservedStep]:
    return [{"file": op.split()[1], "op": op, "result": res, "program": "tool"} for op, res in rows]


# --- strace -> observed transcript -----------------------------------------------------------------------


def test_observed_results_are_normalized_as_the_runner_normalizes_them():
    got = observe_strace(trace(bytes(range(16)), b"\x11" * 16), NODE)
    assert [(s["op"], s["result"]) for s in got] == [
        ("open a nonblock", "ok"),
        ("write a len=12 cc=0x17b", "12"),
        ("poll a in", "IN"),
        ("read a 10", "10 tag=8001 size=28 rc=0x0"),
        ("poll a in", "IN"),
        ("read a 18", "18"),
        ("write a len=43 cc=0x176", "43"),
        ("poll a in", "IN"),
        ("read a 10", "10 tag=8001 size=48 rc=0x0"),
        ("poll a in", "IN"),
        ("read a 38", "38 handle=0x03000000"),
        ("close a", "0"),
    ]
    assert {s["program"] for s in got} == {"tpm2_startauthsession"} and {s["file"] for s in got} == {"a"}


def test_random_bytes_and_nonces_are_never_compared():
    """Two runs whose TPM randomness and caller nonces differ in every byte observe the same."""
    one = observe_strace(trace(b"\x01" * 16, b"\xaa" * 16), NODE)
    other = observe_strace(trace(b"\xfe" * 16, b"\x55" * 16, pid=77), NODE)
    assert one == other
    assert compare_runs("DIFFERENCE", "[6.1] t", {"kernel": run(one), "ours": run(other)}) == []


def test_errors_failed_opens_timeouts_and_interrupted_calls():
    text = "\n".join(
        [
            f"7   openat(AT_FDCWD, {esc(NODE.encode())}, O_RDWR) = -1 EBUSY (Device or resource busy)",
            f"7   openat(AT_FDCWD, {esc(NODE.encode())}, O_RDWR) = 4",
            "7   poll([{fd=4, events=POLLIN}], 1, 0) = 0 (Timeout)",
            "7   read(4, 0x7ffc9d1c, 4096) = -1 EAGAIN (Resource temporarily unavailable)",
            # another process's call in between: the read is printed in two pieces
            "7   read(4,  <unfinished ...>",
            "8   getpid()                          = 8",
            f"7   <... read resumed>{esc(response(0x101)[:10])}, 4096) = 10",
            "7   fcntl(4, F_SETFL, O_RDWR|O_NONBLOCK) = 0",
            "7   ioctl(4, TCGETS, 0x7ffc9d1c) = -1 ENOTTY (Inappropriate ioctl for device)",
            "7   close(4 <unfinished ...>",
            "7   <... close resumed>)             = 0",
        ]
    )
    assert [(s["op"], s["result"]) for s in observe_strace(text, NODE)] == [
        ("open -", "EBUSY"),
        ("open a", "ok"),
        ("poll a in", "none"),
        ("read a 4096", "EAGAIN"),
        ("read a 4096", "10 tag=8001 size=10 rc=0x101"),
        ("setfl a nonblock", "ok"),
        ("ioctl a TCGETS", "ENOTTY"),
        ("close a", "0"),
    ]


def test_the_program_of_a_call_is_what_its_process_last_exec_d():
    """A vfork'd child may exec before its parent's vfork returns in the trace."""
    text = "\n".join(
        [
            f"1 execve({esc(b'/usr/bin/sh')}, [{esc(b'sh')}], 0x1 /* 3 vars */) = 0",
            "1 vfork( <unfinished ...>",
            f"2 execve({esc(b'/usr/bin/tpm2_getrandom')}, [{esc(b'tpm2_getrandom')}], 0x1 /* 3 vars */ <unfinished ...>",
            "1 <... vfork resumed>)              = 2",
            "2 <... execve resumed>)             = 0",
            f"2 openat(AT_FDCWD, {esc(NODE.encode())}, O_RDWR) = 3",
            "1 clone(child_stack=NULL, flags=SIGCHLD) = 3",
            f"3 openat(AT_FDCWD, {esc(NODE.encode())}, O_RDWR) = 3",
        ]
    )
    assert [(s["file"], s["program"]) for s in observe_strace(text, NODE)] == [("a", "tpm2_getrandom"), ("b", "sh")]


def test_only_the_node_s_exact_path_counts_and_the_scenario_converter_still_works():
    text = trace(bytes(16), bytes(16))
    assert observe_strace(text, "/dev/tpmrm1") == []  # the kernel's node is another path: no call
    assert [c.call for c in strace_calls(text, NODE)][:3] == ["open", "write", "poll"]
    get_random = command(0x17B, bytes([0, 16])).hex()
    assert scenario_from_strace(text, NODE).splitlines()[2:5] == [
        "open a nonblock",
        f"write a {get_random}",
        "poll a in 10000",
    ]


# --- comparing observed transcripts ----------------------------------------------------------------------

SAME = steps(("open a", "ok"), ("write a len=12 cc=0x17b", "12"), ("read a 4096", "20 tag=8001 size=20 rc=0x0"))


def test_identical_runs_are_identical_and_exit_0():
    report = compare_live("t", {"6.1": run(SAME), "6.12": run(SAME)}, {"6.1": run(SAME), "6.12": run(SAME)}, "fuse")
    assert report.exit_status == 0
    assert report.text().splitlines() == [
        "[6.1] node and kernel: identical (3 calls, exit status 0, node fuse)",
        "[6.12] node and kernel: identical (3 calls, exit status 0, node fuse)",
        "kernels 6.1 and 6.12: identical (3 calls, exit status 0)",
    ]


def test_a_different_rc_is_a_difference_and_later_steps_of_its_file_follow_from_it():
    kernel = steps(
        ("open a", "ok"),
        ("open b", "ok"),
        ("write a len=14 cc=0x161", "14"),
        ("read a 4096", "10 tag=8001 size=10 rc=0x9a2"),
        ("write b len=12 cc=0x17b", "12"),
        ("read b 4096", "20 tag=8001 size=20 rc=0x0"),
        ("read a 4096", "0"),
    )
    ours = [dict(s) for s in kernel]
    ours[3]["result"] = "14 tag=8001 size=14 rc=0x0 handle=0x80ffffff"
    ours[6]["result"] = "EINVAL"
    report = compare_live("t", {"6.12": run(ours)}, {"6.12": run(kernel)}, "cuse")  # type: ignore[arg-type]
    first, later = report.node_findings["6.12"]
    assert (first.step, first.follows, later.step, later.follows) == (4, None, 7, 4)
    assert report.exit_status == 1
    text = report.text()
    assert "DIFFERENCE [6.12] t step 4 (tool) `read a 4096`:\n    kernel: 10 tag=8001 size=10 rc=0x9a2\n" in text
    assert "    ours:   14 tag=8001 size=14 rc=0x0 handle=0x80ffffff\n" in text
    assert "DIFFERENCE [6.12] t step 7 (tool) `read a 4096`:" in text and "follows from step 4 (the same file)" in text
    assert text.splitlines()[-1] == "[6.12] node and kernel: 2 differences (node cuse)"


def test_a_program_that_depends_on_the_kernel_gets_the_rule_and_its_exit_status_compared():
    old = steps(("open a", "ok"), ("write a len=12 cc=0x17b", "EFAULT"))
    new = steps(("open a", "ok"), ("write a len=12 cc=0x17b", "12"), ("read a 4096", "20 tag=8001 size=20 rc=0x0"))
    report = compare_live(
        "t",
        {"6.1": run(old, 1), "6.12": run(new)},
        {"6.1": run(old, 1, "OSError: [Errno 14] Bad address\n"), "6.12": run(new)},
        "fuse",
    )
    assert report.node_findings == {"6.1": [], "6.12": []}  # the node reproduces each kernel
    rc, path, status = report.kernel_findings
    assert (
        "KERNELS DIFFER t step 2 (tool) `write a len=12 cc=0x17b`:\n    6.1:   EFAULT\n    6.12:  12\n" in rc.describe()
    )
    assert "why: D2 (with D1)" in rc.describe()
    assert path.op is None and path.follows == 2 and "6.1:   <no more calls on the node>" in path.describe()
    assert status.step is None and status.answers == {"6.1": "1", "6.12": "0"}
    assert "| OSError: [Errno 14] Bad address" in status.describe()
    assert "kernels 6.1 and 6.12: 3 differences between them (the program depends on the kernel)" in report.text()
    assert report.exit_status == 1


def test_another_path_is_one_finding_and_the_rest_is_not_compared():
    kernel = steps(("open a", "ok"), ("write a len=12 cc=0x17b", "12"), ("close a", "0"))
    ours = steps(("open a", "ok"), ("write a len=22 cc=0x17a", "22"), ("read a 4096", "EAGAIN"), ("close a", "0"))
    (finding,) = compare_runs("DIFFERENCE", "[6.1] t", {"kernel": run(kernel), "ours": run(ours)})
    assert finding.step == 2 and finding.op is None and "timing" in (finding.why or "")
    assert finding.answers == {
        "kernel": "tool `write a len=12 cc=0x17b` -> 12",
        "ours": "tool `write a len=22 cc=0x17a` -> 22",
    }


def test_a_different_exit_status_alone_is_a_difference():
    (finding,) = compare_runs("DIFFERENCE", "[6.1] t", {"kernel": run(SAME, 0), "ours": run(SAME, 3)})
    assert (finding.step, finding.answers) == (None, {"kernel": "0", "ours": "3"})
    assert finding.describe().startswith("DIFFERENCE [6.1] t exit status:\n    kernel: 0\n    ours:   3\n")


def test_an_environment_that_could_not_run_the_program_is_an_error_not_a_comparison():
    report = compare_live("t", {"6.1": run(SAME)}, {"6.1": failed_run("rig: guest timed out")}, "fuse")
    assert report.exit_status == 2 and report.node_findings == {"6.1": []}
    assert "ERROR [6.1] t: kernel side: rig: guest timed out" in report.text()


def test_a_program_that_never_opens_the_node_is_said_so():
    report = compare_live("true", {"6.12": run([])}, {"6.12": run([])}, "fuse")
    assert report.exit_status == 0 and "made no call on the node" in report.text()


def test_check_of_a_missing_program_is_127(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cusetpm", "check", "--", "no-such-program-here"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 127 and "command not found" in r.stderr
