# SPDX-License-Identifier: GPL-2.0-only
"""One FUSE-protocol channel (/dev/cuse or /dev/fuse) on trio: the request loop both nodes share.

The bytes are :mod:`cusetpm.frontends.cuse_proto`'s (and :mod:`.fuse_proto`'s for the file
system's own requests); here is only I/O and concurrency:

* **the fast path**: what needs no waiting is answered in the loop itself, with no task and
  no lock round: an open, a poll or a read of a file whose lock is free, an O_NONBLOCK write
  (answered first; then its command runs right here while nobody else needs the TPM, and
  usually ends here too), and every request that needs no device.  A task costs about
  12 µs a request on this path (measured: 21 against 9 µs an idle read, client and daemon on
  one CPU);
* **spinning**: after the last request the loop polls for the next one for ``spin`` seconds
  before sleeping in epoll (:meth:`Channel.spin_read`), which skips the wake-ups between a
  command's five requests; with ``pause_spin`` (``--cpu``: the TPM on the loop's own CPU) it
  stops while a command is at the TPM, whose CPU time the spin would take;
* a poll or read that waits only for the file's O_NONBLOCK command (a TCTI's poll() right
  after its write()) is queued on the file and answered as the command ends, again with no
  task; so is a blocking write whose file is free: the file's worker runs its command and
  answers it;
* everything else (a read, poll or write that waits for something else; release) runs in its
  own task, so that one file waiting never delays another;
* FUSE_INTERRUPT (the caller got a signal) cancels the waiting task, and the request is
  answered EINTR.  Whether cancelling is safe at that point is the device's business: it
  shields what must not be interrupted;
* FUSE_POLL with FUSE_POLL_SCHEDULE_NOTIFY hands the device a ``wake`` callback that sends
  FUSE_NOTIFY_POLL, which makes the kernel re-poll.

Requests are read into one buffer allocated once: ``os.read`` of the 132 KiB a request may
need would map and unmap that much memory for every request.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import trio

from ..daemon.file import Opener
from . import cuse_proto as proto

log = logging.getLogger(__name__)
R = TypeVar("R")

#: How many requests the loop answers in a row before it lets other tasks run.
BURST = 16
#: How long teardown waits for the device to release files the kernel never closed.
RELEASE_TIMEOUT = 10.0
#: How long the loop keeps looking for the next request before it sleeps (``--spin-us``).
DEFAULT_SPIN = 100e-6


class FileOps(Protocol):
    """One open() of the device.  Errors are raised as ``OSError(errno, ...)``.

    A file may also answer without waiting (:class:`~cusetpm.daemon.file.DeviceFile` does):
    ``try_write(data, nonblock)``, ``try_read(size)`` and ``try_poll(wake)`` return None,
    having done nothing, when the call would wait; the loop then runs the async method.  Once
    a ``try_write`` is answered, the loop calls the file's ``after_reply()`` (if it has one),
    where the file may run the command it took.  And
    ``poll_after_work(wake, reply)`` / ``read_after_work(size, reply)`` may take a call that
    waits only for the file's O_NONBLOCK command, and ``write_after_work(data, reply)`` a
    blocking write whose command the file's worker can run, and answer it through ``reply``
    when that ends (True), instead of a task waiting for it.
    """

    async def write(self, data: bytes, nonblock: bool) -> int: ...

    async def read(self, size: int, nonblock: bool) -> bytes: ...

    async def poll(self, wake: Callable[[], None] | None) -> int: ...

    async def release(self) -> None: ...


class ChannelWatch(Protocol):
    """Told of each channel while it serves (the socket backends' spin, which a request
    waiting on one ends: cusetpm.backends.spin); and asked until when the request loop
    should spin on for an answer that is due (``spin_until``, 0: none)."""

    def watch(self, fd: int) -> None: ...

    def forget(self, fd: int) -> None: ...

    def spin_until(self) -> float: ...


class DeviceOps(Protocol):
    """The device: makes a :class:`FileOps` per open()."""

    def open(self, flags: int, opener: Opener) -> FileOps: ...


class Channel:
    """The state of one channel: open files and requests in flight.

    :meth:`other` answers what is not a file operation (the file system's lookups, for
    FUSE); :meth:`open_file` makes the file an open names.
    """

    def __init__(self, fd: int, name: str, spin: float = DEFAULT_SPIN) -> None:
        self.fd: int | None = fd
        self.name = name
        #: Seconds to keep polling (the channel, and through trio every other descriptor)
        #: before sleeping in epoll; 0: sleep at once.
        self.spin = spin
        #: True while spinning would take CPU time from the TPM (set by ``--cpu``): the chip
        #: is busy and the managed swtpm runs on our CPU.  None: always spin.
        self.pause_spin: Callable[[], bool] | None = None
        #: The backend's spin, which says until when an answer is due (it spins on to then).
        self.watch: ChannelWatch | None = None
        self.files: dict[int, FileOps] = {}
        self.next_fh = 1
        #: unique -> the cancel scope of the task answering it, for FUSE_INTERRUPT.
        self.inflight: dict[int, trio.CancelScope] = {}
        #: Releases still running: the kernel's close() is done before the next open(), so an
        #: open waits for those before it (a node's max_open counts them as closed).
        self._releasing: dict[int, trio.Event] = {}
        self._buf = bytearray(proto.READ_BUFFER_SIZE)
        self._view = memoryview(self._buf)

    # -- raw I/O -----------------------------------------------------------

    def read_now(self) -> bytes:
        """One request if one is waiting; raises BlockingIOError if none is."""
        assert self.fd is not None
        n = os.readv(self.fd, [self._buf])
        return bytes(self._view[:n])

    async def read_request(self, wait_first: bool = False) -> bytes | None:
        """One request; None once the kernel tore the channel down.  ``wait_first``: the
        channel was just found empty, so wait before reading (one read() less)."""
        while True:
            if wait_first:
                assert self.fd is not None
                await trio.lowlevel.wait_readable(self.fd)
            wait_first = True
            try:
                buf = self.read_now()
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno in (errno.ENODEV, errno.ECONNABORTED, errno.EBADF):
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
            log.debug("%s: reply not delivered: %s", self.name, e)

    # -- the request loop --------------------------------------------------

    async def request_loop(self, nursery: trio.Nursery) -> None:
        """Read requests and answer them, until the channel dies."""
        burst = 0
        while True:
            if burst >= BURST:
                burst = 0
                await trio.lowlevel.checkpoint()
            buf: bytes | None
            try:
                buf = self.read_now()
                burst += 1
            except BlockingIOError:
                burst = 0
                buf = await self.spin_read() if self.spin > 0 else None
                if buf is None:
                    buf = await self.read_request(wait_first=True)  # a checkpoint
            except OSError:
                buf = await self.read_request()  # it sorts the errors out
            if not buf:
                log.info("%s: channel torn down (ENODEV)", self.name)
                return
            self.serve(buf, nursery)

    def serve(self, buf: bytes, nursery: trio.Nursery) -> None:
        """Answer one request.  A read or a poll goes to the fast path straight from its
        bytes, with no request object (four of a command's five requests are these), and is
        parsed only if a task must answer it; any other request is parsed and dispatched."""
        hot = proto.parse_read_or_poll(buf)
        if hot is not None:
            opcode, unique, fh, arg, flags = hot
            try:
                if opcode == proto.OP_READ:
                    out = self.fast_read(unique, fh, arg)
                else:
                    out = self.fast_poll(unique, fh, arg, flags)
            except OSError as e:
                out = proto.reply_error(unique, _errno_of(e))
            if out is None:
                self.start_answer(proto.parse_request(buf), nursery)  # parses what parse_read_or_poll took
            elif out:
                self.send(out)
            return
        try:
            req = proto.parse_request(buf)
        except proto.ProtocolError as e:
            self.reject(buf, e)
        else:
            self.dispatch(req, nursery)

    async def spin_read(self) -> bytes | None:
        """The next request if it comes within ``spin`` seconds, else None.

        A client's next request (a command is five) usually follows the reply within tens of
        µs, and a TPM's answer may too.  Sleeping in epoll meanwhile costs the wake-up, which
        on a VM whose other CPU went idle is about 40 µs, more than the request.  Each round
        lets every other task run and trio poll every descriptor (a checkpoint), so a backend's
        answer is picked up as soon as the channel's requests are; a client on our CPU still
        gets it (the kernel preempts the loop for the task it wakes).
        """
        deadline = time.perf_counter() + self.spin
        if self.watch is not None:
            deadline = max(deadline, self.watch.spin_until())
        pause = self.pause_spin
        while True:
            await trio.lowlevel.checkpoint()
            try:
                return self.read_now()
            except BlockingIOError:
                if time.perf_counter() >= deadline or (pause is not None and pause()):
                    return None
            except OSError:
                return None  # read_request sorts it out

    def reject(self, buf: bytes, error: proto.ProtocolError) -> None:
        """A request we cannot parse (the kernel sends none): answer EIO if its header says
        whom to answer, so no caller waits for ever, and go on.  Ending the loop would take
        the device away from every open file."""
        self.reject_header(proto.parse_header(buf), error)

    def reject_header(self, header: proto.InHeader | None, error: proto.ProtocolError) -> None:
        """:meth:`reject` once the header is known (None: unreadable, nobody to answer)."""
        log.warning("%s: malformed request (%s)", self.name, error)
        if header is not None and header.unique and header.opcode not in proto.NO_REPLY_OPCODES:
            self.send(proto.reply_error(header.unique, errno.EIO))

    def dispatch(self, req: proto.Request, nursery: trio.Nursery) -> None:
        """Answer at once what needs no waiting; start a task for the rest."""
        if isinstance(req, proto.Interrupt):
            scope = self.inflight.get(req.target)
            if scope is not None:  # else it was answered already
                scope.cancel()
            return
        if isinstance(req, (proto.Read, proto.Write, proto.Poll)):
            try:
                out = self.fast(req)
            except OSError as e:
                out = proto.reply_error(req.unique, _errno_of(e))
            if out is None:
                self.start_answer(req, nursery)
            elif out:
                self.send(out)
            return
        if isinstance(req, proto.Open):
            if self._releasing:
                nursery.start_soon(self.open_after, req, list(self._releasing.values()))
            else:
                self.send(self.open_now(req))
            return
        if isinstance(req, proto.Release):
            done = self._releasing[req.unique] = trio.Event()
            nursery.start_soon(self.release, req, done)
            return
        try:
            out = self.other(req)
        except proto.ProtocolError as e:
            # A body the file system cannot parse (a LOOKUP's name without its NUL, a short
            # READDIR): answered like a malformed request, and the loop goes on.
            self.reject_header(req.header, e)
            return
        if out is not None:
            self.send(out)

    def start_answer(self, req: proto.Request, nursery: trio.Nursery) -> None:
        """A task answers ``req``: registered before it starts, so that an interrupt that
        follows at once still finds it."""
        scope = self.inflight[req.unique] = trio.CancelScope()
        nursery.start_soon(self.answer, req, scope)

    def fast(self, req: proto.Read | proto.Write | proto.Poll) -> bytes | None:
        """The reply if the file can answer without waiting; b"" if it is answered already
        (a write) or the file will answer when its O_NONBLOCK command ends (a poll or read
        waiting only for it); else None."""
        if isinstance(req, proto.Read):
            return self.fast_read(req.unique, req.fh, req.size)
        if isinstance(req, proto.Write):
            return self.fast_write(req.unique, req.fh, req.data, req.nonblock)
        return self.fast_poll(req.unique, req.fh, req.kh, req.flags)

    def fast_read(self, unique: int, fh: int, size: int) -> bytes | None:
        """:meth:`fast` for a read of ``size`` bytes."""
        f = self.files.get(fh)
        if f is None:
            return None  # the task answers EBADF
        try_read = getattr(f, "try_read", None)
        data = try_read(size) if try_read is not None else None
        if data is not None:
            return proto.reply_read(unique, data)
        read_after_work = getattr(f, "read_after_work", None)
        later = self.reply_later(unique, proto.reply_read)
        return b"" if read_after_work is not None and read_after_work(size, later) else None

    def fast_write(self, unique: int, fh: int, data: bytes, nonblock: bool) -> bytes | None:
        """:meth:`fast` for a write."""
        f = self.files.get(fh)
        if f is None:
            return None
        try_write = getattr(f, "try_write", None)
        n = try_write(data, nonblock) if try_write is not None else None
        if n is not None:
            # Answered here, so that the file's command may run after the reply is out.
            self.send(proto.reply_write(unique, n))
            after_reply = getattr(f, "after_reply", None)
            if after_reply is not None:
                after_reply()
            return b""
        write_after_work = getattr(f, "write_after_work", None) if not nonblock else None
        later = self.reply_later(unique, proto.reply_write)
        return b"" if write_after_work is not None and write_after_work(data, later) else None

    def fast_poll(self, unique: int, fh: int, kh: int, poll_flags: int) -> bytes | None:
        """:meth:`fast` for a poll (``poll_flags``: fuse_poll_in's)."""
        f = self.files.get(fh)
        if f is None:
            return None
        wake = self.waker(kh) if poll_flags & proto.FUSE_POLL_SCHEDULE_NOTIFY else None
        try_poll = getattr(f, "try_poll", None)
        mask = try_poll(wake) if try_poll is not None else None
        if mask is not None:
            return proto.reply_poll(unique, mask)
        poll_after_work = getattr(f, "poll_after_work", None)
        later = self.reply_later(unique, proto.reply_poll)
        return b"" if poll_after_work is not None and poll_after_work(wake, later) else None

    def reply_later(self, unique: int, ok: Callable[[int, R], bytes]) -> Callable[[R | OSError], None]:
        """The ``reply`` a file calls for a request it answers later: ``ok(unique, result)``
        sent, or the error's."""

        def reply(result: R | OSError) -> None:
            out = proto.reply_error(unique, _errno_of(result)) if isinstance(result, OSError) else ok(unique, result)
            self.send(out)

        return reply

    def open_now(self, req: proto.Open) -> bytes:
        try:
            return self.open_file(req)
        except OSError as e:
            return proto.reply_error(req.unique, _errno_of(e))
        except Exception:
            log.exception("%s: open failed", self.name)
            return proto.reply_error(req.unique, errno.EIO)

    async def open_after(self, req: proto.Open, releases: list[trio.Event]) -> None:
        """An open that came after closes still being released: once they are."""
        for done in releases:
            await done.wait()
        self.send(self.open_now(req))

    async def release(self, req: proto.Release, done: trio.Event) -> None:
        """Release is not interruptible: the file must be released whatever happens to the
        caller (the kernel sends no interrupt for it anyway)."""
        try:
            await self.answer(req, trio.CancelScope())
        finally:
            del self._releasing[req.unique]
            done.set()

    def open_file(self, req: proto.Open) -> bytes:
        """The reply to an open (the subclass makes the file)."""
        raise NotImplementedError

    def add_file(self, f: FileOps) -> int:
        """A new open file; its handle."""
        fh = self.next_fh
        self.next_fh += 1
        self.files[fh] = f
        return fh

    def other(self, req: proto.Request) -> bytes | None:
        """The reply to a request that is no file operation (None: send nothing)."""
        return proto.default_reply(req)

    async def answer(self, req: proto.Request, scope: trio.CancelScope) -> None:
        """Run one request against the device and send its reply."""
        try:
            with scope:
                out = await self.handle(req)
            if scope.cancelled_caught:
                out = proto.reply_error(req.unique, errno.EINTR)
        except OSError as e:
            out = proto.reply_error(req.unique, _errno_of(e))
        except Exception:
            log.exception("%s: request %r failed", self.name, req)
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
        """The device call for one request that may wait, and its reply bytes."""
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

    async def release_all(self, timeout: float = RELEASE_TIMEOUT) -> None:
        """Release files the kernel never will (it does not once the channel is gone)."""
        files, self.files = self.files, {}
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            for f in files.values():
                try:
                    await f.release()
                except Exception:
                    log.exception("%s: release at teardown failed", self.name)


def _errno_of(e: OSError) -> int:
    """The errno a reply can carry (1..511), EIO for anything else."""
    return e.errno if e.errno and 0 < e.errno < 512 else errno.EIO
