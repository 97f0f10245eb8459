# SPDX-License-Identifier: GPL-2.0-only
"""``cusetpm record`` and ``cusetpm check`` with unmodified tpm2-tools."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cusetpm.conformance.scenario import parse_text

ROOT = Path(__file__).resolve().parent.parent


def cusetpm(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cusetpm", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_record_writes_what_the_program_did_and_passes_its_status_through(tmp_path):
    out = tmp_path / "p.scn"
    script = "tpm2_createprimary -c p.ctx >/dev/null && tpm2_getrandom 4 >/dev/null && exit 3"
    r = cusetpm("record", "-o", str(out), "--", "sh", "-c", script, cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    (sc,) = parse_text(out.read_text())
    ops = [s.text.split()[0] for s in sc.steps]
    assert ops.count("open") == ops.count("close") >= 2  # two tools, each its own file
    writes = [s.text for s in sc.steps if s.text.startswith("write")]
    assert any(w.split()[2].replace(" ", "")[12:20] == "00000131" for w in writes)  # CreatePrimary
    assert any(w.split()[2][12:20] == "0000017b" for w in writes)  # GetRandom


def test_record_points_every_tcti_variable_at_the_node(tmp_path):
    r = cusetpm("record", "--", "sh", "-c", 'echo "$TPM2TOOLS_TCTI $TPM2OPENSSL_TCTI $CUSETPM_DEVICE"', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tools, openssl, device = r.stderr.split()  # the program's stdout goes to stderr
    assert tools == openssl == f"device:{device}" and device.endswith("/tpmrm0")
    assert r.stdout.splitlines()[1] == "scenario sh" and len(r.stdout.splitlines()) == 2  # no calls


def test_record_of_a_missing_program_is_127(tmp_path):
    assert cusetpm("record", "--", "no-such-program-here", cwd=tmp_path).returncode == 127


TPM2_TOOLS = (
    "tpm2_createprimary -c p.ctx && tpm2_create -C p.ctx -u k.pub -r k.priv && "
    "tpm2_startauthsession -S s.ctx --policy-session && tpm2_policypcr -S s.ctx -l sha256:0 && "
    "tpm2_flushcontext s.ctx"
)


@pytest.mark.guest
def test_check_finds_tpm2_tools_identical_to_each_kernel_and_the_kernels_to_each_other(tmp_path):
    """The five-tool sequence, run live in every environment: each tool loads the contexts the
    one before saved (``-C p.ctx``, ``-S s.ctx``) from the same TPM, as for a user, so the node
    and both kernels observe the same and the kernels agree with each other."""
    r = cusetpm("check", "--kernel", "all", "--", "sh", "-c", TPM2_TOOLS, cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = re.search(
        r"^\[6\.1\] node and kernel: identical \((\d+) calls, exit status 0, node (fuse|cuse)\)$", r.stdout, re.M
    )
    assert calls and int(calls.group(1)) > 100, r.stdout  # the five tools' calls, all compared
    assert (
        f"[6.12] node and kernel: identical ({calls.group(1)} calls, exit status 0, node {calls.group(2)})" in r.stdout
    )
    assert f"kernels 6.1 and 6.12: identical ({calls.group(1)} calls, exit status 0)" in r.stdout
    assert "DIFFER" not in r.stdout and "ERROR" not in r.stdout
    assert list(tmp_path.iterdir()) == []  # p.ctx and the rest went to fresh directories
    # progress on stderr while it ran (not a terminal: plain lines)
    for kernel in ("6.1", "6.12"):
        assert f"cusetpm: [{kernel}] on the node: exit status 0, {calls.group(1)} calls" in r.stderr, r.stderr
        assert f"cusetpm: [{kernel}] booting the guest: done in" in r.stderr
        assert f"cusetpm: [{kernel}] sh on the kernel's /dev/tpmrm0: exit status 0 in " in r.stderr, r.stderr


@pytest.mark.guest
def test_check_of_one_tool_is_identical_on_every_kernel(tmp_path):
    r = cusetpm("check", "-q", "--", "tpm2_createprimary", "-c", "p.ctx", cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kernels 6.1 and 6.12: identical" in r.stdout and "cusetpm: [" not in r.stderr


#: A program that depends on a 6.1/6.12 difference: file b flushes file a's session, then a
#: uses its own file again.  6.12 forgets the lost session; 6.1 fails a's every command.
FLUSHES_ANOTHERS_SESSION = r"""
import os, struct, sys
dev = os.environ["CUSETPM_DEVICE"]
def cmd(fd, cc, body):
    os.write(fd, struct.pack(">HII", 0x8001, 10 + len(body), cc) + body)
    return os.read(fd, 4096)
