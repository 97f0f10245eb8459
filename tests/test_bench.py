# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py: its command counting, its report's shapes, and one tiny end-to-end run (numbers not
judged)."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench"] = bench
_spec.loader.exec_module(bench)


def frame(cc: int, body: bytes = b"") -> bytes:
    return (0x8001).to_bytes(2, "big") + (10 + len(body)).to_bytes(4, "big") + cc.to_bytes(4, "big") + body


def test_count_frames_counts_whole_frames_and_keeps_the_rest() -> None:
    a, b = frame(0x17B, b"\x00\x10"), frame(0x165, b"\x80\x00\x00\x01")
    assert bench.count_frames(b"") == (0, b"")
    assert bench.count_frames(a + b) == (2, b"")
    assert bench.count_frames(a + b[:7]) == (1, b[:7])
    n, rest = bench.count_frames(a[:5])
    assert (n, rest) == (0, a[:5])
    n2, rest2 = bench.count_frames(rest + a[5:])
    assert (n2, rest2) == (1, b"")


def _fake_tpm(listener: socket.socket) -> None:
    """Answers every command frame with a 10-byte success response."""
    conn, _ = listener.accept()
    pending = b""
    with conn:
        while data := conn.recv(4096):
            n, pending = bench.count_frames(pending + data)
            conn.sendall(frame(0) * n)


def test_relay_counts_commands_split_across_writes() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    threading.Thread(target=_fake_tpm, args=(listener,), daemon=True).start()
    relay = bench.CountingRelay(listener.getsockname()[1])
    try:
        with socket.create_connection(("127.0.0.1", relay.port)) as c:
            cmd = frame(0x17B, b"\x00\x10")
            for chunk in (cmd[:3], cmd[3:] + cmd, cmd[:11], cmd[11:]):
                c.sendall(chunk)
                time.sleep(0.01)
            got = b""
            while len(got) < 30:
                got += c.recv(100)
        deadline = time.monotonic() + 5
        while relay.commands < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.commands == 3
        assert got == frame(0) * 3
    finally:
        relay.close()
        listener.close()


def test_node_route_takes_extra_serve_arguments_and_names_its_column() -> None:
    assert bench.node_route("6.12").label == "node(6.12)"
    assert bench.node_route("6.12", "global").label == "node(6.12,global)"
    assert bench.node_route("6.12", extra=("--swap", "lazy")).label == "node(6.12,lazy)"
    assert bench.node_route("6.1", extra=("--swap", "lazy"), label="mine").label == "mine"
    assert bench.serve_offers("--sessions") and not bench.serve_offers("--no-such-option")


def test_the_figures_report_failures_and_what_was_not_measured() -> None:
    from cusetpm.testing.bench_load import FilesFigure, LoadFigure
    from cusetpm.testing.bench_report import Figures, report_files, report_load

    files = FilesFigure("node(6.12)", 1000, 10, error="OSError: EMFILE")
    assert report_files(files) == ["1000 files on node(6.12): FAILED: OSError: EMFILE"]
    node = LoadFigure("node(6.12)", 64, 5.0, "cusetpm serve", counts=[10, 30], elapsed=[1.0, 1.0], window=1.0)
    abrmd = LoadFigure("abrmd", 64, 5.0, "tpm2-abrmd", error="not installed: tpm2-abrmd")
    out = report_load([node, abrmd])
    assert "  abrmd: FAILED: not installed: tpm2-abrmd" in out
    assert "Goal (node >= 1.0x abrmd, commands/s, 64 clients): not measured" in out
    assert out[-1] == "Goal (slowest / fastest client >= 0.5, 64 clients): node(6.12): NOT MET (0.33)"
    assert Figures(files=files).failed() and not Figures(load=[node]).failed()
    from cusetpm.testing.bench_report import report_turns
    from cusetpm.testing.bench_turns import TurnsPath, turns_paths

    assert [p.label for p in turns_paths("6.1", residents=False, abrmd=False)] == ["node(6.1)", "node(6.1,lazy)"]
    ok, broken = TurnsPath("node(6.12,lazy,2)", (), batches=[700, 600, 650], cmds=1.0), TurnsPath("abrmd", None)
    broken.error = "command count: RuntimeError: gone"
    out = report_turns([ok, broken])
    assert out[1].split() == ["µs", "per", "Sign", "650", "n/a"] and out[2].split()[-2:] == ["1.00", "n/a"]
    assert out[-1] == "  abrmd: FAILED: command count: RuntimeError: gone"
    assert Figures(turns=[broken]).failed() and not Figures(turns=[ok]).failed()


