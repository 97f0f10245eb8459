# SPDX-License-Identifier: GPL-2.0-only
"""Differential conformance: cusetpm against the real kernel resource manager.

* Guest tests (``@pytest.mark.guest``): one qemu boot per kernel runs the whole corpus in
  ``cusetpm/conformance/corpus/`` against the genuine /dev/tpmrmN (``swtpm chardev --vtpm-proxy``) and
  against a ``cusetpm serve`` daemon with the matching profile, each scenario on fresh TPMs,
  and asserts that the transcripts are identical (up to the listed, unavoidable FUSE
  differences) and that every ``=>`` expectation of the corpus holds on the real kernel.
  A guest that cannot boot is an error, never a skip.
* Unit tests of the scenario parser, the normalizer, the runner mechanics, the comparison
  and the strace converter (no guest).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cusetpm.conformance import KERNELS, NODE_KINDS
from cusetpm.conformance.cli import add_conformance_parser, run_conformance
from cusetpm.conformance.cli import main as conformance_main
from cusetpm.conformance.normalize import Transcript, _FileTrack, poll_names
from cusetpm.conformance.report import EXPECTED_DIFFERENCES, Comparison, compare, diff_transcripts, node_label
from cusetpm.conformance.runner import run_scenario
from cusetpm.conformance.scenario import (
    ParseError,
    _Undefined,
    build_command,
    build_data,
    default_corpus,
    load_scenarios,
    parse_file,
    parse_text,
)
from cusetpm.conformance.sides import FUSE_CLOSE_SETTLE, ForkedDaemon, _auto_close_waiter
from cusetpm.conformance.strace import scenario_from_strace

CORPUS = default_corpus()
# --- guest: the whole corpus against both kernels, for the CUSE node and the FUSE file ---------


#: Opt-in features whose node must still answer as the kernel does, on the FUSE file.
FEATURES = {
    "swap-lazy": ("--swap", "lazy"),
    "swap-residents": ("--swap", "lazy", "--swap-residents", "3"),
    "pyfuse3": ("--fuse-lib", "pyfuse3"),
}
PARAMS = [(k, n, "") for n in NODE_KINDS for k in KERNELS]
PARAMS += [(k, "fuse", f) for f in ("swap-lazy", "swap-residents") for k in KERNELS]
PARAMS += [("6.1", "fuse", "pyfuse3")]  # the FUSE library kept as an option, on the kernel with more differences


@pytest.fixture(scope="module", params=PARAMS, ids=lambda p: "-".join(x for x in (p[1], p[2], p[0]) if x))
def comparison(request) -> Comparison:
    kernel, node, feature = request.param
    t0 = time.monotonic()
    result = compare(kernel, [CORPUS], node=node, serve_args=FEATURES.get(feature, ()))
    print(
        f"\nconformance {kernel} ({node}): {len(result.outcomes)} scenarios, guest {result.guest_seconds:.0f}s, "
        f"call {time.monotonic() - t0:.0f}s, in-guest phases {result.raw.get('phases')}"
    )
    return result


def _details(result: Comparison) -> str:
    return result.report()


@pytest.mark.guest
def test_corpus_runs_completely(comparison: Comparison) -> None:
    assert not comparison.errors, _details(comparison)
    assert len(comparison.outcomes) == len(load_scenarios([CORPUS]))
    for o in comparison.outcomes:
        k = comparison.raw["kernel_side"][o.scenario]
        ours = comparison.raw["ours"][o.scenario]
        assert k["steps"] and ours["steps"], o.scenario


@pytest.mark.guest
def test_corpus_expectations_hold_on_the_real_kernel(comparison: Comparison) -> None:
    assert not comparison.expectation_failures, _details(comparison)


@pytest.mark.guest
def test_transcripts_identical_to_the_kernel(comparison: Comparison) -> None:
    assert comparison.differ == 0 and not comparison.differences, _details(comparison)


# --- host: a few corpus scenarios against a real daemon (no qemu) ----------------------------------

HOST_SCENARIOS = ["read-partial", "write-ebusy", "object-slots-exhaustion", "session-slots", "nonblock-async-errors"]


@pytest.mark.parametrize("feature", ["", "swap-lazy", "swap-residents"])
@pytest.mark.parametrize("name", HOST_SCENARIOS)
def test_corpus_scenario_on_host_daemon(name: str, feature: str, daemon) -> None:
    """The runner against a ``cusetpm serve --fuse`` daemon on this host, fresh per scenario:
    every expectation the corpus states for 6.12 holds (the guest tests compare with the real
    kernel; this catches runner or daemon breakage in seconds)."""
    (sc,) = [s for s in load_scenarios([CORPUS]) if s.name == name]
    node = str(daemon(kernel="6.12", extra_args=FEATURES.get(feature, ())).node)
    waiter = _auto_close_waiter(node) or (lambda: time.sleep(FUSE_CLOSE_SETTLE))
    tr = run_scenario(sc, node, kernel="6.12", after_close=waiter)
    assert tr["error"] is None, tr
    bad = [s for s in tr["steps"] if s["expect_ok"] is False]
    assert not bad, bad


def test_forked_daemon_reports_its_node_on_the_ready_fd(tmp_path: Path) -> None:
    """The in-guest daemon side on this host: forked ``cusetpm serve --ready-fd`` answers with
    its node's path on the pipe, serves it, and exits 0 on SIGTERM."""
    d = ForkedDaemon(tmp_path, "6.12", "fuse", 0)
    try:
        node = d.ready()
        assert node == str(tmp_path / "try1" / "mnt" / "tpmrm0"), d.log()
        assert d.attempts == 1 and os.path.exists(node)
        (sc,) = parse_text("scenario x\nopen a\ncmd a 17b 0008 => 12\nread a 4096 => 20 rc=0x0\nclose a\n")
        tr = run_scenario(sc, node, kernel="6.12", after_close=d.close_waiter())
        assert tr["error"] is None and all(s["expect_ok"] for s in tr["steps"][1:3]), tr
    finally:
        rc = d.stop()
    assert rc == 0, d.log()


