# SPDX-License-Identifier: GPL-2.0-only
"""One device node on a shared chip, and its open files (the file half of the trio adapter).

A :class:`Node` is one /dev/tpmrm0 as user space sees it: a name, the kernel profile it
reproduces, its open files, and (through its core chip's seam) any opt-in feature.  Several
nodes may share one :class:`~.chip.TpmChip`.  :class:`DeviceFile` is one open file
description: it only moves bytes, holds the file lock and keeps time; every rule is
:class:`cusetpm.kernel.tpm_dev_common.FileState`'s.  The front ends call ``Node.open`` and the
five ``DeviceFile`` methods, nothing else.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import trio

from ..kernel import wire
from ..kernel.profiles import KernelProfile
from ..kernel.seam import Seam
from ..kernel.tpm_dev_common import FileState, tpm_dev_transmit
from .chip import TpmChip
from .recorder import Recorder

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Opener:
    """Who opened a file, as the front end's request header says (FUSE/CUSE in_header)."""

    uid: int = -1
    gid: int = -1
    pid: int = 0


class Node:
    """One node (/dev/NAME or a FUSE file) on a chip, reproducing one kernel profile."""

    def __init__(self, chip: TpmChip, profile: KernelProfile, name: str = "tpmrm0", seam: Seam | None = None) -> None:
        self.chip = chip
        self.profile = profile
        self.name = name
        #: The core's view of the chip for this node: its profile, command table and seam.
        self.core = chip.core(profile)
        self.core.seam = seam
        if seam is not None and seam.may_wait:
            chip.concurrent_work = True
        self.files: set[DeviceFile] = set()
        #: ``cusetpm record``: every call on every file, as a scenario (None: not recording).
        self.recorder: Recorder | None = None
        #: ``--metrics``: the counters each finished command updates (None: no metrics).
        self.metrics: Metrics | None = None

    def open(self, flags: int = os.O_RDWR, opener: Opener = Opener()) -> DeviceFile:
        """tpmrm_open(): a new file with an empty space.  Nothing reaches the TPM."""
        f = DeviceFile(self, opener)
        self.files.add(f)
        self.chip.files.add(f)
        if self.recorder is not None:
            self.recorder.opened(f, flags)
        return f

    async def close_all(self) -> None:
        """Release every file of this node still open (the node is going away)."""
        for f in list(self.files):
            await f.release()


class DeviceFile:
    """One open file description: its own space, buffer and lock."""

    def __init__(self, node: Node, opener: Opener = Opener()) -> None:
        self.node = node
        self.chip = node.chip
        self.opener = opener
        self.state = FileState(node.profile)
        self.state.space.owner = opener
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
        #: The TPM epoch this file's space belongs to (None: opened while the TPM was away).
        self.epoch: int | None = self.chip.epoch if self.chip.available else None

    def _wake(self) -> None:
        """wake_up_interruptible(&priv->async_wait): each poll waiter once."""
        wake, self._waiter = self._waiter, None
        if wake is not None:
            wake()

    def _arm_timer(self) -> None:
        """mod_timer(&priv->user_read_timer): a response (or async errno) is now pending."""
        if self.state.deadline is not None:
            self.chip.arm_timer(self.state.deadline)

    async def _acquire(self) -> None:
        """Take the file lock.  Only the wait is shielded (the kernel's mutex_lock() cannot
        be interrupted); the uncontended case costs no checkpoint."""
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            with trio.CancelScope(shield=True):
                await self.lock.acquire()

    async def _transmit(self) -> int:
        return await self.chip.file_command(
            tpm_dev_transmit(self.node.core, self.state.space, self.state.buf), self.node.core, self
        )

    async def write(self, data: bytes, nonblock: bool) -> int:
        """tpm_common_write()."""
        if self.node.recorder is not None:
            self.node.recorder.wrote(self, data, nonblock)
        FileState.check_size(len(data))
        await self._acquire()
        handed_over = False
        try:
            self.state.accept_write(data, nonblock)
            if nonblock:
                # The worker inherits the file lock, as the kernel's async work takes the
                # mutex at once: a poll() or read() right after write() waits for it.
                self._work_done = trio.Event()
                self.chip.queue_work(self)
                handed_over = True
                return len(data)
            FileState.check_chip(self.chip.usable_by(self))
            start = trio.current_time()
            result = await self._transmit()
            if self.node.metrics is not None:
                self.node.metrics.observe(self.node.name, data, result, self.state.buf, trio.current_time() - start)
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
            if not self.chip.usable_by(self):
                self.state.async_chip_gone()
            else:
                start, command = trio.current_time(), bytes(self.state.buf[: wire.TPM_HEADER_SIZE])
                result = await self._transmit()
                if self.node.metrics is not None:
                    self.node.metrics.observe(
                        self.node.name, command, result, self.state.buf, trio.current_time() - start
                    )
                self.state.async_finished(result, trio.current_time())
                self._arm_timer()
            self._wake()
        finally:
            self.lock.release()
            done.set()

    async def read(self, size: int, nonblock: bool = False) -> bytes:
        """tpm_common_read(); never EAGAIN: nothing pending reads as 0 bytes."""
        if self.node.recorder is not None:
            self.node.recorder.read(self, size)
        if not self.state.read_needs_lock(size):
            return b""
        await self._acquire()
        try:
            return self.state.read(size)
        finally:
            self.lock.release()

    async def poll(self, wake: Callable[[], None] | None = None) -> int:
        """tpm_common_poll(): waits for a command in flight, then IN or OUT, never both."""
        if self.node.recorder is not None:
            self.node.recorder.polled(self, wake is not None)
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
                log.warning("TPM user space timeout is deprecated (pid=0)")  # timer context: no task
                self.state.timeout()
                self._wake()

    async def release(self) -> None:
        """tpmrm_release(): wait for async work, stop the timer, flush the sessions."""
        if self.closed:
            return
        self.closed = True
        if self.node.recorder is not None:
            self.node.recorder.closed(self)
        with trio.CancelScope(shield=True):
            if self._work_done is not None:
                await self._work_done.wait()
            self.state.deadline = None
            self.node.files.discard(self)
            self.chip.files.discard(self)
            await self.chip.file_release(self)
