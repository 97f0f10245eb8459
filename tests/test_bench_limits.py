# SPDX-License-Identifier: GPL-2.0-only
"""The bench's limits (issue 9): the verdicts and ratios its report prints for fixed figures,
and the raw-socket measurement of the backend's own cost against a real swtpm (shapes and
command counts, not speed)."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from cusetpm.testing import bench_limits
from cusetpm.testing.bench_floor import Floor
from cusetpm.testing.bench_limits import BackendBench, BackendCost, RawTpm, TpmError
from cusetpm.testing.bench_paths import OPS, Route, abrmd_route, direct_route, node_route
from cusetpm.testing.bench_report import Figures, goals, limit_of, report_limits

GR, KEYED, SIGN = (op for op, _, _ in OPS)


def cost(alone: tuple[float, float, float] = (20, 20, 300), cycle: tuple[float, float] = (100, 400)) -> BackendCost:
    """A backend cost with one batch per row and mode (medians: these figures)."""
    c = BackendCost(rounds=1, cpu=1)
    c.batches["alone"] = {GR: [alone[0]], KEYED: [alone[1]], SIGN: [alone[2]]}
    c.batches["cycle"] = {KEYED: [cycle[0]], SIGN: [cycle[1]]}
    return c


def route(r: Route, gr: float, keyed: float, sign: float, cmds: tuple[float, float, float] = (1, 4, 4)) -> Route:
    r.batches = {GR: [gr], KEYED: [keyed], SIGN: [sign]}
    r.cmds = dict(zip((GR, KEYED, SIGN), cmds, strict=True))
    return r


FLOOR = Floor(read_us=10.0, poll_us=9.0)  # five requests: 50 µs


def line(out: list[str], start: str, label: str) -> str:
    found = [x for x in out if x.startswith(start) and f": {label}: " in x]
    assert len(found) == 1, (start, label, out)
    return found[0].split(f": {label}: ", 1)[1]


def test_a_rows_limit_is_its_backend_cost_plus_five_floor_requests() -> None:
    c = cost()
    # Kernel mode: the kernel's cycle (GetRandom with nothing loaded is its own cycle).
    assert [limit_of(c, FLOOR, op, "kernel") for op in (GR, KEYED, SIGN)] == [70, 150, 450]
    # --swap lazy: the command alone.
    assert [limit_of(c, FLOOR, op, "lazy") for op in (GR, KEYED, SIGN)] == [70, 70, 350]
    assert limit_of(c, None, GR, "kernel") is None and limit_of(None, FLOOR, GR, "lazy") is None
    assert limit_of(c, Floor(error="gcc failed"), SIGN, "kernel") is None


def test_the_goals_judge_kernel_mode_and_lazy_against_their_limits_and_abrmd() -> None:
    abrmd = route(abrmd_route(), 100, 100, 450, (1, 1, 4))
    kernel = route(node_route("6.12"), 84, 180, 440)  # 1.20x, 1.20x, 0.98x its limit; Sign 0.98x abrmd
    slow = route(node_route("6.1"), 98, 150, 585)  # 1.40x its limit on GetRandom; Sign 1.30x abrmd
    lazy = route(node_route("6.12", extra=("--swap", "lazy")), 77, 77, 350, (1, 1, 1))
    out = goals([route(direct_route(), 60, 60, 300), kernel, slow, lazy, abrmd], cost(), FLOOR)
    limit_k = "Goal (kernel mode: each row <= 1.3x its limit"
    assert line(out, limit_k, "node(6.12)") == "MET (GetRandom 1.20x, key loaded 1.20x, Sign 0.98x)"
    assert line(out, limit_k, "node(6.1)") == "NOT MET (GetRandom 1.40x, key loaded 1.00x, Sign 1.30x)"
    sign_k = "Goal (kernel mode: Sign <= 1.0x abrmd)"
    assert line(out, sign_k, "node(6.12)") == "MET (Sign 0.98x)"
    assert line(out, sign_k, "node(6.1)") == "NOT MET (Sign 1.30x)"
    # Lazy: 0.77x, 0.77x, 0.78x abrmd; 1.10x, 1.10x, 1.00x the command alone + 50 µs.
    assert line(out, "Goal (--swap lazy: each row <= 0.8x abrmd)", "node(6.12,lazy)") == (
        "MET (GetRandom 0.77x, key loaded 0.77x, Sign 0.78x)"
    )
    assert line(out, "Goal (--swap lazy: each row <= 1.3x its limit", "node(6.12,lazy)") == (
        "MET (GetRandom 1.10x, key loaded 1.10x, Sign 1.00x)"
    )
    cmds = "Goal (--swap lazy: 1.00 backend command per user command"
    assert line(out, cmds, "node(6.12,lazy)") == "MET (GetRandom 1.00, key loaded 1.00, Sign 1.00)"
    assert not any("direct" in x or "abrmd:" in x for x in out)  # only node columns are judged
    assert len(out) == 2 + 2 + 3

    # The same lazy column, slower than abrmd on one row and sending a context save now and then.
    lazy2 = route(node_route("6.12", extra=("--swap", "lazy")), 77, 95, 350, (1, 1.05, 1))
    out = goals([lazy2, abrmd], cost(), FLOOR)
    assert line(out, "Goal (--swap lazy: each row <= 0.8x abrmd)", "node(6.12,lazy)") == (
        "NOT MET (GetRandom 0.77x, key loaded 0.95x, Sign 0.78x)"
    )
    assert line(out, "Goal (--swap lazy: each row <= 1.3x its limit", "node(6.12,lazy)") == (
        "NOT MET (GetRandom 1.10x, key loaded 1.36x, Sign 1.00x)"
    )
    assert line(out, cmds, "node(6.12,lazy)") == "NOT MET (GetRandom 1.00, key loaded 1.05, Sign 1.00)"


def test_goals_needing_what_was_skipped_say_not_measured() -> None:
    kernel = route(node_route("6.12"), 84, 180, 440)
    lazy = route(node_route("6.12", extra=("--swap", "lazy")), 77, 77, 350, (1, 1, 1))
    # --no-abrmd and --floor 0: only the backend-command goal is judged.
    out = goals([kernel, lazy], cost(), None)
    assert line(out, "Goal (kernel mode: each row", "node(6.12)") == "not measured (no C libfuse floor: --floor 0)"
    assert line(out, "Goal (kernel mode: Sign", "node(6.12)") == "not measured (no abrmd: --no-abrmd)"
    assert line(out, "Goal (--swap lazy: each row <= 0.8x", "node(6.12,lazy)") == "not measured (no abrmd: --no-abrmd)"
    assert line(out, "Goal (--swap lazy: each row <= 1.3x", "node(6.12,lazy)") == (
        "not measured (no C libfuse floor: --floor 0)"
    )
    assert line(out, "Goal (--swap lazy: 1.00", "node(6.12,lazy)").startswith("MET")
    # A failed backend measurement, a failed abrmd, no lazy column.
    failed = cost()
    failed.error = "TpmError: Sign: response code 0x922"
    abrmd = route(abrmd_route(), 100, 100, 450)
    abrmd.error = "RuntimeError: tpm2-abrmd: not ready within 20 s"
    out = goals([kernel, abrmd], failed, FLOOR)
    assert line(out, "Goal (kernel mode: each row", "node(6.12)") == "not measured (the backend cost failed)"
    assert line(out, "Goal (kernel mode: Sign", "node(6.12)") == "not measured (abrmd failed)"
    assert [x for x in out if x.startswith("Goal (--swap lazy")] == [
        "Goal (--swap lazy: each row <= 0.8x abrmd): not measured (no --swap lazy column: --no-lazy, or no --swap)",
        "Goal (--swap lazy: each row <= 1.3x its limit, the command alone + 5 floor requests): not measured"
        " (no --swap lazy column: --no-lazy, or no --swap)",
        "Goal (--swap lazy: 1.00 backend command per user command, a client alone): not measured"
        " (no --swap lazy column: --no-lazy, or no --swap)",
    ]
    assert Figures(backend=failed).failed() and not Figures(backend=cost()).failed()
    # A row the node did not measure.
    kernel.batches.pop(SIGN)
    assert line(goals([kernel], cost(), FLOOR), "Goal (kernel mode: each row", "node(6.12)") == (
        "not measured (Sign not measured)"
    )


def test_the_limits_tables_show_the_costs_the_limits_and_each_node_against_its_limit() -> None:
    kernel = route(node_route("6.12"), 84, 180, 440)
    lazy = route(node_route("6.12", extra=("--swap", "lazy")), 77, 77, 350, (1, 1, 1))
    c = cost()
    c.batches["unpinned"] = {GR: [90.0]}
    out = report_limits([kernel, lazy], c, FLOOR)
    assert out[0].split() == ["backend's", "own", "cost,", "µs", "(cmds)", "alone", "kernel", "cycle", "limit,",
                              "kernel", "limit,", "lazy"]  # fmt: skip
    assert out[1].split() == ["GetRandom(16)", "20", "20", "(1)", "70", "70"]
    assert out[2].split() == ["same,", "key", "loaded", "20", "100", "(4)", "150", "70"]
    assert out[3].split() == ["Sign", "ECDSA", "P256", "300", "400", "(4)", "450", "350"]
    assert out[4] == "  one raw socket to its own swtpm, both on CPU 1; unpinned, GetRandom(16) alone: 90 µs"
    table = out[out.index("") + 1 :]
    assert table[0].split()[-2:] == ["node(6.12)", "node(6.12,lazy)"]
    assert table[1].split() == ["GetRandom(16)", "84", "1.20x", "77", "1.10x"]
    assert table[3].split() == ["Sign", "ECDSA", "P256", "440", "0.98x", "350", "1.00x"]
    no_floor = report_limits([kernel], c, None)
    assert "  limits: not measured (no C libfuse floor: --floor 0)" in no_floor
    assert no_floor[1].split() == ["GetRandom(16)", "20", "20", "(1)", "n/a", "n/a"]
    assert not any(x.startswith("µs per command (x its limit)") for x in no_floor)


# --- against a real swtpm ------------------------------------------------------------------

needs_swtpm = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm not installed")


@needs_swtpm
def test_the_backend_cost_runs_on_a_real_swtpm_and_sends_the_kernels_cycle(tmp_path: Path) -> None:
    from cusetpm.testing.relay import CountingRelay
    from cusetpm.testing.swtpm import STARTED, Swtpm

    swtpm = Swtpm.start(tmp_path / "swtpm", flags=STARTED)
    relay = CountingRelay(swtpm.port)
    bench = BackendBench(relay.port, {"get_random": 3, "sign": 2}, warmup=1, pid=swtpm.proc.pid, cpu=0)
    try:
        bench.start()
        bench.round()
        assert bench.cost.error is None and bench.cost.rounds == 1
        assert bench.cost.cpu == 0 and bench.cost.pin_error is None
        for op, _, _ in OPS:
            assert all((bench.cost.median(m, op) or 0) > 0 for m in ("alone", "cycle")), op
        assert bench.cost.median("unpinned", GR)
        assert bench.cost.median("cycle", GR) == bench.cost.median("alone", GR)  # its own cycle
        assert bench.tpm is not None and relay.commands == bench.tpm.sent

        def sent(op: str, mode: str) -> int:
            before = relay.commands
            bench.run(op, mode)
            return relay.commands - before

        # With the key saved: the kernel's cycle, four commands; GetRandom with nothing loaded, one.
        assert [sent(op, "cycle") for op in (GR, KEYED, SIGN)] == [1, 4, 4]
        bench.load_key()
        assert [sent(op, "alone") for op in (GR, KEYED, SIGN)] == [1, 1, 1]
        bench.unload_key()
        # Every response code is checked: a Sign with a key that is not loaded fails.
        assert bench.tpm is not None
        with pytest.raises(TpmError, match=r"^Sign: response code 0x"):
            bench.tpm.call(bench_limits.sign(0x80FFFFFF))
    finally:
        bench.close()
        relay.close()
        swtpm.stop()


@needs_swtpm
def test_a_closed_tpm_is_an_error_not_a_hang(tmp_path: Path) -> None:
    from cusetpm.testing.swtpm import STARTED, Swtpm

    swtpm = Swtpm.start(tmp_path / "swtpm", flags=STARTED)
    try:
        tpm = RawTpm(swtpm.port, timeout=10)
        assert len(tpm.call(bench_limits.GET_RANDOM)) == 10 + 2 + 16
        swtpm.stop()
        with pytest.raises((TpmError, OSError)):
            tpm.call(bench_limits.GET_RANDOM)
        tpm.close()
    finally:
        swtpm.stop()


@needs_swtpm
def test_the_backend_cost_is_measured_over_a_unix_socket_as_the_managed_swtpm_serves() -> None:
    """The node's managed swtpm serves on a Unix socket, so its limit is measured over one too."""
    from cusetpm.testing.bench_rig import Rig

    rig = Rig()
    try:
        swtpm = rig.start_swtpm("backend", unix=True)
        assert swtpm.port == 0 and swtpm.unix is not None and swtpm.unix.startswith("\0")
        bench = bench_limits.start_backend(rig, {"get_random": 3, "sign": 2}, warmup=1)
        assert bench.cost.error is None
        assert isinstance(bench.address, str) and bench.tpm is not None
        assert bench.tpm.sock.family == socket.AF_UNIX
        bench.round()
        assert bench.cost.median("alone", GR)
        tpm = RawTpm(swtpm.unix, timeout=10)
        try:
            assert len(tpm.call(bench_limits.GET_RANDOM)) == 10 + 2 + 16
        finally:
            tpm.close()
        swtpm.stop()
        with pytest.raises(ConnectionRefusedError):
            swtpm.connect(1).close()  # gone with swtpm: nothing is left behind
    finally:
        rig.close()


