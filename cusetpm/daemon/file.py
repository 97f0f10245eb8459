# SPDX-License-Identifier: GPL-2.0-only
"""One open file of a node (the file half of the trio adapter): tpm-dev-common.c's file
operations on trio.

:class:`DeviceFile` is one open file description: it only moves bytes, holds the file lock
and keeps time; every rule is :class:`cusetpm.kernel.tpm_dev_common.FileState`'s.  Its fast
path (what needs no waiting, answered without a task) is what the front ends' request loop
(:mod:`cusetpm.frontends.channel`) calls first.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

import trio

from ..kernel import wire
from ..kernel.tpm_dev_common import FileState, tpm_dev_transmit

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)
#: A blocking write the worker (or the request loop) runs: its bytes and its reply.
Blocking = tuple[bytes, Callable[[int | OSError], None]]
#: A watched command (Node.observed) as it began: its bytes, trio's clock, the wall clock, and the
#: backend's command count.
_Watch = tuple[bytes, float, float, int]


@dataclass(frozen=True, slots=True)
class Opener:
    """Who opened a file, as the front end's request header says (FUSE/CUSE in_header)."""

    uid: int = -1
    gid: int = -1
    pid: int = 0


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
        #: While an O_NONBLOCK command holds the file lock: the polls and reads that came
        #: meanwhile, run under the lock when it ends (see :meth:`poll_after_work`).
        self._after_work: list[Callable[[], None]] | None = None
        #: A blocking write the worker runs (:meth:`write_after_work`): its bytes and its reply.
        self._blocking: Blocking | None = None
        #: :meth:`try_write` took an O_NONBLOCK command that :meth:`after_reply` runs.
        self._deferred = False
        #: The timer has fired and timeout_work is queued for this file.
        self.timeout_queued = False
        self.closed = False
        #: The TPM epoch this file's space belongs to (None: opened while the TPM was away).
        self.epoch: int | None = self.chip.epoch if self.chip.available else None
        #: The opener's command name, for a tenant node's status and audit trail.
        self.comm = _comm(opener.pid) if node.tenant is not None else ""
        #: The file's stream in the node's pcapng capture.
        self.stream = node.next_stream()

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

    async def _run(self, command: bytes) -> int:
        """The command through the core to the TPM; then what watches commands is told."""
        if not self.node.observed:
            return await self._transmit()
        watch = self._watch(command)
        result = await self._transmit()
        self._watched(watch, result)
        return result

    def _watch(self, command: bytes) -> _Watch:
        """A watched command begins (Node.observed): what :meth:`_watched` will need."""
        return command, trio.current_time(), time.time(), self.chip.backend.commands_sent

    def _watched(self, watch: _Watch, result: int) -> None:
        """The watched command ended with ``result``: the node tells what watches it."""
        command, start, wall, sent = watch
        self.node.command_done(self, command, result, trio.current_time() - start, wall,
                               self.chip.backend.commands_sent - sent)  # fmt: skip

    def _held_command(self) -> bytes:
        """The accepted command in the file's buffer, as what watches it needs it: all of it
        for the audit trail, else its header (the metrics' command code)."""
        size = wire.be32(self.state.buf, 2) if self.node.audited else wire.TPM_HEADER_SIZE
        return bytes(self.state.buf[: min(size, len(self.state.buf))])

    async def write(self, data: bytes, nonblock: bool) -> int:
        """tpm_common_write()."""
        self._write_begins(data, nonblock)
        await self._acquire()
        handed_over = False
        try:
            self.state.accept_write(data, nonblock)
            if nonblock:
                self._hand_over()
                handed_over = True
                return len(data)
            return await self._command(data)
        finally:
            if not handed_over:
                self.lock.release()

    async def _command(self, data: bytes) -> int:
        """A blocking write's command, under the file lock: what write() returns."""
        FileState.check_chip(self.chip.usable_by(self))
        await self.node.throttle()
        result = await self._run(data)
        size = self.state.command_finished(result, len(data), trio.current_time())
        self._arm_timer()
        return size

    def _write_begins(self, data: bytes, nonblock: bool) -> None:
        """Before the file lock: the recording, and E2BIG (step 1)."""
        if self.node.recorder is not None:
            self.node.recorder.wrote(self, data, nonblock)
        FileState.check_size(len(data))

    def _hand_over(self) -> None:
        """Queue the O_NONBLOCK command.  The worker inherits the file lock, as the kernel's
        async work takes the mutex at once: a poll() or read() right after write() waits for it."""
        self._work_done = trio.Event()
        self._after_work = []
        self.chip.queue_work(self.async_work)

    # -- the fast path: what needs no waiting, answered without a task (issue 9) ----------
    #
    # Each returns None, having done nothing, when the call would have to wait (the file lock
    # is taken, or the command must go to the TPM); the front end then runs the async method,
    # which does it all.  Otherwise it is exactly that method, minus the awaits.

    def try_write(self, data: bytes, nonblock: bool) -> int | None:
        """write() of an O_NONBLOCK command with the lock free: accept it and return.  The
        caller then answers the write and calls :meth:`after_reply`, which runs the command."""
        if not nonblock or self.lock.value == 0:
            return None
        self._accept_unlocked(data, nonblock)
        self._deferred = True  # the command holds the lock until it ends
        return len(data)

    def after_reply(self) -> None:
        """The write :meth:`try_write` took is answered: run its command (:meth:`_run_inline`,
        else the worker).  The client cannot tell where: its poll() or read() waits for the
        file lock either way, as it would for the kernel's async work."""
        if not self._deferred:
            return
        self._deferred = False
        if not self._run_inline(None):
            self._hand_over()  # the worker releases the lock

    def _run_inline(self, blocking: Blocking | None) -> bool:
        """The command the file holds its lock for, begun here in the request loop while
        nobody else needs the TPM (TpmChip.start_inline), which saves the worker's wake-up
        and a task switch a command.  It usually ends here too; one that must wait goes on in
        the worker.  False, having done nothing, when it cannot start here.  ``blocking``: a
        blocking write's bytes and reply (:meth:`write_after_work`), else an O_NONBLOCK one."""
        node, chip = self.node, self.chip
        if not chip.usable_by(self) or not chip.may_start_inline():
            return False
        if not node.turn_now():
            return False  # over the tenant's rate: the worker waits its turn (Node.throttle)
        watch = self._watch(self._held_command()) if node.observed else None
        try:
            out = chip.start_inline(tpm_dev_transmit(node.core, self.state.space, self.state.buf), node.core, self)
        except Exception:
            log.exception("a command failed")
            out, watch = -errno.EIO, None  # told of no command, as when _run raises
        if isinstance(out, int):
            if watch is not None:
                self._watched(watch, out)
            self._command_over(out, blocking)
            self.lock.release()
            if blocking is None:  # the kernel's blocking write wakes nobody
                self._wake()
            return True
        self._work_done = trio.Event()
        self._after_work = []
        rest = out
        self.chip.queue_work(lambda: self._finish(rest, blocking, watch))
        return True

    def _command_over(self, result: int, blocking: Blocking | None) -> None:
        """The command ended with ``result``: its response (or errno) kept for read(), or the
        blocking write answered (its size, or its error), as :meth:`_command` would."""
        if blocking is None:
            self.state.async_finished(result, trio.current_time())
            self._arm_timer()
            return
        data, reply = blocking
        try:
            size: int | OSError = self.state.command_finished(result, len(data), trio.current_time())
            self._arm_timer()
        except OSError as e:
            size = e
        reply(size)

    async def _finish(self, rest: Callable[[], Awaitable[int]], blocking: Blocking | None,
                      watch: _Watch | None) -> None:  # fmt: skip
        """The worker's half of a command :meth:`_run_inline` began."""
        assert self._work_done is not None
        done, finished = self._work_done, False
        try:
            try:
                result = await rest()
            except Exception:
                log.exception("a command failed")
                result = -errno.EIO
            else:
                if watch is not None:
                    self._watched(watch, result)
            self._command_over(result, blocking)
            finished = True
        finally:
            self._work_over(done, finished and blocking is None)

    def _accept_unlocked(self, data: bytes, nonblock: bool) -> None:
        """write()'s steps up to the command with the lock free: take it and accept ``data``
        (the lock is let go again if the write is refused)."""
        self._write_begins(data, nonblock)
        self.lock.acquire_nowait()
        try:
            self.state.accept_write(data, nonblock)
        except BaseException:
            self.lock.release()
            raise

    def try_read(self, size: int) -> bytes | None:
        """read() with the lock free (a ready response, or nothing pending)."""
        if self.lock.value == 0:
            return None
        if self.node.recorder is not None:
            self.node.recorder.read(self, size)
        if not self.state.read_needs_lock(size):
            return b""
        return self.state.read(size)

    def try_poll(self, wake: Callable[[], None] | None = None) -> int | None:
        """poll() with the lock free."""
        if self.lock.value == 0:
            return None
        self._poll_begins(wake)
        return self.state.poll_mask()

    # -- what waits only for the O_NONBLOCK command: answered when it ends, with no task ----
    #
    # A client's poll() (or read()) right after an O_NONBLOCK write() waits for the file lock
    # the command holds, as the kernel's does in mutex_lock().  If nothing else waits for the
    # lock, the call is queued on the file instead of in a task of its own, and the worker runs
    # it under the lock as the command ends, before anyone else may take it: the order the
    # lock would have given.  Each returns False, having done nothing, when that cannot be.

    def write_after_work(self, data: bytes, reply: Callable[[int | OSError], None]) -> bool:
        """A blocking write() with the lock free: its command goes to the worker, as an
        O_NONBLOCK one does, and ``reply(size)`` (or ``reply(error)``) answers it when it ends,
        instead of a task waiting for it.  The kernel's blocking write is not interruptible
        either (a plain mutex_lock, then the command), so a task would add nothing."""
        if self.lock.value == 0:
            return False
        self._accept_unlocked(data, False)
        if not self._run_inline((data, reply)):
            self._blocking = (data, reply)
            self._hand_over()  # the worker releases the lock
        return True

    async def _answer_write(self, data: bytes) -> int | OSError:
        """:meth:`_command` for the worker: its errno, or EIO for a bug, as a reply (a task's
        request would have been answered so, see Channel.answer)."""
        try:
            return await self._command(data)
        except OSError as e:
            return e
        except Exception:
            log.exception("a blocking write's command failed")
            return OSError(errno.EIO, "internal error")

    def _waits_only_for_work(self) -> bool:
        return self._after_work is not None and self.lock.statistics().tasks_waiting == 0

    def poll_after_work(self, wake: Callable[[], None] | None, reply: Callable[[int], None]) -> bool:
        """poll(): ``reply(mask)`` once the command holding the lock ends."""
        if not self._waits_only_for_work():
            return False
        self._poll_begins(wake)
        assert self._after_work is not None
        self._after_work.append(lambda: reply(self.state.poll_mask()))
        return True

    def read_after_work(self, size: int, reply: Callable[[bytes | OSError], None]) -> bool:
        """read(): ``reply(data)`` (or ``reply(error)``) once the command holding the lock ends."""
        if not self._waits_only_for_work() or not self.state.read_needs_lock(size):
            return False
        if self.node.recorder is not None:
            self.node.recorder.read(self, size)

        def then() -> None:
            try:
                data: bytes | OSError = self.state.read(size)
            except OSError as e:
                data = e
            reply(data)

        assert self._after_work is not None
        self._after_work.append(then)
        return True

    def _poll_begins(self, wake: Callable[[], None] | None) -> None:
        """poll_wait(), before the lock: the recording, and the wake-up registered."""
        if self.node.recorder is not None:
            self.node.recorder.polled(self, wake is not None)
        if wake is not None:
            self._waiter = wake

    async def async_work(self) -> None:
        """tpm_dev_async_work(): the O_NONBLOCK command, run after write() returned; or a
        blocking write's command (:meth:`write_after_work`), answered as it ends.

        Runs holding the file lock that write() handed over.
        """
        assert self._work_done is not None
        done = self._work_done
        blocking, self._blocking = self._blocking, None
        finished = False
        try:
            if blocking is not None:
                data, reply = blocking
                reply(await self._answer_write(data))
            elif not self.chip.usable_by(self):
                self.state.async_chip_gone()
            else:
                await self.node.throttle()
                result = await self._run(self._held_command())
                self.state.async_finished(result, trio.current_time())
                self._arm_timer()
            finished = True
        finally:
            self._work_over(done, finished and blocking is None)  # a blocking write wakes nobody

    def _work_over(self, done: trio.Event, wake: bool) -> None:
        """mutex_unlock(), then wake_up_interruptible(): first what waited for the lock
        (their replies go out before the wake-up, which only makes pollers poll again)."""
        after, self._after_work = self._after_work, None
        for then in after or ():
            try:
                then()
            except Exception:
                log.exception("a call waiting for the command failed")
        self.lock.release()
        if wake:
            self._wake()
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
        self._poll_begins(wake)
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
            if self.node.pcap is not None:
                self.node.pcap.end_stream(self.stream, time.time())
            if not self.node.files and not self.node.accepting:
                self.node.emptied.set()


def _comm(pid: int) -> str:
    """/proc/PID/comm, or "" (the process is gone, or not ours to see)."""
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""