a, b = os.open(dev, os.O_RDWR), os.open(dev, os.O_RDWR)
null = struct.pack(">I", 0x40000007)
start = null + null + struct.pack(">H", 16) + bytes(16) + struct.pack(">HBHH", 0, 0, 0x10, 0x0B)
handle = cmd(a, 0x176, start)[10:14]
assert struct.unpack(">I", cmd(b, 0x165, handle)[6:10])[0] == 0  # b flushes a's session
print("a's GetRandom:", cmd(a, 0x17B, struct.pack(">H", 8))[6:10].hex())
os.close(a); os.close(b)
"""


@pytest.mark.guest
def test_check_reports_a_program_that_depends_on_the_kernel(tmp_path):
    prog = tmp_path / "flush_other.py"
    prog.write_text(FLUSHES_ANOTHERS_SESSION)
    r = cusetpm("check", "-q", "--kernel", "all", "--", sys.executable, str(prog), cwd=tmp_path, timeout=1500)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cusetpm: [" not in r.stderr  # -q: no progress
    assert re.search(r"^\[6\.1\] node and kernel: identical \(7 calls, exit status 1,", r.stdout, re.M), r.stdout
    assert re.search(r"^\[6\.12\] node and kernel: identical \(10 calls, exit status 0,", r.stdout, re.M)
    # ...the node reproduces each kernel, but the kernels disagree
    assert "KERNELS DIFFER python" in r.stdout and "`write a len=12 cc=0x17b`:\n    6.1:   EFAULT\n" in r.stdout
    assert "another file flushed this file's session" in " ".join(r.stdout.split())
    assert "follows from step 7 (the same file)" in r.stdout  # 6.1's a makes no further call
    assert re.search(r"exit status:\n    6\.1:   1\n    6\.12:  0\n", r.stdout), r.stdout
    assert "| OSError: [Errno 14] Bad address" in r.stdout  # what the program said on 6.1
    assert "kernels 6.1 and 6.12: 3 differences between them (the program depends on the kernel)" in r.stdout


def _replay(node: Path, scn: Path, out: Path) -> list[tuple[str, str]]:
    """Run a scenario against ``node``; each step's operation (poll timeouts aside) and result."""
    from cusetpm.conformance.cli import main as conformance_main

    assert conformance_main(["run", "--node", str(node), "--out", str(out), str(scn)]) == 0
    (transcript,) = json.loads(out.read_text()).values()
    assert transcript["error"] is None
    return [(re.sub(r"^(poll \S+ in) \d+$", r"\1 T", s["op"]), s["result"]) for s in transcript["steps"]]


def test_a_recorded_scenario_and_the_strace_of_the_same_run_replay_the_same(tmp_path, daemon):
    tools = "tpm2_createprimary -c p.ctx >/dev/null && tpm2_getrandom 8 >/dev/null && tpm2_flushcontext -t"
    trace = tmp_path / "trace.txt"
    strace = ["strace", "-f", "-xx", "-s", "65536", "-o", str(trace)]
    r = cusetpm("record", "-o", "rec.scn", "--", *strace, "sh", "-c", tools, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    conv = subprocess.run(
        [sys.executable, "-m", "cusetpm.conformance", "from-strace", str(trace)], capture_output=True, text=True
    )
    assert conv.returncode == 0, conv.stderr
    (tmp_path / "strace.scn").write_text(conv.stdout)
    recorded = _replay(daemon().node, tmp_path / "rec.scn", tmp_path / "rec.json")
    converted = _replay(daemon().node, tmp_path / "strace.scn", tmp_path / "strace.json")
    assert sum(op.startswith("write") for op, _ in recorded) >= 4  # both tools' commands are in it
    assert recorded == converted


@pytest.mark.guest
def test_record_serves_a_cuse_device_where_the_kernel_has_cuse(tmp_path):
    from cusetpm.rig import run_in_guest

    out = tmp_path / "c.scn"
    cmd = (
        f"{sys.executable} -m cusetpm record -o {out} -- sh -c 'tpm2_getrandom 4 >/dev/null; echo $CUSETPM_DEVICE >&2'"
    )
    result = run_in_guest("6.12", f"cd {ROOT} && {cmd}", timeout=400, share=str(tmp_path))
    assert result.returncode == 0, result.output
    assert re.search(r"^/dev/cusetpm-record\d+$", result.output, re.M), result.output
    text = out.read_text()
    assert "(kernel 6.12, CUSE)" in text.splitlines()[0]
    (sc,) = parse_text(text)
    assert [s.text.split()[0] for s in sc.steps][:2] == ["open", "write"] and sc.steps[-1].text == "close a"