def test_the_floor_report_judges_each_placement() -> None:
    from cusetpm.testing.bench_report import report_floor

    node = Route("node(6.12)", lambda rig: ("", ""), lambda rig: ("", "", None))  # type: ignore[arg-type,return-value]
    node.request_us, node.poll_us, node.pinned_request_us, node.pinned_poll_us = 30.0, 28.0, 12.0, 10.0
    floor = Floor(read_us=8.0, poll_us=7.0, pinned_read_us=8.0, pinned_poll_us=7.0)
    lines = report_floor([node], floor)
    assert "Goal (idle request on the node <= 1.5x C libfuse): node(6.12): NOT MET (read 3.75x, poll 4.00x)" in lines
    assert (
        "Goal (idle request on the node <= 1.5x C libfuse, client and daemon on one CPU): node(6.12): "
        "MET (read 1.50x, poll 1.43x)"
    ) in lines
    assert any(line.startswith("read(), one CPU") and "12 1.50x" in line for line in lines)
    # Without the pinned figures (sched_setaffinity refused), only the free placement is judged.
    lines = report_floor([node], Floor(read_us=8.0, poll_us=7.0, pin_error="sched_setaffinity: EPERM"))
    assert not any("one CPU" in line and line.startswith("Goal") for line in lines)
    assert "  one CPU: not measured: sched_setaffinity: EPERM" in lines


def test_one_cpu_pins_every_thread_of_the_server_and_restores_the_masks(tmp_path) -> None:
    import subprocess
    import sys

    from cusetpm.testing.bench_floor import one_cpu, server_pids

    where = tmp_path / "mnt"
    where.mkdir()
    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(where)])
    try:
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{proc.pid}/task")) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server_pids(str(where / "idle")) == [proc.pid]
        before_ours, before_theirs = os.sched_getaffinity(0), os.sched_getaffinity(proc.pid)
        with one_cpu([proc.pid]):
            assert os.sched_getaffinity(0) == {0}
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                assert os.sched_getaffinity(int(tid)) == {0}
        assert os.sched_getaffinity(0) == before_ours and os.sched_getaffinity(proc.pid) == before_theirs
    finally:
        proc.kill()
        proc.wait()
