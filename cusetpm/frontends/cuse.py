# SPDX-License-Identifier: GPL-2.0-only
"""Serve a character device through /dev/cuse, on trio.

:func:`serve_cuse` opens /dev/cuse, answers CUSE_INIT (which makes the kernel
create ``/dev/<name>``) and then answers requests until the channel dies or
the caller cancels it.  The bytes are handled by :mod:`cusetpm.frontends.cuse_proto`;
the request loop (fast path, a task for what waits, interrupts, poll wake-ups)
is :class:`cusetpm.frontends.channel.Channel`'s, shared with the FUSE node; here
is only CUSE_INIT, the device node and our own probe open.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Callable

import trio

from ..daemon.file import Opener
from . import cuse_proto as proto
from .channel import DEFAULT_SPIN, Channel, ChannelWatch, DeviceOps, FileOps

__all__ = ["DeviceOps", "FileOps", "serve_cuse"]

log = logging.getLogger(__name__)

CUSE_PATH = "/dev/cuse"
#: How long to wait for /dev/<name> to appear (devtmpfs is immediate, udev is not).
NODE_TIMEOUT = 30.0
#: The file handle answered to our own start-up probe open; never given to the device.
PROBE_FH = 0


class _Server(Channel):
    """One /dev/cuse channel: the shared request loop, CUSE_INIT and our probe opens."""

    def __init__(self, fd: int, device: DeviceOps, name: str, spin: float = DEFAULT_SPIN) -> None:
        super().__init__(fd, f"cuse {name}", spin)
        self.device = device
        self.devname = name
        self.next_fh = PROBE_FH + 1
        #: Thread ids of our own probe opens; their OPEN never reaches the device.
        self.probe_tids: set[int] = set()

    # -- start-up ----------------------------------------------------------

    async def handshake(self, major: int, minor: int) -> None:
        """Answer CUSE_INIT, the first request on a fresh channel."""
        buf = await self.read_request()
        if buf is None:
            raise OSError(errno.ENODEV, "/dev/cuse closed before CUSE_INIT")
        req = proto.parse_request(buf)
        if not isinstance(req, proto.CuseInit):
            raise proto.ProtocolError(f"expected CUSE_INIT, got opcode {req.header.opcode}")
        if req.major != proto.FUSE_KERNEL_VERSION or req.minor < proto.CUSE_MIN_MINOR:
            self.send(proto.reply_error(req.unique, errno.EPROTO))
            raise proto.ProtocolError(f"kernel speaks FUSE {req.major}.{req.minor}")
        self.send(
            proto.reply_cuse_init(
                req.unique,
                self.devname,
                kernel_minor=req.minor,
                kernel_flags=req.flags,
                dev_major=major,
                dev_minor=minor,
            )
        )

    def probe_open(self, path: str) -> None:
        """Open and close the node from this (worker) thread, as a client would."""
        tid = threading.get_native_id()
        self.probe_tids.add(tid)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            os.close(fd)
        finally:
            self.probe_tids.discard(tid)

    # -- what differs from the shared loop -----------------------------------

    def dispatch(self, req: proto.Request, nursery: trio.Nursery) -> None:
        if isinstance(req, proto.Release) and req.fh == PROBE_FH:
            self.send(proto.reply(req.unique))
            return
        super().dispatch(req, nursery)

    def open_file(self, req: proto.Open) -> bytes:
        h = req.header
        if h.pid in self.probe_tids:
            return proto.reply_open(req.unique, PROBE_FH)
        return proto.reply_open(req.unique, self.add_file(self.device.open(req.flags, Opener(h.uid, h.gid, h.pid))))

    def other(self, req: proto.Request) -> bytes | None:
        if isinstance(req, proto.CuseInit):
            return proto.reply_error(req.unique, errno.EPROTO)
        return proto.default_reply(req)


def _read_devno(name: str) -> int | None:
    """The dev_t the kernel gave the device, from sysfs (None if sysfs is not mounted)."""
    try:
        with open(f"/sys/class/cuse/{name}/dev") as f:
            major, minor = f.read().strip().split(":")
    except OSError:
        return None
    return os.makedev(int(major), int(minor))


async def _wait_for_node(path: str, name: str) -> None:
    """Wait until ``path`` is the character device the kernel made for us."""
    delay = 0.005
    with trio.fail_after(NODE_TIMEOUT):
        while True:
            devno = _read_devno(name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISCHR(st.st_mode) and (devno is None or st.st_rdev == devno):
                    return
            await trio.sleep(delay)
            delay = min(delay * 2, 0.2)


async def serve_cuse(
    device: DeviceOps,
    name: str,
    *,
    major: int = 0,
    minor: int = 0,
    mode: int | None = None,
    owner: int | None = None,
    group: int | None = None,
    spin: float = DEFAULT_SPIN,
    pause_spin: Callable[[], bool] | None = None,
    watch: ChannelWatch | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``device`` as ``/dev/<name>`` until the channel dies or we are cancelled.

    ``major`` 0 lets the kernel choose the device number.  ``task_status.started()``
    is called once ``/dev/<name>`` exists, has the asked mode/owner/group and has
    been opened once (a probe the device never sees).  Cancelling closes
    /dev/cuse, which makes the kernel remove the node and fail its open files;
    files still open are then released on the device.
    """
    proto.check_devname(name)
    path = os.path.join("/dev", name)
    fd = os.open(CUSE_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    server = _Server(fd, device, name, spin)
    server.pause_spin = pause_spin
    server.watch = watch
    if watch is not None:
        watch.watch(fd)
    try:
        async with trio.open_nursery() as nursery:
            await server.handshake(major, minor)

            async def loop_then_stop() -> None:
                await server.request_loop(nursery)
                nursery.cancel_scope.cancel()  # channel gone: abandon requests in flight

            nursery.start_soon(loop_then_stop)
            await _wait_for_node(path, name)
            await trio.to_thread.run_sync(server.probe_open, path, abandon_on_cancel=True)
            if mode is not None:
                os.chmod(path, mode)
            if owner is not None or group is not None:
                os.chown(path, -1 if owner is None else owner, -1 if group is None else group)
            log.info("cuse: serving %s", path)
            task_status.started()
    finally:
        if watch is not None:
            watch.forget(fd)
        server.fd = None
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
        await server.release_all()
