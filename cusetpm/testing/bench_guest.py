# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py's guest figure: the CUSE node against the kernel's own /dev/tpmrm0.

Why a guest: the baseline that matters is the kernel's resource manager, and only a real
kernel has one.  In one rig guest (qemu TCG) one swtpm sits behind vtpm_proxy, so the kernel
has /dev/tpm0 and /dev/tpmrm0 for it, and ``cusetpm serve --cuse`` serves a node on the
same chip through the kernel's raw /dev/tpm0 (``--tcti device:/dev/tpm0``).  Both are open
at once: the node holds /dev/tpm0 (the kernel lets one process open it), and /dev/tpmrm0 is
not bound by that, so the same client loop runs on each in interleaved rounds (which path
goes first alternates), and no restart sits between them.  Under TCG absolute times mean
nothing; the ratio node / kernel is the figure (both run on the same emulated CPUs).

Two rows: GetRandom(16) on an empty space, and ReadPublic of one loaded object (a
CreatePrimary first), which makes both resource managers ContextLoad, ContextSave and
FlushContext around every command.

Guest side: ``python -m cusetpm.testing.bench_guest`` (after the rig's swtpm prelude) prints
one JSON line.  Host side: :func:`guest_figure` boots the guest and parses that line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The goal (issue 9): the CUSE node costs at most this times the kernel's /dev/tpmrm0.
GUEST_GOAL = 1.5

#: The rows, in order: what the client sends, one call per write/read pair.
ROWS = ("GetRandom(16)", "ReadPublic, one object loaded")
#: The paths, as the JSON names them.
PATHS = ("kernel", "node")
#: Marks the guest's result line among whatever else the command prints.
KEY = "cusetpm_bench_guest"

DEFAULT_NAME = "cusetpm-bench"
GET_RANDOM_16 = bytes.fromhex("80010000000c0000017b0010")


def _read_public(handle: int) -> bytes:
    return struct.pack(">HII", 0x8001, 14, 0x173) + struct.pack(">I", handle)


def _call(fd: int, cmd: bytes) -> bytes:
    """One command on ``fd``; raises unless the TPM answered success."""
    os.write(fd, cmd)
    rsp = os.read(fd, 4096)
    if len(rsp) < 10 or rsp[6:10] != b"\0\0\0\0":
        raise RuntimeError(f"command {cmd[6:10].hex()} answered {rsp[:10].hex() or 'nothing'}")
    return rsp


def batch(fd: int, cmd: bytes, n: int) -> float:
    """Mean µs of ``n`` write/read pairs of ``cmd`` on ``fd``; every answer must be success."""
    t = time.perf_counter()
    for _ in range(n):
        os.write(fd, cmd)
        rsp = os.read(fd, 4096)
        if rsp[6:10] != b"\0\0\0\0":
            raise RuntimeError(f"command {cmd[6:10].hex()} answered {rsp[:10].hex() or 'nothing'}")
    return 1e6 * (time.perf_counter() - t) / n


class _Path:
    """One device: a file with nothing loaded and one holding a signing primary."""

    def __init__(self, dev: str) -> None:
        from .hostile import create_primary  # a small ECC P-256 key: fast to create

        self.dev = dev
        self.empty = os.open(dev, os.O_RDWR)
        self.loaded = os.open(dev, os.O_RDWR)
        self.handle = struct.unpack(">I", _call(self.loaded, create_primary())[10:14])[0]
        self.cmds = {ROWS[0]: (self.empty, GET_RANDOM_16), ROWS[1]: (self.loaded, _read_public(self.handle))}

    def close(self) -> None:
        os.close(self.empty)
        os.close(self.loaded)


def measure(paths: dict[str, _Path], rounds: int, sizes: dict[str, int], warmup: int) -> dict[str, dict[str, list]]:
    """Batch means per row and path: every round one batch per row and path, one at a time."""
    out: dict[str, dict[str, list]] = {row: {name: [] for name in paths} for row in ROWS}
    for row in ROWS:
        for p in paths.values():
            batch(*p.cmds[row], warmup)
    names = list(paths)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]  # neither path always goes first
        for row in ROWS:
            for name in order:
                out[row][name].append(batch(*paths[name].cmds[row], sizes[row]))
    return out


def run(args: argparse.Namespace, result: dict) -> None:
    from .daemon import start_serve

    for dev in ("/dev/tpm0", "/dev/tpmrm0"):
        if not os.path.exists(dev):
            raise RuntimeError(f"{dev} is missing (is swtpm behind vtpm_proxy running?)")
    sizes = {ROWS[0]: args.random, ROWS[1]: args.public}
    with tempfile.TemporaryDirectory(prefix="cusetpm-bench-") as tmp:
        log = Path(tmp) / "serve.log"
        serve = ["--cuse", args.name, "--tcti", "device:/dev/tpm0", "--kernel", args.kernel, "--control", "off"]
        t = time.monotonic()
        served = start_serve(serve, log_path=log, timeout=args.start_timeout)
        result["node_start_s"] = round(time.monotonic() - t, 1)
        paths: dict[str, _Path] = {}
        try:
            # Both open at once; each answers before anything is timed.
            paths["kernel"] = _Path("/dev/tpmrm0")
            paths["node"] = _Path(str(served.node))
            for p in paths.values():
                _call(p.empty, GET_RANDOM_16)
            result["handles"] = {name: f"0x{p.handle:08x}" for name, p in paths.items()}
            result["batches"] = measure(paths, args.rounds, sizes, args.warmup)
        finally:
            for p in paths.values():
                p.close()
            rc = served.stop()
            result["node_exit"] = rc
        if rc != 0 and not result.get("error"):
            result["error"] = f"cusetpm serve exited with status {rc}: {served.log()[-2000:]}"