# --- parser -------------------------------------------------------------------------------------


SAMPLE = """
# file-wide definitions
let body 0000 000b
scenario first
open a nonblock          # comment
cmd a 186 ${body}        => 14
read a 4096              => handle=0x80ffffff =>6.1 tag=8001
save h a 10 4
write a 80010000000e 00000165 ${h}
poll a in 500
close a
scenario second
open b rdonly
read b 0 raw             =>6.12 0
sleep 0.01
"""


def test_parse_sample() -> None:
    first, second = parse_text(SAMPLE, "sample.scn")
    assert [first.name, second.name] == ["first", "second"]
    assert first.lets == {"body": ("0000", "000b")}
    ops = [s.op for s in first.steps]
    assert ops == ["open", "cmd", "read", "save", "write", "poll", "close"]
    assert first.steps[0].args == ("a", "nonblock")
    assert first.steps[0].line == 5
    read = first.steps[2]
    assert read.text == "read a 4096"
    assert read.expected_for("6.12") == ("handle=0x80ffffff",)
    assert read.expected_for("6.1") == ("handle=0x80ffffff", "tag=8001")
    assert read.expected_for(None) == ("handle=0x80ffffff",)
    assert second.steps[1].expected_for("6.1") is None
    assert second.steps[1].expected_for("6.12") == ("0",)


