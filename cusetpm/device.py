# SPDX-License-Identifier: GPL-2.0-only
"""The trio adapter around the sans-I/O core: one TPM chip, many open files.

:class:`TpmDevice` plays the part of the kernel's chip (its ``tpm_mutex`` is a trio lock
held for a whole user command) and :class:`DeviceFile` the part of one open file description
of /dev/tpmrm0 (its ``file_priv`` mutex is another trio lock).  The FUSE and CUSE front ends
call only ``TpmDevice.open`` and the four ``DeviceFile`` methods.

The kernel's file operations sleep uninterruptibly, so every operation here runs shielded
from cancellation: an interrupted syscall never leaves a space half-loaded.
"""
from __future__ import annotations

import errno
import logging
import math
import os
from typing import Awaitable, Callable, Protocol, TypeVar

import trio

from .profiles import KernelProfile
from .tpm import Io, Send
from .tpm2_cmd import auto_startup
from .tpm_chip import Chip
from .tpm_dev_common import FileState, release_space, tpm_dev_transmit

log = logging.getLogger(__name__)
T = TypeVar("T")


class Backend(Protocol):
    """Where commands go.  ``transmit`` returns the response, or a negative errno."""

    commands_sent: int

    async def transmit(self, data: bytes, timeout: float) -> bytes | int: ...

    async def aclose(self) -> None: ...


class TpmDevice:
    """One backing TPM shared by every open file, as struct tpm_chip is."""

    def __init__(self, backend: Backend, profile: KernelProfile) -> None:
        self.backend = backend
        self.chip = Chip(profile)
        self.profile = profile
        #: tpm_mutex: one user command (with all of its context traffic) at a time.
        self.lock = trio.Lock()
        self.files: set[DeviceFile] = set()
        #: False once the chip is "unregistered": writes then fail like ops == NULL.
        self.available = False
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None
        self._work_send, self._work_recv = trio.open_memory_channel["DeviceFile"](math.inf)

    async def run(self, gen: Io[T]) -> T:
        """Drive a core generator against the backend.  The caller holds ``self.lock``."""
        transmit = self.backend.transmit
        reply: bytes | int | None = None
        while True:
            try:
                req = gen.send(reply)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            if type(req) is Send:
                reply = await transmit(req.data, req.timeout)
            else:
                await trio.sleep(req.seconds)  # type: ignore[union-attr]
                reply = None

    async def transmit(self, state: FileState) -> int:
        """Run one user command of ``state``'s file under the chip lock (tpm_dev_transmit).

        Shielded: once a command has started, its space must be saved or flushed.
        """
        with trio.CancelScope(shield=True):
            try:
                self.lock.acquire_nowait()
            except trio.WouldBlock:
                await self.lock.acquire()
            try:
                result = await self.run(tpm_dev_transmit(self.chip, state.space, state.buf))
            finally:
                self.lock.release()
        return result

    def queue_work(self, f: "DeviceFile") -> None:
        """Queue an O_NONBLOCK command (queue_work(tpm_dev_wq, ...)).  One worker task runs
        them in order; they would wait for the chip lock one after another anyway."""
        self._work_send.send_nowait(f)

    async def _worker(self) -> None:
        async for f in self._work_recv:
            await f.async_work()

    async def register(self) -> None:
        """tpm_chip_register()'s auto-startup: self test, Startup, command table."""
        async with self.lock:
            await self.run(auto_startup(self.chip))
        self.available = True

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the tasks the files need (async commands, the unread-response timer).

        Runs until cancelled; then closes every file still open, flushing its sessions.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._worker)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._drain_work()
                await self.close_all()

    async def _drain_work(self) -> None:
        """Run O_NONBLOCK commands still queued when the worker stopped: their files hold
        the file lock for them, and close waits for them, as the kernel's does."""
        while True:
            try:
                f = self._work_recv.receive_nowait()
            except trio.WouldBlock:
                return
            await f.async_work()

    async def close_all(self) -> None:
        """Release every open file, as the kernel would on close (used at shutdown)."""
        for f in list(self.files):
            await f.release()

    def open(self, flags: int = os.O_RDWR) -> "DeviceFile":
        """tpmrm_open(): a new file with an empty space.  Nothing reaches the TPM."""
        f = DeviceFile(self)
        self.files.add(f)
        return f

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is None:
            raise RuntimeError("TpmDevice.serve() is not running")
        self._nursery.start_soon(fn)

    # --- the unread-response timer (user_read_timer) ------------------------------------

    def arm_timer(self, deadline: float) -> None:
        scope = self._timer_scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    async def _timer_loop(self) -> None:
        while True:
            # A file whose timeout work is already queued (it may wait for the file lock
            # behind a long command) is left out, or the loop would spin on its deadline.
            waiting = {f: f.state.deadline for f in self.files if f.state.deadline is not None and not f.timeout_queued}
            with trio.CancelScope(deadline=min(waiting.values(), default=math.inf)) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            now = trio.current_time()
            for f in waiting:
                if f.state.deadline is not None and f.state.deadline <= now and f in self.files:
                    f.timeout_queued = True
                    self.spawn(f.timeout_work)


