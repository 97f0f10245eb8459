# SPDX-License-Identifier: GPL-2.0-only
"""The trio adapter for one backing TPM: struct tpm_chip's lock, work queue and timer.

:class:`TpmChip` is what every node on one TPM shares: the backend, the kernel's
``tpm_mutex`` (a trio lock held for a whole user command), the O_NONBLOCK worker
(``tpm_dev_wq``) and the unread-response timer.  It drives the sans-I/O core's requests
(:mod:`cusetpm.kernel.request`) against the backend.  The nodes (:mod:`.node`) hold the files.

The kernel's file operations sleep uninterruptibly, so every command runs shielded from
cancellation: an interrupted syscall never leaves a space half-loaded.
"""

from __future__ import annotations

import errno
import logging
import math
from types import TracebackType
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol, TypeVar, assert_never

import trio

from ..backends.base import Backend
from ..kernel import wire
from ..kernel.profiles import PROFILES, KernelProfile
from ..kernel.request import Io, Reply, Request, Send, Sleep, Wait
from ..kernel.structs import Chip, Space
from ..kernel.tpm2_cmd import auto_startup
from ..kernel.tpm_dev_common import release_space
from ..kernel.wire import be32
from .recovery import TpmIdentity, flush_leftovers, read_identity

#: The profile of the chip's own commands (registration, recovery): they do not depend on it.
DEFAULT_CORE_PROFILE = PROFILES["6.12"]

if TYPE_CHECKING:
    from .file import DeviceFile

log = logging.getLogger(__name__)
T = TypeVar("T")
#: What the worker runs: a file's O_NONBLOCK command, or the rest of one begun inline.
Work = Callable[[], Awaitable[None]]


class InlineBackend(Protocol):
    """A backend that can send without awaiting: the socket ones (swtpm, the simulator) and
    ``device:``; a tpm2-tss TCTI cannot (it runs in a thread)."""

    def ready_now(self) -> bool: ...

    def send_now(self, data: bytes, timeout: float) -> bytes | int | None: ...

    async def answer(self) -> bytes | int: ...


def _unusable(rsp: bytes) -> bool:
    """An answer tpm_try_transmit() refuses (EFAULT, EIO): short, mis-sized, oversized."""
    return not wire.TPM_HEADER_SIZE <= len(rsp) <= wire.TPM_BUFSIZE or len(rsp) != be32(rsp, 2)


