# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py's floor: one idle request on the node against a C libfuse file system.

The node's idle request (a read() with nothing pending, a poll()) does no TPM work, so it
costs what the FUSE round trip through the daemon costs.  The floor for that is libfuse's
own low-level loop in C doing nothing: :data:`C_FLOOR` (with :func:`c_source`), written to the
rig's temp dir and built with gcc against libfuse3 at run time, serves one empty direct-I/O
file, ``idle``,
whose read() answers 0 bytes and poll() POLLOUT (what the node answers when idle), from one
thread (``fuse_session_loop``).  Both are timed with the same client loop
(:func:`~cusetpm.testing.bench_paths.request_floor`), alternately, median of repetitions.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .bench_paths import Route, request_floor
from .bench_rig import Rig
from .daemon import unmount

#: The goal: an idle request on the node costs at most this times the C file system's.
FLOOR_GOAL = 1.5

#: What the bench's C file systems share (this floor's and bench_relay's): one file,
#: ``FILE_NAME``, in the root; its lookup and getattr.  Each adds ``setup()`` (its arguments
#: after MOUNTPOINT OPTIONS) and the file's own ``file_open``, ``file_release``, ``file_read``,
#: ``file_write`` and ``file_poll``; then :data:`C_MAIN`.
C_HEAD = r"""
#define FUSE_USE_VERSION 34
#include <errno.h>
#include <fuse_lowlevel.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>

#define FILE_INO 2

static void attrs(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_mode = ino == FUSE_ROOT_ID ? S_IFDIR | 0755 : S_IFREG | 0666;
    st->st_nlink = ino == FUSE_ROOT_ID ? 2 : 1;
}

static void fl_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e;

    if (parent != FUSE_ROOT_ID || strcmp(name, FILE_NAME) != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    memset(&e, 0, sizeof(e));
    e.ino = FILE_INO;
    e.attr_timeout = 1.0;
    e.entry_timeout = 1.0;
    attrs(FILE_INO, &e.attr);
    fuse_reply_entry(req, &e);
}

static void fl_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;

    (void)fi;
    if (ino != FUSE_ROOT_ID && ino != FILE_INO) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    attrs(ino, &st);
    fuse_reply_attr(req, &st, 1.0);
}
"""

#: The end of every C file system: mount, say "ready", serve from one thread until unmounted.
C_MAIN = r"""
static const struct fuse_lowlevel_ops ops = {
    .lookup = fl_lookup,
    .getattr = fl_getattr,
    .open = file_open,
    .release = file_release,
    .read = file_read,
    .write = file_write,
    .poll = file_poll,
};

int main(int argc, char *argv[])
{
    struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
    struct fuse_session *se;
    int ret;

    if (argc < 3 || setup(argc - 3, argv + 3)) {
        fprintf(stderr, "usage: %s MOUNTPOINT OPTIONS %s\n", argv[0], USAGE);
        return 2;
    }
    if (fuse_opt_add_arg(&args, argv[0]) || fuse_opt_add_arg(&args, "-o") || fuse_opt_add_arg(&args, argv[2]))
        return 1;
    se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    if (!se)
        return 1;
    if (fuse_set_signal_handlers(se) || fuse_session_mount(se, argv[1]))
        return 1;
    printf("ready\n");
    fflush(stdout);
    ret = fuse_session_loop(se);
    fuse_session_unmount(se);
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    fuse_opt_free_args(&args);
    return ret ? 1 : 0;
}
"""

#: The floor: one empty file, "idle", that answers read and poll with no work.
C_FLOOR = r"""
#define USAGE ""

static int setup(int argc, char *argv[])
{
    (void)argv;
    return argc != 0;
}

static void file_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (ino != FILE_INO) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    fi->direct_io = 1; /* as the node: every read() reaches us */
    fi->keep_cache = 0;
    fi->nonseekable = 1;
    fuse_reply_open(req, fi);
}

static void file_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)ino, (void)size, (void)off, (void)fi;
    fuse_reply_buf(req, NULL, 0);
}

static void file_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
             struct fuse_file_info *fi)
{
    (void)ino, (void)buf, (void)off, (void)fi;
    fuse_reply_write(req, size);
}

static void file_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, struct fuse_pollhandle *ph)
{
    (void)ino, (void)fi;
    if (ph)
        fuse_pollhandle_destroy(ph);
    fuse_reply_poll(req, POLLOUT | POLLWRNORM);
}

static void file_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino, (void)fi;
    fuse_reply_err(req, 0);
}
"""


def c_source(file_name: str, body: str) -> str:
    """A whole C file system: :data:`C_HEAD` serving ``file_name``, ``body``, :data:`C_MAIN`."""
    return f'/* SPDX-License-Identifier: GPL-2.0-only */\n#define FILE_NAME "{file_name}"\n' + C_HEAD + body + C_MAIN


@dataclass
class Floor:
    """µs per idle request on the C file system (median over repetitions), or why not measured."""

    read_us: float | None = None
    poll_us: float | None = None
    error: str | None = None
    #: The C file system's repetitions, op -> µs per request.
    samples: dict[str, list[float]] = field(default_factory=dict)
    #: The same with the client and the server on one CPU (:func:`one_cpu`), None if not.
    pinned_read_us: float | None = None
    pinned_poll_us: float | None = None
    pin_error: str | None = None


def server_pids(path: str) -> list[int]:
    """The processes serving the file ``path``: those whose command line names its directory
    (the C file system's mount point, the node's ``--fuse DIR``)."""
    where = os.path.dirname(os.path.abspath(path)).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if where in f.read().split(b"\0"):
                    pids.append(int(entry))
    return pids


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