class DeviceFile:
    """One open file description: its own space, buffer and lock."""

    def __init__(self, device: TpmDevice) -> None:
        self.device = device
        self.state = FileState(device.profile)
        #: The file_priv mutex.  A semaphore, not a trio.Lock, because an O_NONBLOCK write
        #: hands it to the task that runs the command.
        self.lock = trio.Semaphore(1)
        #: The poll wake-up of this file.  FUSE and CUSE key poll notifications by file, so
        #: the latest registration stands for every poller of the file.
        self._waiter: Callable[[], None] | None = None
        self._work_done: trio.Event | None = None
        #: The timer has fired and timeout_work is queued for this file.
        self.timeout_queued = False
        self.closed = False

    def _wake(self) -> None:
        """wake_up_interruptible(&priv->async_wait): each poll waiter once."""
        wake, self._waiter = self._waiter, None
        if wake is not None:
            wake()

    def _arm_timer(self) -> None:
        """mod_timer(&priv->user_read_timer): a response (or async errno) is now pending."""
        if self.state.deadline is not None:
            self.device.arm_timer(self.state.deadline)

    async def _acquire(self) -> None:
        """Take the file lock.  Only the wait is shielded (the kernel's mutex_lock() cannot
        be interrupted); the uncontended case costs no checkpoint."""
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            with trio.CancelScope(shield=True):
                await self.lock.acquire()

    async def write(self, data: bytes, nonblock: bool) -> int:
        """tpm_common_write()."""
        FileState.check_size(len(data))
        await self._acquire()
        handed_over = False
        try:
            self.state.accept_write(data)
            if nonblock:
                # The worker inherits the file lock, as the kernel's async work takes the
                # mutex at once: a poll() or read() right after write() waits for it.
                self.state.command_enqueued = True
                self._work_done = trio.Event()
                self.device.queue_work(self)
                handed_over = True
                return len(data)
            if not self.device.available:
                raise OSError(errno.EPIPE, os.strerror(errno.EPIPE))
            result = await self.device.transmit(self.state)
            size = self.state.command_finished(result, len(data), trio.current_time())
            self._arm_timer()
            return size
        finally:
            if not handed_over:
                self.lock.release()

    async def async_work(self) -> None:
        """tpm_dev_async_work(): the O_NONBLOCK command, run after write() returned.

        Runs holding the file lock that write() handed over.
        """
        assert self._work_done is not None
        done = self._work_done
        try:
            if not self.device.available:
                self.state.async_ops_failed(errno.EIO)
            else:
                result = await self.device.transmit(self.state)
                self.state.async_finished(result, trio.current_time())
                self._arm_timer()
            self._wake()
        finally:
            self.lock.release()
            done.set()

    async def read(self, size: int, nonblock: bool = False) -> bytes:
        """tpm_common_read(); never EAGAIN: nothing pending reads as 0 bytes."""
        if size == 0 and self.device.profile.read_zero_returns_early:
            return b""
        await self._acquire()
        try:
            return self.state.read(size)
        finally:
            self.lock.release()

    async def poll(self, wake: Callable[[], None] | None = None) -> int:
        """tpm_common_poll(): waits for a command in flight, then IN or OUT, never both."""
        if wake is not None:
            self._waiter = wake
        await self._acquire()
        mask = self.state.poll_mask()
        self.lock.release()
        return mask

    async def timeout_work(self) -> None:
        """tpm_timeout_work(): throw the unread response away and wake pollers."""
        with trio.CancelScope(shield=True):
            async with self.lock:
                self.timeout_queued = False
                if self.state.deadline is None or self.state.deadline > trio.current_time():
                    self._arm_timer()  # a new response came meanwhile: its own deadline
                    return
                log.warning("TPM user space timeout is deprecated (pid=0)")
                self.state.timeout()
                self._wake()

    async def release(self) -> None:
        """tpmrm_release(): wait for async work, stop the timer, flush the sessions."""
        if self.closed:
            return
        self.closed = True
        with trio.CancelScope(shield=True):
            if self._work_done is not None:
                await self._work_done.wait()
            self.state.deadline = None
            self.device.files.discard(self)
            if self.device.available:
                async with self.device.lock:
                    await self.device.run(release_space(self.state.space))