NUM = r"-?\d+(\.\d+)?"


def test_a_tiny_run_prints_the_table_and_leaves_nothing_behind(tmp_path: Path) -> None:
    args = ["--rounds", "1", "--random", "2", "--sign", "1", "--warmup", "1", "--count", "2", "--kernel", "6.12"]
    args += ["--floor", "200", "--files", "50", "--clients", "4", "--client-seconds", "1", "--turns", "2", "--no-guest"]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    counts_head = next(line for line in lines if line.startswith("backend cmds per user cmd"))
    header = counts_head.replace("C relay", "C-relay").split()[5:]
    lazy = ["node(6.12,lazy)", "node(6.12,global,lazy)"] if bench.serve_offers("--swap") else []
    cpu = max(os.sched_getaffinity(0))
    pinned = (
        [f"node(6.12,cpu{cpu})"] + [f"node(6.12,lazy,cpu{cpu})"] * bool(lazy) if bench.serve_offers("--cpu") else []
    )
    assert header == ["direct", "C-relay", "node(6.12)", "node(6.12,global)", *lazy, *pinned, "abrmd"]
    counts = [line for line in lines if line.startswith("GetRandom(16)")][1]  # second table: commands
    assert counts.split()[1:4] == ["1.00", "1.00", "1.00"]  # direct, the C relay, the node on an empty space
    # With free slots, --sessions global sends no backend command kernel mode does not.
    table = lines[lines.index(next(line for line in lines if line.startswith("backend cmds"))) :][1:4]
    kernel, global_ = header.index("node(6.12)"), header.index("node(6.12,global)")
    for row in table:
        cells = row.replace("same, key loaded", "key-loaded").split()[-len(header) :]
        assert cells[kernel] == cells[global_], row

    def one(pattern: str) -> re.Match[str]:
        found = [m for line in lines if (m := re.fullmatch(pattern, line))]
        assert len(found) == 1, (pattern, r.stdout)
        return found[0]

    # The idle request against C libfuse: a table and one goal per node column.
    floor_head = one(r"µs per idle request \(x C libfuse\) +C libfuse +(.*)").group(1).split()
    assert floor_head == header[2:-1]  # every node column
    one(rf"read\(\), nothing pending +{NUM}( +{NUM} {NUM}x){{{len(floor_head)}}}")
    one(rf"poll\(\) +{NUM}( +{NUM} {NUM}x){{{len(floor_head)}}}")
    one(rf"read\(\), one CPU +{NUM}( +{NUM} {NUM}x){{{len(floor_head)}}}")
    one(rf"poll\(\), one CPU +{NUM}( +{NUM} {NUM}x){{{len(floor_head)}}}")
    for label in floor_head:
        for where in ("", ", client and daemon on one CPU"):
            one(
                rf"Goal \(idle request on the node <= 1\.5x C libfuse{where}\): {re.escape(label)}: (NOT )?MET "
                rf"\(read {NUM}x, poll {NUM}x\)"
            )
    # The limits: the backend's own cost over a raw socket, each node column against its limit,
    # and issue 9's goals for every node column in its mode.
    one(r"backend's own cost, µs \(cmds\) +alone +kernel cycle +limit, kernel +limit, lazy")
    one(r"GetRandom\(16\) +\d+ +\d+ \(1\) +\d+ +\d+")
    one(r"  same, key loaded +\d+ +\d+ \(4\) +\d+ +\d+")
    one(r"Sign ECDSA P256 +\d+ +\d+ \(4\) +\d+ +\d+")
    one(r"  one raw socket to its own swtpm, both on CPU \d+; unpinned, GetRandom\(16\) alone: \d+ µs")
    one(r"  limit = backend cost \+ 5 x the C libfuse idle read \(\d+ µs\);.*")
    assert one(r"µs per command \(x its limit\) +(.*)").group(1).split() == ["C", "relay", *floor_head]
    # Every node column and abrmd against the whole path in C.
    against = one(r"µs per command \(x C relay\) +(.*)")
    assert against.group(1).split() == [*floor_head, "abrmd"]
    row = lines[lines.index(against.string) + 1]
    assert re.fullmatch(rf"GetRandom\(16\)( +{NUM} {NUM}x){{{len(floor_head) + 1}}}", row), row
    assert not any(line.startswith("Goal (node <= 1.5x direct") for line in lines)
    verdict = rf"(NOT )?MET \(GetRandom {NUM}x, key loaded {NUM}x, Sign {NUM}x\)"
    for label in floor_head:
        if ",lazy" in label:
            one(rf"Goal \(--swap lazy: each row <= 0\.8x abrmd\): {re.escape(label)}: {verdict}")
            one(rf"Goal \(--swap lazy: each row <= 1\.3x its limit, .*\): {re.escape(label)}: {verdict}")
            one(
                rf"Goal \(--swap lazy: 1\.00 backend command per user command, a client alone\): {re.escape(label)}:"
                rf" (NOT )?MET \(GetRandom {NUM}, key loaded {NUM}, Sign {NUM}\)"
            )
        else:
            one(rf"Goal \(kernel mode: each row <= 1\.3x its limit, .*\): {re.escape(label)}: {verdict}")
            one(rf"Goal \(kernel mode: Sign <= 1\.0x abrmd\): {re.escape(label)}: (NOT )?MET \(Sign {NUM}x\)")
    # Memory per open file.
    one(
        rf"50 files open on node\(6\.12\), one GetRandom each: daemon VmRSS \d+ KiB after 10 warm-up files, \d+ KiB with all open \({NUM} s to open them\)"
    )
    one(rf"Goal \(daemon memory <= 8 KiB per open file\): node\(6\.12\): (NOT )?MET \({NUM} KiB per file\)")
    # Many clients: node against abrmd.
    one(r"4 clients, GetRandom\(16\) for 1 s +node\(6\.12\) +abrmd")
    one(rf"commands/s, all clients +\d+ {NUM}x +\d+")
    one(rf"slowest / fastest client +{NUM} +{NUM}")
    one(r"server CPU, % of one CPU +\d+% +\d+%")
    one(r"client CPU per command, µs +\d+ +\d+")
    one(rf"Goal \(node >= 1\.0x abrmd, commands/s, 4 clients\): node\(6\.12\): (NOT )?MET \({NUM}x\)")
    one(rf"Goal \(slowest / fastest client >= 0\.5, 4 clients\): node\(6\.12\): (NOT )?MET \({NUM}\)")
    # Two clients taking turns: one backend command a Sign only with both resident.
    if lazy:
        one(
            r"Two clients taking turns, each its own key +node\(6\.12\) +node\(6\.12,lazy\) +node\(6\.12,lazy,2\) +abrmd"
        )
        one(r"µs per Sign +\d+ +\d+ +\d+ +\d+")
        one(r"backend cmds per Sign +4\.00 +4\.00 +1\.00 +\d\.\d\d")
    one(r"CUSE node against the kernel's /dev/tpmrm0, one 6\.12 guest: not measured: --no-guest")
    words = " ".join(r.stdout.split())
    assert "the same client for every path, a tpm2-pytss TCTI loop (transmit the bytes" in words
    assert "each the bench's client (a tpm2-pytss TCTI loop" in words  # the 4 clients too
    assert "FAILED" not in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_guest_figure_reads_the_guests_line_and_says_what_was_not_measured() -> None:
    from cusetpm.testing.bench_guest import GuestFigure, parse_output
    from cusetpm.testing.bench_report import Figures, report_guest

    line = (
        '{"cusetpm_bench_guest": 1, "release": "6.12.1-amd64", "error": null, "node_start_s": 9.5,'
        ' "sizes": {"GetRandom(16)": 4, "ReadPublic, one object loaded": 2},'
        ' "handles": {"kernel": "0x80ffffff", "node": "0x80ffffff"},'
        ' "batches": {"GetRandom(16)": {"kernel": [100, 110, 90], "node": [120, 140, 130]},'
        ' "ReadPublic, one object loaded": {"kernel": [200, 210, 190], "node": [400, 410, 390]}}}'
    )
    fig = parse_output(GuestFigure("6.12", 3), f"noise\n{{not json\n{line}\nmore noise\n")
    assert fig.error is None and fig.release == "6.12.1-amd64" and fig.ratio("GetRandom(16)") == 1.3
    out = report_guest(fig)
    assert out[1].split() == ["GetRandom(16)", "100", "130", "1.30x"]
    assert out[4] == "  batch means node: 120-140, 390-410 µs"
    assert out[5].endswith("guest): node(6.12,cuse): NOT MET (GetRandom 1.30x, ReadPublic 2.00x)")
    assert out[6] == "The floor, a C CUSE relay: not measured: the guest did not run it"
    assert out[7] == "The floor, a Python CUSE relay: not measured: the guest did not run it"
    assert out[8] == "The floor, a Python CUSE relay (trio): not measured: the guest did not run it"
    assert "0x80ffffff" in " ".join(out[9:]) and not Figures(guest=fig).failed()
    fig.relay_skipped = "not installed: gcc (Debian: gcc)"
    assert report_guest(fig)[6] == "The floor, a C CUSE relay: not measured: not installed: gcc (Debian: gcc)"

    relayed = line.replace('"node": [400, 410, 390]', '"node": [400, 410, 390], "relay": [300, 310, 290]')
    relayed = relayed.replace('"node": [120, 140, 130]', '"node": [120, 140, 130], "relay": [110, 115, 105]')
    relayed = relayed.replace('"relay": [300, 310, 290]', '"relay": [300, 310, 290], "pyrelay": [330, 340, 320]')
    relayed = relayed.replace('"relay": [110, 115, 105]', '"relay": [110, 115, 105], "pyrelay": [120, 125, 115]')
    relayed = relayed.replace('"pyrelay": [330, 340, 320]', '"pyrelay": [330, 340, 320], "triorelay": [350, 360, 340]')
    relayed = relayed.replace('"pyrelay": [120, 125, 115]', '"pyrelay": [120, 125, 115], "triorelay": [125, 125, 125]')
    fig = parse_output(GuestFigure("6.12", 3), relayed)
    assert fig.ratio("GetRandom(16)", "relay") == 1.1 and fig.ratio("ReadPublic, one object loaded") == 2.0
    out = report_guest(fig)
    assert out[0].endswith("C CUSE relay   Python CUSE relay   Python CUSE relay (trio)")
    assert out[1].split() == ["GetRandom(16)", "100", "130", "1.30x", "110", "1.10x", "120", "1.20x", "125", "1.25x"]
    assert out[5:8] == [
        "  batch means relay: 105-115, 290-310 µs",
        "  batch means pyrelay: 115-125, 320-340 µs",
        "  batch means triorelay: 125-125, 340-360 µs",
    ]
    assert out[9:12] == [
        "The floor, a C CUSE relay on the kernel's own /dev/tpmrm0: GetRandom 1.10x, ReadPublic 1.50x the kernel;"
        " the node GetRandom 1.18x, ReadPublic 1.33x it",
        "The floor, a Python CUSE relay on the kernel's own /dev/tpmrm0: GetRandom 1.20x, ReadPublic 1.65x the"
        " kernel; the node GetRandom 1.08x, ReadPublic 1.21x it",
        "The floor, a Python CUSE relay (trio) on the kernel's own /dev/tpmrm0: GetRandom 1.25x, ReadPublic 1.75x"
        " the kernel; the node GetRandom 1.04x, ReadPublic 1.14x it",
    ]

    lost = parse_output(GuestFigure("6.12", 3), "rig: /dev/tpmrm0 did not appear\n")
    assert lost.error == "the guest printed no result line: rig: /dev/tpmrm0 did not appear"
    assert report_guest(lost)[-1].endswith("guest): not measured") and Figures(guest=lost).failed()
    skipped = GuestFigure("6.12", 3, skipped="the rig cannot boot here: rig: required tool 'swtpm' not found")
    assert report_guest(skipped) == [
        "CUSE node against the kernel's /dev/tpmrm0, one 6.12 guest: not measured: the rig cannot boot"
        " here: rig: required tool 'swtpm' not found"
    ]
    assert not Figures(guest=skipped).failed()


