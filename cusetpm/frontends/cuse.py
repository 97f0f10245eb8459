# SPDX-License-Identifier: GPL-2.0-only
"""Serve a character device through /dev/cuse, on trio.

:func:`serve_cuse` opens /dev/cuse, answers CUSE_INIT (which makes the kernel
create ``/dev/<name>``) and then answers requests until the channel dies or
the caller cancels it.  The bytes are handled by :mod:`cusetpm.frontends.cuse_proto`;
here is only I/O and concurrency:

* every read/write/poll/open request runs in its own task, so a read on one
  file that waits for its TPM response never delays another file;
* FUSE_INTERRUPT (the caller got a signal) cancels the waiting task, and the
  request is answered EINTR.  Whether cancelling is safe at that point is the
  device's business: it shields what must not be interrupted;
* FUSE_POLL with FUSE_POLL_SCHEDULE_NOTIFY hands the device a ``wake``
  callback that sends FUSE_NOTIFY_POLL, which makes the kernel re-poll.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import Protocol

import trio

from ..daemon.node import Opener
from . import cuse_proto as proto

log = logging.getLogger(__name__)

CUSE_PATH = "/dev/cuse"
#: How long to wait for /dev/<name> to appear (devtmpfs is immediate, udev is not).
NODE_TIMEOUT = 30.0
#: How long teardown waits for the device to release files the kernel never closed.
RELEASE_TIMEOUT = 10.0
#: The file handle answered to our own start-up probe open; never given to the device.
PROBE_FH = 0


class FileOps(Protocol):
    """One open() of the device.  Errors are raised as ``OSError(errno, ...)``."""

    async def write(self, data: bytes, nonblock: bool) -> int: ...

    async def read(self, size: int, nonblock: bool) -> bytes: ...

    async def poll(self, wake: Callable[[], None] | None) -> int: ...

    async def release(self) -> None: ...


class DeviceOps(Protocol):
    """The device: makes a :class:`FileOps` per open()."""

    def open(self, flags: int, opener: Opener) -> FileOps: ...


class _Server:
    """The state of one /dev/cuse channel: open files and requests in flight."""

    def __init__(self, fd: int, device: DeviceOps, name: str) -> None:
        self.fd: int | None = fd
        self.device = device
        self.name = name
        self.files: dict[int, FileOps] = {}
        self.next_fh = PROBE_FH + 1
        #: unique -> the cancel scope of the task answering it, for FUSE_INTERRUPT.
        self.inflight: dict[int, trio.CancelScope] = {}
        #: Thread ids of our own probe opens; their OPEN never reaches the device.
        self.probe_tids: set[int] = set()

    # -- raw I/O -----------------------------------------------------------

    async def read_request(self) -> bytes | None:
        """One request from /dev/cuse; None once the kernel tore the channel down."""
        while True:
            assert self.fd is not None
            try:
                buf = os.read(self.fd, proto.READ_BUFFER_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
                continue
            except OSError as e:
                if e.errno in (errno.ENODEV, errno.ECONNABORTED):
                    return None
                if e.errno == errno.ENOENT:  # request vanished before we read it
                    continue
                raise
            # /dev/cuse never returns 0 bytes; a socket standing in for it in tests does at EOF.
            return buf or None

    def send(self, data: bytes) -> None:
        """Write one reply or notification; each must be exactly one write()."""
        if self.fd is None:
            return
        try:
            os.write(self.fd, data)
        except OSError as e:
            # ENOENT: the request is gone (caller killed, channel aborted).
            log.debug("cuse %s: reply not delivered: %s", self.name, e)

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
                self.name,
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

    # -- the request loop --------------------------------------------------

    async def request_loop(self, nursery: trio.Nursery) -> None:
        """Read requests and start a task for each, until the channel dies."""
        while True:
            buf = await self.read_request()
            if buf is None:
                log.info("cuse %s: channel torn down (ENODEV)", self.name)
                return
            try:
                req = proto.parse_request(buf)
            except proto.ProtocolError as e:
                self.reject(buf, e)
            else:
                self.dispatch(req, nursery)
            await trio.lowlevel.checkpoint()

    def reject(self, buf: bytes, error: proto.ProtocolError) -> None:
        """A request we cannot parse (the kernel sends none): answer EIO if its header says
        whom to answer, so no caller waits for ever, and go on.  Ending the loop would take
        the device away from every open file."""
        header = proto.parse_header(buf)
        log.warning("cuse %s: malformed request (%s)", self.name, error)
        if header is not None and header.unique and header.opcode not in proto.NO_REPLY_OPCODES:
            self.send(proto.reply_error(header.unique, errno.EIO))

    def dispatch(self, req: proto.Request, nursery: trio.Nursery) -> None:
        """Answer at once what needs no device; start a task for the rest."""
        if isinstance(req, proto.Interrupt):
            scope = self.inflight.get(req.target)
            if scope is not None:  # else it was answered already
                scope.cancel()
            return
        if isinstance(req, proto.Open) and req.header.pid in self.probe_tids:
            self.send(proto.reply_open(req.unique, PROBE_FH))
            return
        if isinstance(req, proto.Release) and req.fh == PROBE_FH:
            self.send(proto.reply(req.unique))
            return
        if isinstance(req, (proto.Open, proto.Read, proto.Write, proto.Poll, proto.Release)):
            # Registered before the task starts, so an interrupt that follows
            # at once still finds it.  Release is not interruptible: the file
            # must be released whatever happens to the caller.
            scope = trio.CancelScope()
            if not isinstance(req, proto.Release):
                self.inflight[req.unique] = scope
            nursery.start_soon(self.answer, req, scope)
            return
        if isinstance(req, proto.CuseInit):
            self.send(proto.reply_error(req.unique, errno.EPROTO))
            return
        out = proto.default_reply(req)
        if out is not None:
            self.send(out)

    async def answer(self, req: proto.Request, scope: trio.CancelScope) -> None:
        """Run one request against the device and send its reply."""
        try:
            with scope:
                out = await self.handle(req)
            if scope.cancelled_caught:
                out = proto.reply_error(req.unique, errno.EINTR)
        except OSError as e:
            err = e.errno if e.errno and 0 < e.errno < 512 else errno.EIO
            out = proto.reply_error(req.unique, err)
        except Exception:
            log.exception("cuse %s: request %r failed", self.name, req)
            out = proto.reply_error(req.unique, errno.EIO)
        finally:
            self.inflight.pop(req.unique, None)
        self.send(out)

    def file(self, fh: int) -> FileOps:
        try:
            return self.files[fh]
        except KeyError:
            raise OSError(errno.EBADF, "unknown file handle") from None

    async def handle(self, req: proto.Request) -> bytes:
        """The device call for one request, and its reply bytes."""
        if isinstance(req, proto.Open):
            h = req.header
            f = self.device.open(req.flags, Opener(h.uid, h.gid, h.pid))
            fh = self.next_fh
            self.next_fh += 1
            self.files[fh] = f
            return proto.reply_open(req.unique, fh)
        if isinstance(req, proto.Read):
            data = await self.file(req.fh).read(req.size, req.nonblock)
            if len(data) > req.size:
                raise RuntimeError(f"device read returned {len(data)} > {req.size} bytes")
            return proto.reply_read(req.unique, data)
        if isinstance(req, proto.Write):
            n = await self.file(req.fh).write(req.data, req.nonblock)
            return proto.reply_write(req.unique, n)
        if isinstance(req, proto.Poll):
            wake = self.waker(req.kh) if req.schedule_notify else None
            mask = await self.file(req.fh).poll(wake)
            return proto.reply_poll(req.unique, mask)
        if isinstance(req, proto.Release):
            released = self.files.pop(req.fh, None)
            if released is not None:
                await released.release()
            return proto.reply(req.unique)
        raise AssertionError(f"no handler for {req!r}")

    def waker(self, kh: int) -> Callable[[], None]:
        """The ``wake`` callback for a poll: asks the kernel to poll file ``kh`` again."""
        message = proto.notify_poll(kh)

        def wake() -> None:
            self.send(message)

        return wake

    async def release_all(self) -> None:
        """Release files the kernel never will (it does not once the channel is gone)."""
        files, self.files = self.files, {}
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
            for f in files.values():
                try:
                    await f.release()
                except Exception:
                    log.exception("cuse %s: release at teardown failed", self.name)


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
    server = _Server(fd, device, name)
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
        server.fd = None
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
        await server.release_all()
