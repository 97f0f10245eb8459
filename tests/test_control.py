# SPDX-License-Identifier: GPL-2.0-only
"""The control socket (daemon/control.py) and ``cusetpm status`` (status.py), on a real daemon."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO
from helpers import create_primary, get_random, rc, start_auth_session
from helpers import transact as cmd


def status(control: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cusetpm", "status", "--control", str(control), *extra],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip


def test_status_lists_the_tpm_the_node_and_each_open_file(daemon, tmp_path):
    control = tmp_path / "ctl" / "control.sock"
    d = daemon(extra_args=["--control", str(control)])
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600  # the daemon's user (and root) only
    assert stat.S_IMODE(os.stat(control.parent).st_mode) == 0o700
    fd = os.open(d.node, os.O_RDWR)
    try:
        assert rc(cmd(fd, create_primary())) == 0 and rc(cmd(fd, start_auth_session())) == 0
        doc = json.loads(status(control, "--json").stdout)
        (node,) = doc["nodes"]
        assert (node["name"], node["kernel"], node["seam"]) == ("tpmrm0", "6.12", "kernel")
        (f,) = node["files"]
        assert (f["pid"], f["uid"], f["objects"], f["sessions"]) == (os.getpid(), os.getuid(), 1, ["0x02000000"])
        assert doc["tpm"]["available"] and doc["tpm"]["epoch"] == 0 and doc["tpm"]["commands_sent"] > 5
        text = status(control).stdout
        assert "TPM: reachable, epoch 0, 0 restarts" in text
        assert f"pid {os.getpid()} uid {os.getuid()} gid {os.getgid()}: 1 object, sessions 0x02000000" in text
    finally:
        os.close(fd)


def test_status_of_global_sessions_on_lazy_swapping_shows_both_features(daemon, tmp_path):
    control = tmp_path / "control.sock"
    d = daemon(extra_args=["--control", str(control), "--swap", "lazy", "--sessions", "global"])
    fd = os.open(d.node, os.O_RDWR)
    try:
        assert rc(cmd(fd, start_auth_session())) == 0
        doc = json.loads(status(control, "--json").stdout)
        assert doc["nodes"][0]["seam"] == "GlobalSessions"
        features = doc["features"]
        assert features["GlobalSessions"]["known"] == 1
        assert features["LazySwap"]["resident"] is True and features["LazySwap"]["residents"] == 1
    finally:
        os.close(fd)


def test_status_shows_a_restart_of_the_tpm(daemon, tmp_path):
    control = tmp_path / "control.sock"
    d = daemon(extra_args=["--control", str(control)])
    old = os.open(d.node, os.O_RDWR)
    assert rc(cmd(old, get_random())) == 0
    os.kill(d.swtpm_pid, signal.SIGKILL)
    try:
        cmd(old, get_random())  # finds the TPM gone
    except OSError:
        pass
    deadline = time.monotonic() + 20
    while "1 restart," not in (text := status(control).stdout):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    assert "TPM: reachable, epoch 1, 1 restart, 1 lost connection" in text
    assert "(of epoch 0: gets EPIPE)" in text
    os.close(old)


def _unix_socket_paths(pid: int) -> set[str]:
    """The paths of the Unix sockets process ``pid`` holds."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{n}")[8:-1] for n in os.listdir(f"/proc/{pid}/fd")}
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return {row[7] for row in rows if len(row) > 7 and row[6] in inodes}


def test_the_control_socket_listens_only_where_configured(daemon, tmp_path):
    d = daemon(extra_args=["--control", "off"])
    assert _unix_socket_paths(d.served.proc.pid) == set()
    control = tmp_path / "here.sock"
    d2 = daemon(extra_args=["--control", str(control)])
    assert _unix_socket_paths(d2.served.proc.pid) == {str(control)}


def test_another_user_cannot_ask(daemon, tmp_path):
    control = tmp_path / "ctl" / "control.sock"
    daemon(extra_args=["--control", str(control)])
    probe = "import socket,sys\ntry:\n socket.socket(socket.AF_UNIX).connect(sys.argv[1]); print('connected')\nexcept OSError as e: print(e.errno)"
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", probe]
    os.chmod(tmp_path, 0o755)  # so that only the socket's own directory and mode stand in the way
    for p in tmp_path.parents:
        if p == Path("/tmp"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o005)
    got = subprocess.run([*as_nobody, str(control)], capture_output=True, text=True, timeout=30, cwd="/")
    assert got.stdout.strip() == "13", got.stdout + got.stderr  # EACCES


def test_a_second_daemon_on_the_same_control_socket_is_a_one_line_error(daemon, tmp_path):
    control = tmp_path / "control.sock"
    daemon(extra_args=["--control", str(control)])
    r = subprocess.run(
        [sys.executable, "-m", "cusetpm", "serve", "--fuse", str(tmp_path / "mnt2"), "--state-dir",
         str(tmp_path / "st2"), "--control", str(control)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 1
    assert "another cusetpm daemon answers there" in r.stderr and "Traceback" not in r.stderr


def test_status_of_no_daemon_is_a_one_line_error(tmp_path):
    r = status(tmp_path / "nothing.sock")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "nothing.sock" in r.stderr
