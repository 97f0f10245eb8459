# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py's C relay: the whole request path of a command, in C, as a floor.

The limits (bench_limits) add five idle requests to the backend's own cost; they leave out what
a command's requests cost beyond an idle one, and the client's own work.  The C relay measures
that floor directly, with the same client as every path: :data:`C_RELAY`, built with gcc
against libfuse3 at run time, serves one direct-I/O file, ``tpm``, from one thread
(``fuse_session_loop``).  A write() sends the command to a swtpm of its own over the socket it
inherits and waits for the whole response, in the write itself; poll() answers POLLIN while a
response is pending (else POLLOUT), read() hands it out (in parts if asked).  One backend
command per user command, as ``--swap lazy`` for a client alone, but no resource manager at
all: no handle virtualization, no space, no file lock, no worker.  What a node column costs
over this column is what the daemon's Python, its trio loop and its resource manager cost.
"""

from __future__ import annotations

import contextlib
import socket
import struct

from .bench_floor import missing_c, start_c_file
from .bench_guest import C_PENDING
from .bench_paths import Route
from .bench_rig import Rig
from .relay import CountingRelay

#: The column's label.
LABEL = "C relay"
#: How long the relay waits for the TPM before it answers EIO (SO_RCVTIMEO, SO_SNDTIMEO).
TIMEOUT = 30

#: The relay's own part of its C source (bench_floor.c_source adds the rest): one file,
#: "tpm", that forwards each command written to it to a TPM on an inherited socket, in the
#: write itself, and answers read with the response and poll with POLLIN while one is
#: pending (else POLLOUT).  One thread; no resource manager.
C_RELAY = (
    r"""
#define USAGE "TPM_FD"
#define BUFSIZE 4096

static int tpm_fd = -1;

struct file {
    size_t len; /* response length (0: none pending) */
    size_t off; /* bytes of it read so far */
    unsigned char buf[BUFSIZE];
};
"""
    + C_PENDING
    + r"""
static int setup(int argc, char *argv[])
{
    if (argc != 1)
        return 1;
    tpm_fd = atoi(argv[0]);
    return tpm_fd < 0;
}

static void file_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct file *f;

    if (ino != FILE_INO) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    f = calloc(1, sizeof(*f));
    if (!f) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    fi->fh = (uintptr_t)f;
    fi->direct_io = 1;
    fi->keep_cache = 0;
    fi->nonseekable = 1;
    fuse_reply_open(req, fi);
}

static void file_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    free((struct file *)(uintptr_t)fi->fh);
    fuse_reply_err(req, 0);
}

static void file_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)ino, (void)off;
    reply_pending(req, (struct file *)(uintptr_t)fi->fh, size);
}

/* Send the whole command, then read until the response's header size is in. */
static int exchange(struct file *f, const char *cmd, size_t size)
{
    size_t got = 0, want = 10;
    ssize_t n;

    for (size_t sent = 0; sent < size; sent += n) {
        n = send(tpm_fd, cmd + sent, size - sent, MSG_NOSIGNAL);
        if (n <= 0)
            return -EIO;
    }
    while (got < want) {
        n = recv(tpm_fd, f->buf + got, BUFSIZE - got, 0);
        if (n <= 0)
            return -EIO;
        got += n;
        if (got >= 10) {
            want = (size_t)f->buf[2] << 24 | f->buf[3] << 16 | f->buf[4] << 8 | f->buf[5];
            if (want < 10 || want > BUFSIZE)
                return -EIO;
        }
    }
    f->len = got;
    f->off = 0;
    return 0;
}

static void file_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
             struct fuse_file_info *fi)
{
    struct file *f = (struct file *)(uintptr_t)fi->fh;
    int err;

    (void)ino, (void)off;
    if (size < 10 || size > BUFSIZE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (f->len) {
        fuse_reply_err(req, EBUSY);
        return;
    }
    err = exchange(f, buf, size);
    if (err)
        fuse_reply_err(req, -err);
    else
        fuse_reply_write(req, size);
}

static void file_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, struct fuse_pollhandle *ph)
{
    (void)ino;
    reply_poll(req, (struct file *)(uintptr_t)fi->fh, ph);
}

"""
)


def start_c_relay(rig: Rig, tpm: socket.socket) -> str:
    """Build and mount the C relay on the connected socket ``tpm`` (made blocking, with
    :data:`TIMEOUT`; the relay inherits it, ``tpm`` may be closed after); its file's path."""
    why = missing_c()
    if why is not None:
        raise RuntimeError(why)
    tpm.setblocking(True)
    for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        tpm.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", TIMEOUT, 0))
    fd = tpm.fileno()
    return start_c_file(rig, "c-relay", "tpm", C_RELAY, "cusetpm-relay", args=(str(fd),), pass_fds=(fd,))


def c_relay_route() -> Route:
    """The C relay as a path: on its own swtpm (a Unix socket, as the node's managed one);
    counted through a relay in front of a swtpm on TCP, as the other paths."""

    def setup(rig: Rig) -> tuple[str, str]:
        swtpm = rig.start_swtpm("c-relay", unix=True)
        with contextlib.closing(swtpm.connect(TIMEOUT)) as tpm:
            return "device", start_c_relay(rig, tpm)

    def count(rig: Rig) -> tuple[str, str, CountingRelay]:
        relay = rig.relay(rig.swtpm("c-relay-count"))
        with contextlib.closing(socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)) as tpm:
            tpm.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return "device", start_c_relay(rig, tpm), relay

    return Route(LABEL, setup, count, needs=("swtpm", "gcc"), tctis=("device",))
