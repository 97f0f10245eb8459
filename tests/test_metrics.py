# SPDX-License-Identifier: GPL-2.0-only
"""Prometheus metrics (daemon/metrics.py), scraped from a real daemon."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from cusetpm.daemon.metrics import command_name, outcome
from helpers import create_primary, free_port, get_random, rc, scrape, start_auth_session
from helpers import transact as cmd


def test_names_and_outcomes():
    assert command_name(0x17B) == "GetRandom" and command_name(0x20000001) == "0x20000001"
    ok, tpm_err, rm_err = (
        bytes.fromhex(h) for h in ("80010000000a00000000", "80010000000a0000018b", "80010000000a000b0143")
    )
    assert [outcome(10, r) for r in (ok, tpm_err, rm_err)] == ["success", "tpm_error", "rm_error"]
    assert outcome(-14, b"") == "errno_EFAULT"


def _listening_tcp(pid: int) -> set[str]:
    """host:port of every TCP socket process ``pid`` listens on."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{n}")[8:-1] for n in os.listdir(f"/proc/{pid}/fd")}
    out = set()
    with open("/proc/net/tcp") as f:
        for row in (line.split() for line in f.readlines()[1:]):
            if row[3] == "0A" and row[9] in inodes:  # LISTEN
                host, port = row[1].split(":")
                out.add(f"{socket.inet_ntoa(bytes.fromhex(host)[::-1])}:{int(port, 16)}")
    return out


def test_metrics_count_commands_and_show_a_tpm_restart(daemon):
    port = free_port()
    d = daemon(extra_args=["--metrics", f"127.0.0.1:{port}", "--control", "off"])
    assert _listening_tcp(d.served.proc.pid) == {f"127.0.0.1:{port}"}  # only where configured
    fd = os.open(d.node, os.O_RDWR)
    for _ in range(3):
        assert rc(cmd(fd, get_random())) == 0
    assert rc(cmd(fd, create_primary())) == 0
    assert cmd(fd, bytes.fromhex("80010000000a20000001"))[6:10] == bytes.fromhex("000b0143")  # unknown vendor cc
    m = scrape(port)
    assert m['cusetpm_commands_total{command="GetRandom",node="tpmrm0",outcome="success"}'] == 3
    assert m['cusetpm_commands_total{command="CreatePrimary",node="tpmrm0",outcome="success"}'] == 1
    assert m['cusetpm_commands_total{command="0x20000001",node="tpmrm0",outcome="rm_error"}'] == 1
    assert m['cusetpm_command_seconds_count{node="tpmrm0"}'] == 5
    assert m['cusetpm_open_files{node="tpmrm0"}'] == 1 and m['cusetpm_objects{node="tpmrm0"}'] == 1
    assert m["cusetpm_tpm_restarts"] == 0 and m["cusetpm_backend_commands"] > 5
    os.kill(d.swtpm_pid, signal.SIGKILL)
    other = os.open(d.node, os.O_RDWR)
    try:
        cmd(other, get_random())
    except OSError:
        pass
    deadline = time.monotonic() + 20
    while (m := scrape(port))["cusetpm_tpm_restarts"] != 1:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["cusetpm_tpm_epoch"] == 1 and m["cusetpm_tpm_reconnects"] == 1 and m["cusetpm_tpm_available"] == 1
    assert any(re.match(r'cusetpm_commands_total\{command="GetRandom".*outcome="errno_EPIPE"', k) for k in m), m
    os.close(fd)
    os.close(other)


def test_without_metrics_nothing_listens(daemon):
    d = daemon(extra_args=["--control", "off"])
    assert _listening_tcp(d.served.proc.pid) == set()


@pytest.mark.parametrize("sessions", ["kernel", "global"])
def test_a_lazy_node_shows_its_swapping(daemon, sessions):
    """With ``--sessions global`` too, both features' families."""
    port = free_port()
    args = ["--metrics", f"127.0.0.1:{port}", "--control", "off", "--swap", "lazy", "--sessions", sessions]
    d = daemon(extra_args=args)
    a, b = os.open(d.node, os.O_RDWR), os.open(d.node, os.O_RDWR)
    try:
        assert rc(cmd(a, create_primary())) == 0
        assert rc(cmd(a, start_auth_session())) == 0  # resident: sent alone
        assert rc(cmd(a, get_random())) == 0  # and again
        assert rc(cmd(b, get_random())) == 0  # a is put away first
        m = scrape(port)
        assert m['cusetpm_swap_events{event="resident_commands"}'] == 2
        assert m['cusetpm_swap_events{event="evictions"}'] == 1
        assert m['cusetpm_objects{node="tpmrm0"}'] == 1
        assert m.get("cusetpm_registry_sessions") == (1 if sessions == "global" else None)
    finally:
        os.close(a)
        os.close(b)
