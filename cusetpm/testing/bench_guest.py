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

And the floor of the goal, in the same rounds: :data:`C_CUSE_RELAY`, a CUSE device in C
(libfuse3's cuse_lowlevel, one thread, built with gcc on the host) whose every open is an open
of the kernel's own /dev/tpmrm0, and whose write() writes the command there (the kernel runs
it in that write) and reads the response for read() to hand out.  It is the kernel's resource
manager behind one CUSE hop with nothing else: what no CUSE node, in any language, can beat.
And the same in Python (:mod:`.py_cuse_relay`: one thread, no trio, no resource manager), the
least a CUSE daemon in Python costs; and that relay on trio, its loop shaped like the node's
(the node's default spin, then trio's epoll), the least a CUSE daemon on the node's loop costs.

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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The goal (issue 9): the CUSE node costs at most this times the kernel's /dev/tpmrm0.
GUEST_GOAL = 1.5

#: The rows, in order: what the client sends, one call per write/read pair.
ROWS = ("GetRandom(16)", "ReadPublic, one object loaded")
#: The paths, as the JSON names them (the C relay's is optional: it needs gcc and libfuse3-dev).
PATHS = ("kernel", "node")
RELAY_PATH = "relay"
#: The C relay's device name, /dev/NAME.
RELAY_NAME = "cusetpm-crelay"
#: The Python relay (:mod:`.py_cuse_relay`, the Python floor): its path and device name.
PY_RELAY_PATH = "pyrelay"
PY_RELAY_NAME = "cusetpm-pyrelay"
#: The same relay on trio, its loop shaped like the node's (``--trio``): its path and device name.
TRIO_RELAY_PATH = "triorelay"
TRIO_RELAY_NAME = "cusetpm-triorelay"
#: Marks the guest's result line among whatever else the command prints.
KEY = "cusetpm_bench_guest"

DEFAULT_NAME = "cusetpm-bench"
GET_RANDOM_16 = bytes.fromhex("80010000000c0000017b0010")


#: What both C relays (this CUSE one and bench_relay's FUSE one) do with a response pending on a
#: file (a ``struct file`` with ``len``, ``off`` and ``buf``): read() hands it out, in parts if
#: asked; poll() answers POLLIN while one is pending, else POLLOUT.
C_PENDING = r"""
static void reply_pending(fuse_req_t req, struct file *f, size_t size)
{
    size_t n = f->len - f->off;

    if (n > size)
        n = size;
    fuse_reply_buf(req, (const char *)f->buf + f->off, n);
    f->off += n;
    if (f->off >= f->len)
        f->len = f->off = 0;
}

static void reply_poll(fuse_req_t req, struct file *f, struct fuse_pollhandle *ph)
{
    if (ph)
        fuse_pollhandle_destroy(ph); /* nothing is ever pending later: a write answers at once */
    fuse_reply_poll(req, f->len ? POLLIN | POLLRDNORM : POLLOUT | POLLWRNORM);
}
"""