def test_file_without_scenario_line_is_named_after_the_file(tmp_path: Path) -> None:
    f = tmp_path / "my-program.scn"
    f.write_text("open a\ncmd a 17b 0008\nread a 4096\n")
    (sc,) = parse_file(f)
    assert sc.name == "my-program" and len(sc.steps) == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("scenario x\nfrobnicate a\n", "unknown operation"),
        ("scenario x\nwrite a 8001 0\n", "even number of hex digits"),
        ("scenario x\nwrite a zz\n", "even number of hex digits"),
        ("scenario x\nwrite a 00*x\n", "repeat count"),
        ("scenario x\nopen a\nscenario x\nopen a\n", "defined twice"),
        ("open a\nscenario x\nopen a\n", "before the first 'scenario'"),
        ("scenario x\nopen a =>5.10 ok\n", "unknown kernel"),
        ("scenario x\nopen a =>\n", "empty expectation"),
        ("scenario x\nread a big\n", "decimal"),
        ("scenario x\nopen a sideways\n", "unknown open flag"),
        ("scenario x\ncmd a\n", r"takes 2\+ arguments"),
        ("scenario x\ncmd a xyz\n", "command code"),
        ("scenario x\npoll a sometimes\n", "poll takes"),
        ("scenario x\nsetfl a fast\n", "setfl takes"),
        ("scenario x\nsave 1x a 10\n", "bad variable name"),
        ("scenario x\nwrite a ${x\n", "variable reference"),
        ("scenario empty\n", "no operations"),
        ("scenario a b\n", "scenario NAME"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ParseError, match=message) as info:
        parse_text(text, "bad.scn")
    assert "bad.scn" in str(info.value)


def test_build_data_and_command() -> None:
    v = {"h": bytes.fromhex("80ffffff")}
    assert build_data(["8001", "00*3", "ab${h}cd"], v) == bytes.fromhex("8001000000ab80ffffffcd")
    assert build_data([], v) == b""
    with pytest.raises(_Undefined):
        build_data(["${nope}"], v)
    assert build_command(["17b", "0008"], v) == bytes.fromhex("80010000000c0000017b0008")
    assert build_command(["tag=8002", "0000017b", "${h}"], v) == bytes.fromhex("80020000000e0000017b80ffffff")


# --- normalizer ---------------------------------------------------------------------------------


def _track(cmd: str) -> _FileTrack:
    t = _FileTrack(fd=-1)
    t.written(bytes.fromhex(cmd))
    return t


def test_normalize_random_bytes_are_not_recorded() -> None:
    t = _track("80010000000c0000017b0008")
    rsp = bytes.fromhex("800100000014000000000008") + os.urandom(8)
    assert t.got(rsp, raw=False) == "20 tag=8001 size=20 rc=0x0"
    assert t.got(b"", raw=False) == "0"


def test_normalize_partial_reads() -> None:
    t = _track("80010000000c0000017b0008")
    rsp = bytes.fromhex("800100000014000000000008") + bytes(8)
    assert t.got(rsp[:4], False) == "4 hdr[0:4]=80010000"
    assert t.got(rsp[4:7], False) == "3 hdr[4:7]=001400"
    assert t.got(rsp[7:12], False) == "5 hdr[7:10]=000000"
    assert t.got(rsp[12:], False) == "8"
    # the next read starts a new response
    assert (
        t.got(bytes.fromhex("80010000000a000b0143"), True)
        == "10 tag=8001 size=10 rc=0xb0143 bytes=80010000000a000b0143"
    )


def test_normalize_handles_and_capabilities() -> None:
    t = _track("80010000000e00000186" + "0000000b")
    assert t.got(bytes.fromhex("80010000000e0000000080fffffe"), False) == "14 tag=8001 size=14 rc=0x0 handle=0x80fffffe"
    t = _track("800100000016" + "0000017a" + "00000001800000000000000a")
    rsp = bytes.fromhex("80010000001b00000000" + "01" + "00000001" + "00000002" + "80ffffff80fffffe")
    assert t.got(rsp, False) == "27 tag=8001 size=27 rc=0x0 more=1 cap=1 count=2 handles=80ffffff,80fffffe"
    t = _track("800100000016" + "0000017a" + "00000006000002030000000001")
    rsp = bytes.fromhex("80010000001b00000000" + "00" + "00000006" + "00000001" + "0000020300000001")
    assert t.got(rsp, False).endswith("cap=6 count=1 body=0000020300000001")
    # ContextSave: sequence, savedHandle, hierarchy and the blob length only
    t = _track("80010000000e0000016280ffffff")
    body = os.urandom(8) + bytes.fromhex("80000000" + "40000001" + "0004") + os.urandom(4)
    rsp = bytes.fromhex("8001") + (10 + len(body)).to_bytes(4, "big") + bytes(4) + body
    assert t.got(rsp, False) == "32 tag=8001 size=32 rc=0x0 saved=0x80000000 hier=0x40000001 blob=4"
    # error responses carry no body fields
    t = _track("80010000000e0000017380ffffff")
    assert t.got(bytes.fromhex("80010000000a0000018b"), False) == "10 tag=8001 size=10 rc=0x18b"


