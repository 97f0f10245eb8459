# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py's load figures: many files open on one node, many clients at once.

* :func:`files_figure`: a fresh node in kernel mode; a few warm-up files are opened (each
  sends one GetRandom and stays open), the daemon's VmRSS is read from /proc/PID/status,
  then N more files are opened the same way and VmRSS read again: KiB per open file.
* :func:`clients_figure`: N client processes (:mod:`cusetpm.testing.bench_clients`, each
  the bench's client on its own connection) call GetRandom at once for a fixed time, on
  a fresh node in kernel mode (``device`` TCTI) and on tpm2-abrmd (``tabrmd`` TCTI), each
  with its own fresh swtpm; one path at a time.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .bench_paths import abrmd_route, missing
from .bench_rig import ROOT, Rig

#: GetRandom(16), TPM_ST_NO_SESSIONS.
GET_RANDOM_16 = bytes.fromhex("80010000000c0000017b0010")

#: The goals (issue 9): daemon memory per open file; many clients: throughput against
#: abrmd, and the slowest client against the fastest.
FILE_KIB_GOAL = 8.0
THROUGHPUT_GOAL = 1.0
FAIRNESS_GOAL = 0.5


def vm_rss_kib(pid: int) -> int:
    """VmRSS of process ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def raise_nofile(need: int) -> None:
    """Let this process hold ``need`` file descriptors (raise the soft RLIMIT_NOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} < {need} descriptors needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def open_with_get_random(node: str) -> int:
    """Open the node, send one GetRandom(16) and read its response; returns the open fd."""
    fd = os.open(node, os.O_RDWR)
    try:
        os.write(fd, GET_RANDOM_16)
        rsp = os.read(fd, 4096)
        if len(rsp) < 10 or int.from_bytes(rsp[6:10], "big"):
            raise RuntimeError(f"GetRandom answered {rsp[:10].hex()}")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class FilesFigure:
    label: str
    files: int
    warmup: int
    rss_before: int | None = None  # KiB, after the warm-up files
    rss_after: int | None = None  # KiB, with all files open
    seconds: float | None = None  # to open the files and send their GetRandom
    error: str | None = None

    @property
    def per_file(self) -> float | None:
        if self.rss_before is None or self.rss_after is None or not self.files:
            return None
        return (self.rss_after - self.rss_before) / self.files


def files_figure(rig: Rig, kernel: str, files: int, warmup: int) -> FilesFigure:
    fig = FilesFigure(f"node({kernel})", files, warmup)
    fds: list[int] = []
    try:
        raise_nofile(len(os.listdir("/proc/self/fd")) + warmup + files + 64)
        node = rig.node(f"files-{kernel}", kernel)
        pid = rig.pids[node]
        for _ in range(warmup):
            fds.append(open_with_get_random(node))
        fig.rss_before = vm_rss_kib(pid)
        t0 = time.monotonic()
        for _ in range(files):
            fds.append(open_with_get_random(node))
        fig.seconds = time.monotonic() - t0
        fig.rss_after = vm_rss_kib(pid)
    except Exception as exc:
        fig.error = f"{type(exc).__name__}: {exc} (after {len(fds)} files)"
    finally:
        for fd in fds:
            os.close(fd)
    return fig


@dataclass
class LoadFigure:
    label: str
    clients: int
    seconds: float
    server: str  # what server_cpu is of: "cusetpm serve", "tpm2-abrmd"
    counts: list[int] = field(default_factory=list)
    elapsed: list[float] = field(default_factory=list)
    client_cpu: float = 0.0  # s, all clients, during their loops
    server_cpu: float | None = None  # s of the server process over the window
    window: float = 0.0  # s, from the start to the last client's report
    error: str | None = None

    @property
    def throughput(self) -> float | None:
        """Commands per second, all clients together."""
        return sum(n / t for n, t in zip(self.counts, self.elapsed, strict=True) if t) if self.counts else None

    @property
    def fairness(self) -> float | None:
        """The slowest client's count over the fastest's."""
        top = max(self.counts, default=0)
        return min(self.counts) / top if top else None


def run_clients(rig: Rig, fig: LoadFigure, tcti: str, conf: str, server_pid: int | None, api: str = "tcti") -> None:
    argv = [sys.executable, "-m", "cusetpm.testing.bench_clients", "--tcti", tcti, "--conf", conf,
            "--clients", str(fig.clients), "--seconds", str(fig.seconds), "--api", api]  # fmt: skip
    argv += ["--server-pid", str(server_pid)] if server_pid else []
    log = rig.dir(f"clients-{fig.label.replace('(', '-').replace(')', '')}") / "stderr"
    proc = rig.popen(argv, log, stdout=subprocess.PIPE, cwd=ROOT)
    try:
        out, _ = proc.communicate(timeout=fig.seconds + 300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError("the clients did not finish in time") from None
    if proc.returncode != 0:
        raise RuntimeError(f"clients exited with status {proc.returncode}: {log.read_text().strip()[-400:]}")
    got = json.loads(out)
    fig.counts, fig.elapsed, fig.client_cpu = got["counts"], got["elapsed"], got["client_cpu"]
    fig.server_cpu, fig.window = got["server_cpu"], got["window"]
    if got["errors"]:
        more = f" (and {len(got['errors']) - 1} more)" if len(got["errors"]) > 1 else ""
        fig.error = f"{len(got['errors'])} of {fig.clients} clients failed: {got['errors'][0]}{more}"


def clients_figure(
    rig: Rig, kernel: str, clients: int, seconds: float, abrmd: bool = True, api: str = "tcti"
) -> list[LoadFigure]:
    """The node (kernel mode) and, if ``abrmd``, tpm2-abrmd under ``clients`` clients for
    ``seconds`` (each client's stack: ``api``, see bench_paths.Client): both set up first, then
    run one after the other."""
    figs = [LoadFigure(f"node({kernel})", clients, seconds, "cusetpm serve")]
    if abrmd:
        figs.append(LoadFigure("abrmd", clients, seconds, "tpm2-abrmd", error=missing(abrmd_route())))
    ready: list[tuple[LoadFigure, str, str]] = []
    for fig in figs:
        if fig.error:
            continue
        try:
            if fig.label == "abrmd":
                # abrmd refuses connections past --max-connections (default 27).
                conf = rig.abrmd("load-abrmd", rig.swtpm("load-abrmd"), extra=(f"--max-connections={clients + 1}",))
                ready.append((fig, "tabrmd", conf))
            else:
                ready.append((fig, "device", rig.node(f"load-{kernel}", kernel)))
        except Exception as exc:
            fig.error = f"{type(exc).__name__}: {exc}"
    for fig, tcti, conf in ready:
        try:
            run_clients(rig, fig, tcti, conf, rig.pids.get(conf), api)
        except Exception as exc:
            fig.error = f"{type(exc).__name__}: {exc}"
    return figs