class TpmChip:
    """One backing TPM shared by every node and every open file, as struct tpm_chip is."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        #: tpm_mutex: one user command (with all of its context traffic) at a time.  A
        #: semaphore, not a trio.Lock (both are fair), because a command begun in the request
        #: loop may end in the worker (:meth:`start_inline`).
        self.lock = trio.Semaphore(1)
        #: Every open file of every node (the timer walks them).
        self.files: set[DeviceFile] = set()
        #: False once the chip is "unregistered": writes then fail like ops == NULL.
        self.available = False
        #: TPMA_CC of every command, read once at registration; each node's core chip gets it.
        self.cc_attrs_tbl: list[int] = []
        self._cores: list[Chip] = []
        self._events: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None
        #: None asks the worker to stop (at shutdown, once what came before it has run).
        self._work_send, self._work_recv = trio.open_memory_channel["Work | None"](math.inf)
        #: Work queued and not yet finished (the memory channel hands an item to a waiting
        #: worker at once, so its buffer does not say whether the worker is busy).
        self._work_pending = 0
        #: The worker's task: it runs shielded as a whole, so its commands need no scope each.
        self._worker_task: trio.lowlevel.Task | None = None
        #: Which TPM the open files' spaces belong to: a file opened in another epoch gets
        #: EPIPE (:mod:`.recovery`).  Bumped each time the TPM turns out to have restarted.
        self.epoch = 0
        #: How many times the backend's transport failed / the TPM had restarted.
        self.reconnects = 0
        self.restarts = 0
        self.identity: TpmIdentity | None = None
        self._transport_lost = False
        self._fault = False
        self._recovering = False
        #: Files closed while the TPM was unreachable: flushed if it comes back the same.
        self._orphans: list[tuple[Chip, Space]] = []
        #: Run each O_NONBLOCK command in a task of its own instead of one worker: set when
        #: a node's seam may wait (Seam.may_wait), so a waiting command holds up no other.
        self.concurrent_work = False
        #: The file of the last command, and whether the one before was the same file's
        #: (:meth:`alone`).
        self._last_file: DeviceFile | None = None
        self._same_file = False
        #: The backend, if it can send without awaiting (:meth:`start_inline`).
        self._inline_backend: InlineBackend | None = (
            backend if callable(getattr(backend, "send_now", None)) else None  # type: ignore[assignment]
        )

    def core(self, profile: KernelProfile) -> Chip:
        """A core chip as one kernel profile sees this TPM (a node has one); it gets the
        command table now, or at registration."""
        core = Chip(profile, self.cc_attrs_tbl)
        self._cores.append(core)
        return core

    async def run(self, gen: Io[T], core: Chip, reply: Reply = None) -> T:
        """Drive a core generator against the backend (``reply``: the answer to what it
        asked last, for one begun by :meth:`start_inline`).  The caller holds ``self.lock``."""
        try:
            while True:
                try:
                    req = gen.send(reply)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                reply = await self._perform(req, core)
        finally:
            self._wake(core)

    async def _perform(self, req: Request, core: Chip) -> Reply:
        """One request of the core's, done."""
        match req:
            case Send():
                return self._received(await self.backend.transmit(req.data, req.timeout))
            case Sleep():
                await trio.sleep(req.seconds)
                return None
            case Wait():
                return await self._wait(req, core)
            case _:
                assert_never(req)

    def _received(self, reply: bytes | int) -> bytes | int:
        if isinstance(reply, int) or _unusable(reply):
            # No answer, or one the kernel will refuse: what the TPM did meanwhile is
            # unknown (see _flush_after_fault).
            self._transport_lost |= reply == -errno.EPIPE
            self._fault = True
        return reply

    def busy(self) -> bool:
        """A command (or close) holds the chip."""
        return self.lock.value == 0

    def may_start_inline(self) -> bool:
        """May a file's O_NONBLOCK command start in the request loop (:meth:`start_inline`)?
        Only when nothing else wants the TPM: the chip is free, and no work is queued or
        running (with ``concurrent_work``, no command's task is); and only on a backend that
        can send without awaiting."""
        return (
            self._work_pending == 0
            and self.lock.value == 1
            and self.available
            and not self._recovering
            and self._inline_backend is not None
            and self._inline_backend.ready_now()
        )

    def start_inline(self, gen: Io[int], core: Chip, f: DeviceFile) -> int | Callable[[], Awaitable[int]]:
        """:meth:`file_command` begun without awaiting, from the request loop, when
        :meth:`may_start_inline` says yes (issue 9: no task switch, no await, when swtpm
        answers within the spin).  Runs the core until it must wait: its result if it never
        had to, else the rest as a coroutine function, which holds the chip meanwhile, for
        the worker to finish (:meth:`queue_work`).  The TPM sees the same commands either way.
        """
        backend = self._inline_backend
        assert backend is not None
        self._same_file, self._last_file = f is self._last_file, f
        self.lock.acquire_nowait()
        reply: Reply = None
        try:
            while True:
                try:
                    req = gen.send(reply)
                except StopIteration as stop:
                    result: int = stop.value
                    break
                if not isinstance(req, Send):
                    waits = req
                    return lambda: self._rest(gen, core, self._perform(waits, core))
                now = backend.send_now(req.data, req.timeout)
                if now is None:
                    return lambda: self._rest(gen, core, self._answer(backend))
                reply = self._received(now)
        except BaseException:
            self._wake(core)
            self.lock.release()
            raise
        self._wake(core)
        if self._fault or self._transport_lost:
            return lambda: self._rest_after(result)
        self.lock.release()
        return result

    async def _rest(self, gen: Io[int], core: Chip, pending: Awaitable[Reply]) -> int:
        """The rest of a command :meth:`start_inline` began, holding the chip it took."""
        async with _Held(self, acquired=True):
            result = await self.run(gen, core, await pending)
            await self._flush_after_fault()
        return result

    async def _answer(self, backend: InlineBackend) -> Reply:
        return self._received(await backend.answer())

    async def _rest_after(self, result: int) -> int:
        """What follows a command :meth:`start_inline` ran whose answer was lost or unusable."""
        async with _Held(self, acquired=True):
            await self._flush_after_fault()
        return result

    async def _wait(self, req: Wait, core: Chip) -> bool:
        """Let go of the chip until ``req.event`` is signalled or time runs out, then take
        it again.  Signals raised so far are delivered first, so nobody misses its own."""
        self._wake(core)
        event = self._events.setdefault(req.event, trio.Event())
        self.lock.release()
        try:
            with trio.move_on_after(req.timeout):
                await event.wait()
        finally:
            await self.lock.acquire()
        return event.is_set()

    def _wake(self, core: Chip) -> None:
        for name in core.signals:
            event = self._events.pop(name, None)
            if event is not None:
                event.set()
        core.signals.clear()

    async def command(self, gen: Io[T], core: Chip) -> T:
        """Run one user command (or close) under the chip lock, shielded: once a command has
        started, its space must be saved or flushed."""
        async with self._held():
            result = await self.run(gen, core)
            await self._flush_after_fault()
        return result

    async def _flush_after_fault(self) -> None:
        """After a command whose answer was lost or unusable (ETIME, EIO, EFAULT from the
        transport), the TPM may hold what the kernel's error path could not know of: a
        context its ContextLoad loaded, an object its CreatePrimary made.  Between commands
        nothing is loaded (.recovery.flush_leftovers), so flush what is; only on such faults,
        so the TPM traffic of every sound command stays the kernel's."""
        if not self._fault or self._recovering:
            return
        self._fault = False
        if not self._transport_lost:
            flushed = await self.run(flush_leftovers(), Chip(DEFAULT_CORE_PROFILE))
            self._tell_features("loaded_flushed")
            if flushed:
                log.warning("flushed %d handles left in the TPM by a command whose answer was lost", flushed)

    def _held(self) -> _Held:
        """The chip lock, shielded from cancellation, for one command (or close); on the way
        out, a lost transport starts the recovery."""
        return _Held(self)

    async def file_command(self, gen: Io[int], core: Chip, f: DeviceFile) -> int:
        """:meth:`command` for a file's command: checked again under the lock, because the
        TPM may have gone, or restarted, while the file waited for it."""
        async with self._held():
            self._same_file, self._last_file = f is self._last_file, f
            if not self.usable_by(f):
                gen.close()
                return -errno.EPIPE
            result = await self.run(gen, core)
            await self._flush_after_fault()
        return result

    async def register(self) -> None:
        """tpm_chip_register()'s auto-startup: self test, Startup, command table.  The
        table does not depend on the profile; 6.12's is used to read it."""
        probe = Chip(DEFAULT_CORE_PROFILE)
        await self.command(auto_startup(probe), probe)
        self.cc_attrs_tbl = probe.cc_attrs_tbl
        for core in self._cores:
            core.set_cc_attrs(self.cc_attrs_tbl)
        self.identity = await self.command(read_identity(trio.current_time()), probe)
        self.available = True

    # --- a backend that went away (see .recovery) ----------------------------------------

    def usable_by(self, f: DeviceFile) -> bool:
        """May ``f`` send commands?  Not while the TPM is unreachable, and never again if
        the TPM restarted since ``f`` was opened (its space refers to the old TPM)."""
        if f.epoch is None and self.available:
            f.epoch = self.epoch  # opened while the TPM was away: it belongs to this one
        return self.available and f.epoch == self.epoch

    async def file_release(self, f: DeviceFile) -> None:
        """tpmrm_release()'s flush of ``f``'s sessions, decided under the lock: on the TPM
        the file belongs to; kept for later while that TPM is unreachable; nothing at all
        once the TPM has restarted (its handles would name the new TPM's sessions)."""
        core, space = f.node.core, f.state.space
        async with self._held():
            if self.usable_by(f):
                await self.run(release_space(core, space), core)
            elif f.epoch == self.epoch and self._recovering:
                self._orphans.append((core, space))

    def _lose_tpm(self) -> None:
        self._transport_lost = False
        if self._nursery is None:
            return
        self.available = False
        self._recovering = True
        self.reconnects += 1
        log.warning("lost the connection to the TPM; reconnecting")
        self._nursery.start_soon(self._recover)

    async def _recover(self) -> None:
        """Reconnect with back-off until the TPM answers, then either carry on (the same
        TPM: flush what the cut-short command left loaded, then the orphans) or start a new
        epoch (a restarted TPM: auto-startup again; every file opened before gets EPIPE)."""
        delay = 0.05
        probe = Chip(DEFAULT_CORE_PROFILE)
        while True:
            try:
                await self.backend.reconnect()
                self._transport_lost = False
                ident = await self.command(read_identity(trio.current_time()), probe)
                same = ident is not None and self.identity is not None and ident.same_as(self.identity)
                if same and not self._transport_lost:
                    flushed = await self.command(flush_leftovers(), probe)
                    self._tell_features("loaded_flushed")
                    for core, space in self._orphans:
                        await self.command(release_space(core, space), core)
                    log.warning("the TPM is back, the same TPM (%d handles of the cut-short command flushed)", flushed)
                elif not self._transport_lost:
                    await self.register()
                    self.available = False  # register() said yes; the new epoch is not set yet
                    self.epoch += 1
                    self.restarts += 1
                    self._tell_features("tpm_restarted")
                    log.warning("the TPM was restarted: files opened before now get EPIPE (epoch %d)", self.epoch)
                if not self._transport_lost:
                    break
            except Exception as exc:  # the TPM is not back yet (or its start-up failed): again
                log.info("the TPM is not back yet: %s", exc)
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)
        self._orphans.clear()
        self.available = True
        self._recovering = False

    def _tell_features(self, event: str) -> None:
        """Call the Seam method ``event`` of each feature of the nodes' seams, once however
        many nodes share it."""
        features = {id(f): f for c in self._cores if c.seam is not None for f in c.seam.features}
        for feature in features.values():
            getattr(feature, event)()

    def alone(self) -> bool:
        """One client has the TPM to itself: the command at the TPM is its file's second in a
        row, and no other command waits (none queued for the worker, none for the lock)."""
        return (
            self._same_file
            and self._work_pending <= 1  # the worker's own command, if it runs one
            and not self.lock.statistics().tasks_waiting
        )

    def queue_work(self, work: Work) -> None:
        """Queue an O_NONBLOCK command (queue_work(tpm_dev_wq, ...)), or the rest of one
        begun inline.  One worker task runs them in order; they would wait for the chip lock
        one after another anyway.  With ``concurrent_work`` each gets a task, in order, and
        they queue on the (fair) chip lock."""
        self._work_pending += 1
        if self.concurrent_work and self._nursery is not None:
            self._nursery.start_soon(self._counted, work)
            return
        self._work_send.send_nowait(work)

    async def _counted(self, work: Work) -> None:
        """Run queued work, and count it done however it ends (:meth:`may_start_inline`)."""
        try:
            await work()
        finally:
            self._work_pending -= 1

    async def _worker(self) -> None:
        """Run the queued O_NONBLOCK commands in order.  Shielded as a whole: a command once
        queued runs to its end, shutdown included (then :meth:`serve` sends None)."""
        self._worker_task = trio.lowlevel.current_task()
        with trio.CancelScope(shield=True):
            async for work in self._work_recv:
                if work is None:
                    return
                await self._counted(work)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the tasks the files need (async commands, the unread-response timer).

        Runs until cancelled; then closes every file still open, flushing its sessions.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._worker)
                watch = getattr(self.backend, "watch", None)  # a backend's own timeout task
                if watch is not None:
                    nursery.start_soon(watch)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self._work_send.send_nowait(None)  # the shielded worker ends after what is queued
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
                work = self._work_recv.receive_nowait()
            except trio.WouldBlock:
                return
            if work is not None:
                await self._counted(work)

    async def close_all(self) -> None:
        """Release every open file, as the kernel would on close (used at shutdown)."""
        for f in list(self.files):
            await f.release()

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is None:
            raise RuntimeError("TpmChip.serve() is not running")
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