def test_poll_names() -> None:
    import select

    assert poll_names(0) == "none"
    assert poll_names(select.POLLIN | select.POLLRDNORM) == "IN|RDNORM"
    assert poll_names(select.POLLOUT | select.POLLWRNORM | select.POLLHUP) == "OUT|HUP|WRNORM"


# --- runner mechanics (on /dev/null, which accepts everything) -----------------------------------


def test_runner_on_dev_null() -> None:
    (sc,) = parse_text("""
scenario null
open a                     => ok
cmd a 17b 0008             => 12
write a 00*7000            => 7000
read a 4096                => 0
poll a                     => IN|OUT|RDNORM|WRNORM
poll a in 0                => IN|RDNORM
lseek a                    => 0
ioctl a                    => ENOTTY
setfl a nonblock           => ok
save v a 0                 => ERR
write a ${v}
read b 1                   => ERR
open a
close a                    => 0
close a                    => ERR
""")
    tr = run_scenario(sc, os.devnull)
    assert tr["error"] is None
    results = [s["result"] for s in tr["steps"]]
    assert results[9].startswith("ERR save")
    assert results[10] == "ERR undefined variable v"
    assert results[11] == "ERR file 'b' is not open"
    assert results[12] == "ERR file 'a' is already open"
    assert all(s["expect_ok"] in (True, None) for s in tr["steps"]), tr["steps"]


def test_runner_reports_unmet_expectations_per_kernel() -> None:
    (sc,) = parse_text("scenario x\nopen a =>6.1 ok =>6.12 nope\nclose a\n")
    assert run_scenario(sc, os.devnull, kernel="6.1")["steps"][0]["expect_ok"] is True
    assert run_scenario(sc, os.devnull, kernel="6.12")["steps"][0]["expect_ok"] is False
    assert run_scenario(sc, os.devnull)["steps"][0]["expect_ok"] is None


# --- comparison ------------------------------------------------------------------------------------


def _tr(*results: str, ops: tuple[str, ...] = ()) -> Transcript:
    ops = ops or tuple(f"op{i}" for i in range(len(results)))
    return {
        "steps": [
            {"line": i + 1, "op": o, "result": r, "expected": None, "expect_ok": None}
            for i, (o, r) in enumerate(zip(ops, results, strict=True))
        ],
        "error": None,
        "seconds": 0,
    }


def test_diff_transcripts() -> None:
    same = diff_transcripts("6.12", "fuse", "s", _tr("ok", "12"), _tr("ok", "12"))
    assert same.identical and not same.differences
    d = diff_transcripts("6.12", "fuse", "s", _tr("ok", "12"), _tr("ok", "EBUSY"))
    assert not d.identical
    (diff,) = d.differences
    assert (diff.step, diff.kernel_result, diff.our_result, diff.expected) == (2, "12", "EBUSY", None)
    short = diff_transcripts("6.12", "fuse", "s", _tr("ok", "12"), _tr("ok"))
    assert short.differences[0].our_result == "<not run>"
    err = diff_transcripts("6.12", "fuse", "s", _tr("ok"), {"steps": [], "error": "boom", "seconds": 0})
    assert not err.identical and err.errors