@pytest.mark.guest
def test_the_guest_figure_in_a_small_run(tmp_path: Path) -> None:
    """``--guest-only`` boots one 6.12 guest and prints the table, the goal and how (shapes,
    not speed)."""
    args = ["--guest-only", "--guest-rounds", "2", "--guest-random", "5", "--guest-public", "3", "--warmup", "1"]
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), *args],
        cwd=REPO,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    head = r"µs per command in the guest \(TCG; x kernel\) +/dev/tpmrm0 +/dev/cusetpm-bench +C CUSE relay"
    assert re.fullmatch(head + r" +Python CUSE relay +Python CUSE relay \(trio\)", lines[0]), r.stdout
    assert re.fullmatch(rf"GetRandom\(16\) +\d+( +\d+ {NUM}x){{4}}", lines[1]), r.stdout
    assert re.fullmatch(rf"ReadPublic, one object loaded +\d+( +\d+ {NUM}x){{4}}", lines[2]), r.stdout
    for i, path in ((3, "kernel"), (4, "node"), (5, "relay"), (6, "pyrelay"), (7, "triorelay")):
        assert re.fullmatch(rf"  batch means {path}: \d+-\d+, \d+-\d+ µs", lines[i]), r.stdout
    goal = r"Goal \(CUSE node <= 1\.5x the kernel's /dev/tpmrm0, same swtpm, one 6\.12 guest\): node\(6\.12,cuse\): "
    assert re.fullmatch(goal + rf"(NOT )?MET \(GetRandom {NUM}x, ReadPublic {NUM}x\)", lines[8]), r.stdout
    for i, what in ((9, "C CUSE relay"), (10, "Python CUSE relay"), (11, r"Python CUSE relay \(trio\)")):
        floor = rf"The floor, a {what} on the kernel's own /dev/tpmrm0: GetRandom {NUM}x, ReadPublic {NUM}x"
        assert re.fullmatch(floor + rf" the kernel; the node GetRandom {NUM}x, ReadPublic {NUM}x it", lines[i]), (
            r.stdout
        )
    how = " ".join(lines[12:])
    assert how.startswith("How measured (guest): one Debian 6.12.") and "(0x80ffffff)" in how, how
    assert "2 rounds" in how and "(5 GetRandom, 3 ReadPublic)" in how and "py_cuse_relay --trio" in how, how
    assert "FAILED" not in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_report_names_the_clients_stack() -> None:
    from argparse import Namespace

    from cusetpm.testing.bench_report import api_words

    assert api_words(Namespace(api="tcti")).startswith("a tpm2-pytss TCTI loop")
    assert api_words(Namespace(api="esapi")).startswith("tpm2-pytss ESAPI (its receive reads the header")
    assert api_words(Namespace()) == api_words(Namespace(api="tcti"))  # a report made before --api