class _Held:
    """:meth:`TpmChip._held`, written out: an ``asynccontextmanager`` and a cancel scope cost
    about 12 µs, on every command's path (issue 9).  The worker's commands need no scope of
    their own, as the worker runs shielded; the uncontended lock costs no checkpoint."""

    __slots__ = ("chip", "scope", "acquired")

    def __init__(self, chip: TpmChip, acquired: bool = False) -> None:
        self.chip = chip
        self.scope: trio.CancelScope | None = None
        #: The lock is already held (a command begun inline): only let it go on the way out.
        self.acquired = acquired

    async def __aenter__(self) -> None:
        chip = self.chip
        if trio.lowlevel.current_task() is not chip._worker_task:
            self.scope = trio.CancelScope(shield=True)
            self.scope.__enter__()
        if self.acquired:
            return
        try:
            chip.lock.acquire_nowait()
        except trio.WouldBlock:
            try:
                await chip.lock.acquire()
            except BaseException as exc:
                if self.scope is not None:
                    self.scope.__exit__(type(exc), exc, exc.__traceback__)
                raise

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        chip = self.chip
        try:
            chip.lock.release()
            if chip._transport_lost and not chip._recovering:
                chip._lose_tpm()
        finally:
            if self.scope is not None:
                self.scope.__exit__(kind, exc, tb)  # a shield alone never swallows an exception
        return False