def test_expected_differences_apply_to_their_nodes_only() -> None:
    ops = ("open a", "write a")
    k, o = _tr("ok", "EINVAL", ops=ops), _tr("ok", "0", ops=ops)
    fuse = diff_transcripts("6.1", "fuse", "write-einval-sizes", k, o)
    assert fuse.identical and fuse.differences[0].expected is not None
    cuse = diff_transcripts("6.1", "cuse", "write-einval-sizes", k, o)
    assert cuse.identical  # the FUSE layer decides zero-length writes for CUSE too
    seek_ops = ("open w", "lseek w")
    ks, os_ = _tr("ok", "ESPIPE", ops=seek_ops), _tr("ok", "0", ops=seek_ops)
    assert diff_transcripts("6.12", "cuse", "access-modes", ks, os_).identical
    assert not diff_transcripts("6.12", "fuse", "access-modes", ks, os_).identical
    other = diff_transcripts("6.1", "fuse", "another-scenario", k, o)
    assert not other.identical
    # a different result at the same step is not covered
    o2 = _tr("ok", "EBUSY", ops=ops)
    assert not diff_transcripts("6.1", "fuse", "write-einval-sizes", k, o2).identical


def test_pyfuse3_differences_apply_only_to_the_pyfuse3_node() -> None:
    """O_NONBLOCK set by fcntl is lost by pyfuse3 only; FUSE's own differences apply to both."""
    assert node_label("fuse", ["--fuse-lib=pyfuse3"]) == node_label("fuse", ["--fuse-lib", "pyfuse3"]) == "pyfuse3"
    assert node_label("fuse", ["--swap", "lazy"]) == "fuse" and node_label("cuse", ["--fuse-lib=pyfuse3"]) == "cuse"
    ops: tuple[str, ...] = ("open a", "setfl a nonblock", "cmd a 173 80ffffff")
    k, o = _tr("ok", "ok", "14", ops=ops), _tr("ok", "ok", "EINVAL", ops=ops)
    assert diff_transcripts("6.12", "pyfuse3", "setfl-nonblock-switch", k, o).identical
    assert not diff_transcripts("6.12", "fuse", "setfl-nonblock-switch", k, o).identical
    ops = ("open a", "write a")
    k, o = _tr("ok", "EINVAL", ops=ops), _tr("ok", "0", ops=ops)
    assert diff_transcripts("6.12", "pyfuse3", "write-einval-sizes", k, o).identical


def test_expected_differences_name_real_corpus_steps() -> None:
    """Each listed difference points at an existing step of the corpus, for a real node."""
    by_name = {s.name: s for s in load_scenarios([CORPUS])}
    for e in EXPECTED_DIFFERENCES:
        assert e.nodes and set(e.nodes) <= {*NODE_KINDS, "pyfuse3"}, e
        assert e.scenario in by_name, e
        assert e.op in [s.text for s in by_name[e.scenario].steps], e


def test_corpus_parses_and_is_documented() -> None:
    scenarios = load_scenarios([CORPUS])
    assert len(scenarios) >= 40
    names = [s.name for s in scenarios]
    assert len(names) == len(set(names))
    for s in scenarios:
        # every scenario says, somewhere, what it must produce on the real kernel
        assert any(step.expect for step in s.steps) or s.name.startswith("short-frame"), s.name
    assert (CORPUS / "README.md").is_file()


# --- strace -------------------------------------------------------------------------------------------


# Real `strace -f -xx -s 65536` output of tpm2_getrandom (shortened), plus another file.
STRACE = r"""
178   openat(AT_FDCWD, "\x2f\x65\x74\x63\x2f\x6c\x64", O_RDONLY|O_CLOEXEC) = 3
178   read(3, "\x7f\x45\x4c\x46", 832) = 4
178   close(3)                          = 0
178   openat(AT_FDCWD, "\x2f\x64\x65\x76\x2f\x74\x70\x6d\x72\x6d\x30", O_RDWR|O_NONBLOCK) = 3
178   write(3, "\x80\x01\x00\x00\x00\x0c\x00\x00\x01\x7b\x00\x08", 12) = 12
178   poll([{fd=3, events=POLLIN}], 1, 1000) = 1 ([{fd=3, revents=POLLIN}])
178   read(3, "\x80\x01\x00\x00\x00\x14\x00\x00\x00\x00", 10) = 10
178   poll([{fd=3, events=POLLIN}], 1, -1) = 1 ([{fd=3, revents=POLLIN}])
178   read(3, "\x00\x08\x01\x02\x03\x04\x05\x06\x07\x08", 10) = 10
178   fcntl(3, F_SETFL, O_RDWR)         = 0
178   write(4, "\x00", 1)               = 1
179   openat(AT_FDCWD, "/dev/tpmrm0", O_WRONLY) = 5
178   close(3)                          = 0
179   write(5, "\x80\x01\x00\x00\x00\x0a\x00\x00\x00\x01", 10) = 10
"""