#: The C CUSE relay (see the module's docstring): ``relay DEVNAME TPM_PATH``.
C_CUSE_RELAY = (
    r"""
#define FUSE_USE_VERSION 31
#include <cuse_lowlevel.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define BUFSIZE 4096

static const char *tpm_path;

struct file {
    int fd;     /* this file's own open of the kernel's resource manager */
    size_t len; /* response length (0: none pending) */
    size_t off; /* bytes of it read so far */
    unsigned char buf[BUFSIZE];
};
"""
    + C_PENDING
    + r"""
static void relay_open(fuse_req_t req, struct fuse_file_info *fi)
{
    struct file *f = calloc(1, sizeof(*f));

    if (!f) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    f->fd = open(tpm_path, O_RDWR | O_CLOEXEC);
    if (f->fd < 0) {
        int err = errno;
        free(f);
        fuse_reply_err(req, err);
        return;
    }
    fi->fh = (uintptr_t)f;
    fi->direct_io = 1;
    fi->nonseekable = 1;
    fuse_reply_open(req, fi);
}

static void relay_release(fuse_req_t req, struct fuse_file_info *fi)
{
    struct file *f = (struct file *)(uintptr_t)fi->fh;

    close(f->fd);
    free(f);
    fuse_reply_err(req, 0);
}

static void relay_read(fuse_req_t req, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)off;
    reply_pending(req, (struct file *)(uintptr_t)fi->fh, size);
}

/* The kernel's blocking write runs the command; the read after it finds the response. */
static void relay_write(fuse_req_t req, const char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
    struct file *f = (struct file *)(uintptr_t)fi->fh;
    ssize_t n;

    (void)off;
    if (f->len) {
        fuse_reply_err(req, EBUSY);
        return;
    }
    n = write(f->fd, buf, size);
    if (n >= 0)
        n = read(f->fd, f->buf, BUFSIZE);
    if (n < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    f->len = (size_t)n;
    f->off = 0;
    fuse_reply_write(req, size);
}

static void relay_poll(fuse_req_t req, struct fuse_file_info *fi, struct fuse_pollhandle *ph)
{
    reply_poll(req, (struct file *)(uintptr_t)fi->fh, ph);
}

static const struct cuse_lowlevel_ops ops = {
    .open = relay_open,
    .read = relay_read,
    .write = relay_write,
    .release = relay_release,
    .poll = relay_poll,
};

/* relay DEVNAME TPM_PATH: serve /dev/DEVNAME in the foreground, on one thread. */
int main(int argc, char *argv[])
{
    static char devname[128];
    const char *info[] = {devname};
    char *args[] = {argv[0], "-f", "-s", NULL};
    struct cuse_info ci = {0};

    if (argc != 3) {
        fprintf(stderr, "usage: %s DEVNAME TPM_PATH\n", argv[0]);
        return 2;
    }
    snprintf(devname, sizeof(devname), "DEVNAME=%s", argv[1]);
    tpm_path = argv[2];
    ci.dev_info_argc = 1;
    ci.dev_info_argv = info;
    return cuse_lowlevel_main(3, args, &ci, &ops, NULL);
}
"""
)


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
    from ..frontends.channel import DEFAULT_SPIN
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
        relays: dict[str, subprocess.Popen] = {}
        try:
            # All open at once; each answers before anything is timed.
            paths["kernel"] = _Path("/dev/tpmrm0")
            paths["node"] = _Path(str(served.node))
            if args.c_relay:
                relays[RELAY_PATH] = _start_relay([args.c_relay], RELAY_NAME, Path(tmp) / "relay.log")
                paths[RELAY_PATH] = _Path(f"/dev/{RELAY_NAME}")
            py_relay = [sys.executable, "-m", "cusetpm.testing.py_cuse_relay"]
            relays[PY_RELAY_PATH] = _start_relay(py_relay, PY_RELAY_NAME, Path(tmp) / "py-relay.log")
            paths[PY_RELAY_PATH] = _Path(f"/dev/{PY_RELAY_NAME}")
            trio_relay = [*py_relay, "--trio", str(round(DEFAULT_SPIN * 1e6))]  # the node's default spin
            relays[TRIO_RELAY_PATH] = _start_relay(trio_relay, TRIO_RELAY_NAME, Path(tmp) / "trio-relay.log")
            paths[TRIO_RELAY_PATH] = _Path(f"/dev/{TRIO_RELAY_NAME}")
            for p in paths.values():
                _call(p.empty, GET_RANDOM_16)
            result["handles"] = {name: f"0x{p.handle:08x}" for name, p in paths.items()}
            result["batches"] = measure(paths, args.rounds, sizes, args.warmup)
        finally:
            for p in paths.values():
                p.close()
            for name, relay in relays.items():
                relay.terminate()
                result[f"{name}_exit"] = relay.wait(10)
            rc = served.stop()
            result["node_exit"] = rc
        if rc != 0 and not result.get("error"):
            result["error"] = f"cusetpm serve exited with status {rc}: {served.log()[-2000:]}"
        for name, what in ((RELAY_PATH, "the C relay"), (PY_RELAY_PATH, "the Python relay"),
                           (TRIO_RELAY_PATH, "the trio relay")):  # fmt: skip
            if result.get(f"{name}_exit") not in (None, 0) and not result.get("error"):
                result["error"] = f"{what} exited with status {result[f'{name}_exit']}"


