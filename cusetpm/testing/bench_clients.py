# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py's load clients: N processes hammering GetRandom on one path at once.

Run as ``python -m cusetpm.testing.bench_clients --tcti NAME --conf CONF --clients N
--seconds S [--server-pid PID] [--api tcti|esapi]``; prints one JSON object (:func:`run`'s) on
stdout.

This launcher imports tpm2-pytss, then forks the clients while it is still single-threaded
(no TCTI, no GLib yet), so a client costs a fork, not an interpreter.  Each client opens its
own connection (the tpm2-tss TCTI: ``device`` on the node, ``tabrmd`` on abrmd; by default
a tpm2-pytss TCTI loop as bench_paths' clients, or ESAPI over it), sends one GetRandom(16), says
ready and waits; once all are ready the
launcher closes the start pipe and every client calls GetRandom(16) in a loop for S seconds
of its own clock, then reports its count, its wall time and its own CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time
from typing import Any

READY_TIMEOUT = 120.0


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of process ``pid`` (all its threads), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _say(fd: int, line: str) -> None:
    os.write(fd, (line.replace("\n", " ")[:400] + "\n").encode())  # < PIPE_BUF: one write, whole


def _client(idx: int, tcti: str, conf: str, seconds: float, go: int, out: int, api: str) -> int:
    from .bench_paths import Client

    try:
        client = Client(tcti, conf, with_key=False, api=api)
        get_random = client.get_random
        get_random()
    except Exception as exc:
        _say(out, f"{idx} error connect: {type(exc).__name__}: {exc}")
        return 1
    _say(out, f"{idx} ready")
    os.read(go, 1)  # EOF: go
    n, t0, c0 = 0, time.monotonic(), os.times()
    try:
        while time.monotonic() - t0 < seconds:
            get_random()
            n += 1
    except Exception as exc:
        _say(out, f"{idx} error after {n}: {type(exc).__name__}: {exc}")
        return 1
    elapsed, c1 = time.monotonic() - t0, os.times()
    _say(out, f"{idx} done {n} {elapsed:.6f} {c1.user - c0.user + c1.system - c0.system:.6f}")
    client.close()
    return 0


def _lines(fd: int, want: int, deadline: float, buf: list[bytes]) -> list[str]:
    """``want`` whole lines from ``fd`` (fewer on EOF or at the deadline); ``buf`` keeps the rest."""
    got: list[str] = []
    while len(got) < want:
        data = b"".join(buf)
        if b"\n" in data:
            line, rest = data.split(b"\n", 1)
            buf[:] = [rest]
            got.append(line.decode(errors="replace"))
            continue
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf.append(chunk)
    return got


def _reap(pids: list[int], grace: float = 10.0) -> None:
    """Wait for the clients; kill those still there after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    left = set(pids)
    while left:
        for pid in list(left):
            if os.waitpid(pid, os.WNOHANG)[0]:
                left.discard(pid)
        if left and time.monotonic() > deadline:
            for pid in left:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            return
        time.sleep(0.01)


def run(
    tcti: str, conf: str, clients: int, seconds: float, server_pid: int | None = None, api: str = "tcti"
) -> dict[str, Any]:
    """Fork the clients, start them together, collect: ``counts``, ``elapsed`` (s) and
    ``client_cpu`` (s, all clients), ``window`` (s, start to the last report),
    ``server_cpu`` (s of ``server_pid`` over the window) and ``errors``."""
    import tpm2_pytss  # noqa: F401  (before the fork: loaded once, shared)

    from . import bench_paths  # noqa: F401  (the clients' code, likewise)

    out_r, out_w = os.pipe()
    go_r, go_w = os.pipe()
    pids = []
    for idx in range(clients):
        pid = os.fork()
        if pid == 0:  # the client
            status = 1
            try:
                os.close(out_r)
                os.close(go_w)
                status = _client(idx, tcti, conf, seconds, go_r, out_w, api)
            finally:
                os._exit(status)
        pids.append(pid)
    os.close(out_w)
    os.close(go_r)
    buf: list[bytes] = []
    errors: list[str] = []
    ready = 0
    for line in _lines(out_r, clients, time.monotonic() + READY_TIMEOUT, buf):
        if line.split()[1:2] == ["ready"]:
            ready += 1
        else:
            errors.append(line)
    result: dict[str, Any] = {"clients": clients, "ready": ready, "counts": [], "elapsed": [], "client_cpu": 0.0}
    cpu0 = cpu_seconds(server_pid) if server_pid else None
    t0 = time.monotonic()
    os.close(go_w)  # every waiting client reads EOF: go
    for line in _lines(out_r, ready, time.monotonic() + seconds + READY_TIMEOUT, buf):
        words = line.split()
        if words[1:2] == ["done"]:
            result["counts"].append(int(words[2]))
            result["elapsed"].append(float(words[3]))
            result["client_cpu"] += float(words[4])
        else:
            errors.append(line)
    result["window"] = time.monotonic() - t0
    cpu1 = cpu_seconds(server_pid) if server_pid else None
    result["server_cpu"] = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    os.close(out_r)
    _reap(pids)
    if len(result["counts"]) < clients and not errors:
        errors.append(f"{clients - len(result['counts'])} clients did not report")
    result["errors"] = errors
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tcti", required=True)
    ap.add_argument("--conf", required=True)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--server-pid", type=int)
    ap.add_argument("--api", choices=("tcti", "esapi"), default="tcti")
    args = ap.parse_args(argv)
    result = run(args.tcti, args.conf, args.clients, args.seconds, args.server_pid, args.api)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