def main(argv: list[str] | None = None) -> int:
    """Guest side: measure, print one JSON line (also on failure, with ``error`` set)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--random", type=int, default=100, help="GetRandom calls per batch")
    ap.add_argument("--public", type=int, default=50, help="ReadPublic calls per batch")
    ap.add_argument("--warmup", type=int, default=10, help="calls per row and path before timing")
    ap.add_argument("--name", default=DEFAULT_NAME, help="the CUSE node's name, /dev/NAME")
    ap.add_argument("--kernel", default="6.12", help="the node's kernel profile")
    ap.add_argument("--start-timeout", type=float, default=180.0, help="seconds for the node to serve")
    args = ap.parse_args(argv)
    result: dict = {KEY: 1, "release": os.uname().release, "rounds": args.rounds, "error": None}
    result["sizes"] = {ROWS[0]: args.random, ROWS[1]: args.public}
    try:
        run(args, result)
    except Exception as exc:  # reported in the line, for the host to print
        result["error"] = f"{type(exc).__name__}: {exc}"[:3000]  # a daemon's log can be long
    print(json.dumps(result), flush=True)
    return 1 if result["error"] else 0


# --- host side ------------------------------------------------------------------------------


@dataclass
class GuestFigure:
    """The guest figure as the host has it: batch means per row and path, or why not."""

    kernel: str
    rounds: int
    sizes: dict[str, int] = field(default_factory=dict)
    batches: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    release: str | None = None  # the guest kernel's uname -r
    handles: dict[str, str] = field(default_factory=dict)  # the loaded object's, per path
    node_start: float | None = None  # seconds the node took to serve, in the guest
    #: Why the guest part did not run at all (--no-guest, the rig cannot boot here).
    skipped: str | None = None
    #: Why it ran and failed.
    error: str | None = None
    seconds: float | None = None  # the guest's wall time, boot included

    def median(self, row: str, path: str) -> float | None:
        got = self.batches.get(row, {}).get(path)
        return statistics.median(got) if got else None

    def ratio(self, row: str) -> float | None:
        node, kernel = self.median(row, "node"), self.median(row, "kernel")
        return node / kernel if node is not None and kernel else None


def cannot_boot(kernel: str) -> str | None:
    """Why the rig cannot boot a guest with swtpm here (a tool or the kernel missing), or None."""
    from ..rig import RigError, ensure_kernel
    from ..rig.initramfs import _busybox
    from ..rig.kernels import _which

    try:
        for tool in ("qemu-system-x86_64", "swtpm"):
            _which(tool)
        _busybox()
        ensure_kernel(kernel)
    except RigError as exc:
        return str(exc).splitlines()[0]
    return None


def guest_command(kernel: str, rounds: int, random: int, public: int, warmup: int) -> str:
    """The shell command the guest runs: the rig's swtpm prelude, then the guest side."""
    from ..rig import guest_swtpm_prelude

    argv = [sys.executable, "-m", "cusetpm.testing.bench_guest", "--kernel", kernel, "--rounds", str(rounds)]
    argv += ["--random", str(random), "--public", str(public), "--warmup", str(warmup)]
    return f"{guest_swtpm_prelude()} && {shlex.join(argv)}"


def parse_output(fig: GuestFigure, output: str) -> GuestFigure:
    """Fill ``fig`` from the guest's output: its JSON line, else an error naming the output."""
    found = None
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and KEY in data:
                found = data
    if found is None:
        fig.error = "the guest printed no result line: " + (output.strip()[-1500:] or "nothing")
        return fig
    fig.release = found.get("release")
    fig.sizes = found.get("sizes", {})
    fig.batches = found.get("batches", {})
    fig.handles = found.get("handles", {})
    fig.node_start = found.get("node_start_s")
    fig.error = found.get("error")
    return fig


def guest_figure(
    kernel: str = "6.12", rounds: int = 5, random: int = 100, public: int = 50, warmup: int = 10, timeout: float = 900
) -> GuestFigure:
    """Host side: boot one guest, run the guest side, parse its line.  A rig that cannot
    boot here gives ``skipped``; a guest that boots and fails gives ``error``."""
    from ..rig import RigError, run_in_guest

    fig = GuestFigure(kernel, rounds)
    why = cannot_boot(kernel)
    if why is not None:
        fig.skipped = f"the rig cannot boot here: {why}"
        return fig
    try:
        res = run_in_guest(kernel, guest_command(kernel, rounds, random, public, warmup), timeout=timeout)
    except RigError as exc:
        fig.error = str(exc).splitlines()[0]
        return fig
    fig.seconds = res.seconds
    parse_output(fig, res.output)
    if fig.error is None and res.returncode != 0:
        fig.error = f"the guest command exited with status {res.returncode}: {res.output.strip()[-1500:]}"
    return fig


if __name__ == "__main__":
    sys.exit(main())