def _start_relay(argv: list[str], name: str, log: Path) -> subprocess.Popen:
    """Start a relay (``argv DEVNAME /dev/tpmrm0``) and wait for its device, /dev/``name``."""
    dev = f"/dev/{name}"
    proc = subprocess.Popen([*argv, name, "/dev/tpmrm0"], stdin=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 30
    while not os.path.exists(dev):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{argv[-1]} did not serve {dev}: {log.read_text(errors='replace')[-500:]}")
        time.sleep(0.05)
    return proc


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
    ap.add_argument("--c-relay", metavar="BINARY", help="the C CUSE relay, built (also measure it)")
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
    #: Why the C relay was not measured (no gcc or libfuse3-dev here), or None.
    relay_skipped: str | None = None

    def median(self, row: str, path: str) -> float | None:
        got = self.batches.get(row, {}).get(path)
        return statistics.median(got) if got else None

    def ratio(self, row: str, path: str = "node", base: str = "kernel") -> float | None:
        """``path`` against ``base`` on ``row`` (the figure: the node against the kernel)."""
        top, bottom = self.median(row, path), self.median(row, base)
        return top / bottom if top is not None and bottom else None

    def how(self) -> str:
        """How it was measured, for the report."""
        handles = sorted(set(self.handles.values())) or ["?"]
        start = f", up in {self.node_start:.0f} s" if self.node_start is not None else ""
        return (
            f"How measured (guest): one Debian {self.release or self.kernel} guest under qemu TCG, one swtpm "
            "behind vtpm_proxy; the kernel's resource manager on /dev/tpmrm0, and `cusetpm serve --cuse "
            f"{DEFAULT_NAME} --tcti device:/dev/tpm0 --kernel {self.kernel}` on the same chip through the "
            f"kernel's raw /dev/tpm0{start}; all open at once (the node holds /dev/tpm0, which /dev/tpmrm0 "
            "does not need), nothing restarted between rounds; and the C CUSE relay (bench_guest.C_CUSE_RELAY, "
            f"/dev/{RELAY_NAME}), every open of it an open of /dev/tpmrm0, where each write() runs its command, "
            f"the same in Python, one thread, no trio (py_cuse_relay, /dev/{PY_RELAY_NAME}), and that on "
            f"trio, its loop as the node's (py_cuse_relay --trio, /dev/{TRIO_RELAY_NAME}).  "
            "One client process, raw os.write/os.read "
            "on an O_RDWR fd; per path one file with nothing loaded (GetRandom(16)) and one holding an "
            f"ECC P-256 primary ({'/'.join(handles)}) for ReadPublic, so each resource manager loads, saves "
            f"and flushes it around every command.  {self.rounds} rounds, each one batch per row and path "
            f"({self.sizes.get(ROWS[0], '?')} GetRandom, {self.sizes.get(ROWS[1], '?')} ReadPublic), which "
            "path goes first alternating; a figure is the median over rounds of the batch mean.  Absolute "
            "times under TCG mean nothing; the ratio is the figure"
            + (f".  {self.seconds:.0f} s in the guest, boot included." if self.seconds is not None else ".")
        )


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


def guest_command(kernel: str, rounds: int, random: int, public: int, warmup: int, relay: str | None = None) -> str:
    """The shell command the guest runs: the rig's swtpm prelude, then the guest side."""
    from ..rig import guest_swtpm_prelude

    argv = [sys.executable, "-m", "cusetpm.testing.bench_guest", "--kernel", kernel, "--rounds", str(rounds)]
    argv += ["--random", str(random), "--public", str(public), "--warmup", str(warmup)]
    argv += ["--c-relay", relay] if relay else []
    return f"{guest_swtpm_prelude()} && {shlex.join(argv)}"


def build_relay(work: Path) -> Path:
    """Build :data:`C_CUSE_RELAY` in ``work`` with gcc and libfuse3 (host side: the guest sees
    the host's files); RuntimeError says why it cannot."""
    from .bench_floor import fuse_flags, missing_c

    why = missing_c()
    if why is not None:
        raise RuntimeError(why)
    src, binary = work / "cuse-relay.c", work / "cuse-relay"
    src.write_text(C_CUSE_RELAY)
    cc = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(binary), str(src), *fuse_flags()], capture_output=True, text=True
    )
    if cc.returncode != 0:
        raise RuntimeError(f"gcc failed: {cc.stderr.strip()[-400:]}")
    return binary


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
    with tempfile.TemporaryDirectory(prefix="cusetpm-bench-relay-") as work:
        relay = None
        try:
            relay = str(build_relay(Path(work)))
        except RuntimeError as exc:
            fig.relay_skipped = str(exc)
        try:
            command = guest_command(kernel, rounds, random, public, warmup, relay)
            res = run_in_guest(kernel, command, timeout=timeout)
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
