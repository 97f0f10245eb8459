# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py: its command counting, and one tiny end-to-end run (numbers not judged)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def test_a_tiny_run_prints_the_table_and_leaves_nothing_behind(tmp_path: Path) -> None:
    args = ["--rounds", "1", "--random", "2", "--sign", "1", "--warmup", "1", "--count", "2", "--kernel", "6.12"]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("Goal (node <= 1.5x direct") and "node(6.12)" in line for line in lines)
    header = next(line for line in lines if line.startswith("backend cmds per user cmd")).split()[5:]
    assert header[:3] == ["direct", "node(6.12)", "node(6.12,global)"]
    counts = [line for line in lines if line.startswith("GetRandom(16)")][1]  # second table: commands
    assert counts.split()[1:3] == ["1.00", "1.00"]  # direct, and the node on an empty space
    # With free slots, --sessions global sends no backend command kernel mode does not.
    table = lines[lines.index(next(line for line in lines if line.startswith("backend cmds"))) :][1:4]
    for row in table:
        cells = row.replace("same, key loaded", "key-loaded").split()
        assert cells[-3] == cells[-2], row  # node(6.12) == node(6.12,global)
    assert list(tmp_path.iterdir()) == []