def test_scenario_from_strace() -> None:
    text = scenario_from_strace(STRACE)
    (sc,) = parse_text(text)
    assert [s.text for s in sc.steps] == [
        "open a nonblock",
        "write a 80010000000c0000017b0008",
        "poll a in 1000",
        "read a 10",
        "poll a in 10000",
        "read a 10",
        "setfl a block",
        "open b wronly",
        "close a",
        "write b 80010000000a00000001",
    ]


@pytest.mark.parametrize("path", ["/dev/tpmrm0", "/run/cusetpm/tpmrm0", "/tmp/x/node/tpmrm1", "/dev/cusetpmrm0"])
def test_the_default_pattern_keeps_kernel_and_cusetpm_nodes(path: str) -> None:
    trace = f'1 openat(AT_FDCWD, "{path}", O_RDWR) = 3\n1 close(3) = 0\n'
    assert scenario_from_strace(trace).splitlines()[2:] == ["open a", "close a"]


def test_a_trace_with_no_matching_node_is_an_error_not_an_empty_scenario(tmp_path) -> None:
    trace = '1 openat(AT_FDCWD, "/run/cusetpm/tpmrm0", O_RDWR) = 3\n'
    with pytest.raises(ValueError, match="whole path"):
        scenario_from_strace(trace, node_pattern="tpmrm0")
    (tmp_path / "t.log").write_text(trace)
    r = subprocess.run(
        [sys.executable, "-m", "cusetpm.conformance", "from-strace", "--node-pattern", "/dev/tpmrm0", str(tmp_path / "t.log")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0 and "no file in the trace" in r.stderr and r.stdout == ""


def test_scenario_from_strace_rejects_truncated_strings() -> None:
    with pytest.raises(ValueError, match="-s 65536"):
        scenario_from_strace('1 openat(AT_FDCWD, "/dev/tpmrm0", O_RDWR) = 3\n1 write(3, "\\x80\\x01"..., 12) = 12\n')


# --- command line --------------------------------------------------------------------------------------


def test_cli_parser_wiring() -> None:
    parser = argparse.ArgumentParser(prog="cusetpm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_conformance_parser(sub)
    args = parser.parse_args(["conformance", "--kernel", "6.1", "--node", "cuse", "x.scn"])
    assert (args.kernel, args.node, args.files, args.func) == ("6.1", "cuse", ["x.scn"], run_conformance)
    args = parser.parse_args(["conformance"])
    assert (args.kernel, args.node, args.files) == ("all", "fuse", [])


def test_cli_rejects_bad_scenario_file_without_booting(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.scn"
    bad.write_text("scenario x\nfrobnicate\n")
    parser = argparse.ArgumentParser()
    add_conformance_parser(parser.add_subparsers())
    args = parser.parse_args(["conformance", str(bad)])
    assert run_conformance(args) == 2
    assert "unknown operation" in capsys.readouterr().err


def test_module_run_command(tmp_path: Path, capsys) -> None:
    f = tmp_path / "t.scn"
    f.write_text("scenario t\nopen a\nwrite a 0011 => 2\nclose a\n")
    out = tmp_path / "t.json"
    assert conformance_main(["run", "--node", os.devnull, "--out", str(out), str(f)]) == 0
    assert "scenario t" in capsys.readouterr().out
    assert json.loads(out.read_text())["t"]["steps"][1]["result"] == "2"