@contextlib.contextmanager
def one_cpu(pids: list[int], cpu: int = 0) -> Iterator[None]:
    """This thread and every thread of ``pids`` on ``cpu`` for the block, masks restored after.

    On a small VM a wake-up of an idle CPU costs more than a FUSE request, so an unpinned
    figure says as much about where the scheduler put the two processes as about the server;
    on one CPU only the server's own cost is left (README, "The request path")."""
    masks: dict[int, set[int]] = {}
    try:
        for tid in [0, *(t for pid in pids for t in _threads(pid))]:
            masks[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {cpu})
        yield
    finally:
        for tid, mask in masks.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)


def fuse_flags() -> list[str]:
    """gcc's flags for libfuse3 (pkg-config's, or Debian's paths)."""
    if shutil.which("pkg-config"):
        r = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.split()
    return ["-I/usr/include/fuse3", "-lfuse3", "-lpthread"]


def missing_c() -> str | None:
    """What building the C file system needs and this machine lacks, as a message, or None."""
    need = [] if shutil.which("gcc") else ["gcc"]
    include = next((f[2:] for f in fuse_flags() if f.startswith("-I")), "/usr/include/fuse3")
    if not os.path.exists(os.path.join(include, "fuse_lowlevel.h")):
        need.append("libfuse3-dev")
    return f"not installed: {', '.join(need)} (Debian: {' '.join(need)})" if need else None


def start_c_floor(rig: Rig) -> str:
    """Build and mount the C file system; returns the path of its file."""
    return start_c_file(rig, "c-floor", "idle", C_FLOOR, "cusetpm-floor")


def start_c_file(
    rig: Rig, name: str, file: str, body: str, fsname: str, args: tuple[str, ...] = (), pass_fds: tuple[int, ...] = ()
) -> str:
    """Build the C file system serving ``file`` with ``body`` (:func:`c_source`) with gcc and
    libfuse3, mount it (``MOUNTPOINT OPTIONS *args``; it prints "ready" once mounted) and wait
    for its file; returns that file's path."""
    work = rig.dir(name)
    src, binary, mnt = work / f"{name}.c", work / name, work / "mnt"
    src.write_text(c_source(file, body))
    cc = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(binary), str(src), *fuse_flags()], capture_output=True, text=True
    )
    if cc.returncode != 0:
        raise RuntimeError(f"gcc failed: {cc.stderr.strip()[-400:]}")
    mnt.mkdir()
    options = f"fsname={fsname},subtype={fsname},default_permissions"
    options += ",allow_other" if os.getuid() == 0 else ""  # as the node
    rig.stack.callback(unmount, mnt)  # after the process stopped (callbacks run last first)
    argv = [str(binary), str(mnt), options, *args]
    proc = rig.popen(argv, work / "stderr", stdout=subprocess.PIPE, pass_fds=pass_fds)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline() if ready else b""
    if line != b"ready\n":
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1)
        log = (work / "stderr").read_text(errors="replace").strip()[-400:]
        raise RuntimeError(f"the C file system did not mount (status {proc.poll()}): {log}")
    path = str(mnt / file)
    deadline = time.monotonic() + 10
    while not os.path.exists(path):  # the first request waits for INIT: answered by now
        if time.monotonic() > deadline:
            raise RuntimeError("the C file system's file did not appear")
        time.sleep(0.01)
    return path


def measure_floors(paths: list[Route], nodes: dict[str, str], rig: Rig, n: int, reps: int = 5) -> Floor:
    """Idle read and poll on the C file system and on every node, alternately, ``reps`` times
    ``n`` requests each; sets the nodes' ``request_us`` and ``poll_us``."""
    floor = Floor(error=missing_c())
    targets: dict[str, str] = {}
    if floor.error is None:
        try:
            targets["C"] = start_c_floor(rig)
        except Exception as exc:
            floor.error = f"{type(exc).__name__}: {exc}"
    targets.update(nodes)
    samples: dict[tuple[str, str], list[float]] = {}
    failed: set[str] = set()
    for _ in range(reps):
        for name, path in targets.items():
            for op in ("read", "poll"):
                if name in failed:
                    continue
                try:
                    samples.setdefault((name, op), []).append(request_floor(path, n, op))
                except Exception as exc:
                    failed.add(name)
                    if name == "C":
                        floor.error = f"{type(exc).__name__}: {exc}"
                    else:
                        next(p for p in paths if p.label == name).error = f"idle request: {exc}"

    pinned: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(reps):
            for name, path in targets.items():
                if name in failed:
                    continue
                with one_cpu(server_pids(path)):
                    for op in ("read", "poll"):
                        pinned.setdefault((name, op), []).append(request_floor(path, n, op))
    except OSError as exc:
        floor.pin_error, pinned = f"sched_setaffinity: {exc.strerror or exc}", {}

    def med(name: str, op: str, got: dict[tuple[str, str], list[float]] = samples) -> float | None:
        values = got.get((name, op))
        return statistics.median(values) if values and name not in failed else None

    floor.read_us, floor.poll_us = med("C", "read"), med("C", "poll")
    floor.pinned_read_us, floor.pinned_poll_us = med("C", "read", pinned), med("C", "poll", pinned)
    floor.samples = {op: samples.get(("C", op), []) for op in ("read", "poll")}
    for p in paths:
        if p.label in nodes:
            p.request_us, p.poll_us = med(p.label, "read"), med(p.label, "poll")
            p.pinned_request_us, p.pinned_poll_us = med(p.label, "read", pinned), med(p.label, "poll", pinned)
    return floor
