# SPDX-License-Identifier: GPL-2.0-only
"""A TPM character device (``device:/dev/tpm0``, or any file that behaves like one), on trio.

The kernel's /dev/tpm0 (tpm-dev-common.c) runs a command two ways.  Written to a file opened
O_NONBLOCK, its work queue runs it and the file becomes readable when the response is there:
one write, a wait, one read, and no worker thread, unlike tpm2-tss's device TCTI behind
:class:`~.tcti.TctiBackend` (about 0.3 ms a command more).  Written without O_NONBLOCK, the
write itself runs the command (tpm_common_write calls tpm_dev_transmit), and the read that
follows finds the response.

The wait must not touch the file while the work runs: tpm_common_poll and tpm_common_read take
the file's buffer_mutex, which the work holds for the whole command, so a read, a poll, or an
``epoll_ctl`` that registers the file (what trio's ``wait_readable`` does on every wait) would
stop the event loop until the TPM answered.  So a kernel TPM device (a ``tpm`` or ``tpmrm``
class device) sits in an epoll of its own, registered once at open (edge-triggered), and trio
waits on that epoll: its readiness says the work woke the file's waiters, which it does after
letting go of the mutex.

The blocking way is the fast one (no work-queue hop, no epoll): on a kernel TPM device, whose
commands the kernel times out itself, a command :meth:`DeviceBackend.send_now` sends for a
client alone on the chip (``serve --spin-us`` not 0) is written that way, and the loop waits
in the write: no other command needs it meanwhile.  But an open, a close or a poll of another
file, or the control socket, would wait as long, so only a command known to be quick is
written that way: one whose answer took at most :data:`BLOCKING_CAP` last time, and never one
that may make a key (an RSA key can take a hardware TPM seconds).  Any other command goes the
O_NONBLOCK way and waits in trio on its epoll; its answer's time is learned too.

Any other file (a FUSE or CUSE node, a stand-in) is written O_NONBLOCK and waited for with
trio's ``wait_readable``, as ever: such a file may never answer, or never wake its pollers (a
CUSE device without poll).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import time

import trio
from tpm2_pytss.constants import TPM2_CC

from ..kernel import wire
from .base import BackendError
from .spin import SpinWait

log = logging.getLogger(__name__)

#: errnos that mean the device went away (the daemon then reconnects): the chip was
#: unregistered (EPIPE from tpm_common_write), or the file is dead.
_GONE = {errno.EPIPE, errno.ENODEV, errno.ENXIO, errno.EBADF, errno.ENOTCONN}
#: The longest a command's answer may have taken last time for the next one to be written
#: blocking (the loop waits that long in the write).  A TCG guest's GetRandom takes 1-3 ms.
BLOCKING_CAP = 10e-3
#: Commands that may make a key, which a hardware TPM may take seconds for (RSA): never
#: written blocking, however quick the last one was (an ECC key, say).
KEYGEN = frozenset(int(cc) for cc in (TPM2_CC.CreatePrimary, TPM2_CC.Create, TPM2_CC.CreateLoaded))


class DeviceBackend:
    """One open file of a TPM device, one command at a time (the chip lock above)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.commands_sent = 0
        self._fd: int | None = None
        #: A kernel TPM device's epoll, registered once (see the module's docstring); None for
        #: any other file.  Only a kernel TPM is ever written blocking.
        self._ep: select.epoll | None = None
        #: The file is O_NONBLOCK now (the flag is changed only when the way changes).
        self._nonblocking = True
        #: The deadline of the exchange :meth:`send_now` began, from its start.
        self._timeout = 0.0
        #: Whether the loop may wait for a kernel TPM's answer in a blocking write: a client
        #: alone, ``serve --spin-us`` not 0 (.spin); and how long each command code's answer
        #: took last time (``SpinWait.took``).  None: it never does.
        self.spin_wait: SpinWait | None = None
        #: The command code the O_NONBLOCK write sent, and when (its answer's time is learned).
        self._sent = (0, 0.0)

    def open(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(f"cannot open TPM device {self.path}: {exc.strerror}") from None
        self._adopt(fd, is_kernel_tpm(fd))

    def _adopt(self, fd: int, kernel_tpm: bool) -> None:
        """Take ``fd`` (open O_NONBLOCK) as the device file; a kernel TPM's gets its epoll."""
        self._fd, self._nonblocking = fd, True
        if kernel_tpm:
            self._ep = select.epoll()
            self._ep.register(fd, select.EPOLLIN | select.EPOLLET)

    async def transmit(self, data: bytes, timeout: float) -> bytes | int:
        if self._fd is None:
            try:
                self.open()
            except BackendError as exc:
                self.commands_sent += 1
                log.warning("%s", exc)
                return -errno.EPIPE
        sent = self.send_now(data, timeout)
        return sent if sent is not None else await self.answer()

    def ready_now(self) -> bool:
        """May :meth:`send_now` be used?  The device is open."""
        return self._fd is not None

    def send_now(self, data: bytes, timeout: float) -> bytes | int | None:
        """Send the command without awaiting (``ready_now``): the response if it is here
        already (a kernel TPM written to blocking for a client alone), the errno the
        exchange failed with, or None: then :meth:`answer` awaits the response.  Every other
        command is written O_NONBLOCK and never read at once."""
        self.commands_sent += 1
        fd, ep = self._fd, self._ep
        assert fd is not None
        self._timeout = timeout
        spin = self.spin_wait
        cc = int.from_bytes(data[6:10])
        try:
            if ep is not None and spin is not None and self._quick(spin, cc) and spin.may_wait():
                self._set_nonblocking(fd, False)
                start = time.perf_counter()
                os.write(fd, data)  # tpm_common_write runs the command
                rsp = os.read(fd, wire.TPM_BUFSIZE) or -errno.EIO
                spin.answered(cc, time.perf_counter() - start)
                return rsp
            self._set_nonblocking(fd, True)
            self._sent = (cc, time.perf_counter())
            os.write(fd, data)
        except OSError as exc:
            return self._failed(exc)
        return None

    @staticmethod
    def _quick(spin: SpinWait, cc: int) -> bool:
        """May a command with code ``cc`` be written blocking?  Its answer took at most
        :data:`BLOCKING_CAP` last time, and it makes no key (see the module's docstring)."""
        took = spin.took.get(cc)
        return took is not None and took <= BLOCKING_CAP and cc not in KEYGEN

    def _set_nonblocking(self, fd: int, on: bool) -> None:
        if self._nonblocking != on:
            os.set_blocking(fd, not on)
            self._nonblocking = on

    @staticmethod
    def _read_woken(fd: int, ep: select.epoll) -> bytes | None:
        """A kernel TPM's response, once its epoll said the file's waiters were woken; None
        if it is not there after all."""
        ep.poll(0)  # takes the edge, so the next command's wait waits
        try:
            return os.read(fd, wire.TPM_BUFSIZE) or None
        except BlockingIOError:
            return None

    async def answer(self) -> bytes | int:
        """The response to what :meth:`send_now` wrote O_NONBLOCK, once the file is readable:
        a kernel TPM's as its own epoll says, any other's as trio's does."""
        fd, ep = self._fd, self._ep
        if fd is None:
            return -errno.EPIPE
        try:
            with trio.fail_after(self._timeout):
                while True:
                    if ep is not None:
                        await trio.lowlevel.wait_readable(ep.fileno())
                        rsp = self._read_woken(fd, ep)
                        if rsp is not None:
                            self._learn()
                            return rsp
                        continue
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        return os.read(fd, wire.TPM_BUFSIZE)
                    except BlockingIOError:
                        continue
        except trio.TooSlowError:
            self._close()  # the late answer must not be read as the next command's
            return -errno.ETIME
        except OSError as exc:
            return self._failed(exc)

    def _learn(self) -> None:
        """A kernel TPM answered the O_NONBLOCK way: how long it took (the wake-up included)."""
        if self.spin_wait is not None:
            cc, sent_at = self._sent
            self.spin_wait.answered(cc, time.perf_counter() - sent_at)

    def _failed(self, exc: OSError) -> int:
        log.warning("TPM device %s: %s", self.path, exc.strerror)
        if exc.errno in _GONE:
            self._close()
            return -errno.EPIPE
        return -(exc.errno or errno.EIO)

    def _close(self) -> None:
        if self._ep is not None:
            trio.lowlevel.notify_closing(self._ep.fileno())
            self._ep.close()
            self._ep = None
        elif self._fd is not None:
            trio.lowlevel.notify_closing(self._fd)
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:  # a FUSE "device" whose daemon is gone: ENOTCONN
                pass
            self._fd = None

    async def reconnect(self) -> None:
        self._close()
        self.open()

    async def aclose(self) -> None:
        self._close()


def device_path(conf: str) -> str | None:
    """The path of a ``device:`` TCTI configuration (tpm2-tss's default: /dev/tpm0), else None."""
    name, _, rest = conf.partition(":")
    if name != "device":
        return None
    return rest or "/dev/tpm0"


def is_kernel_tpm(fd: int, sysfs: str = "/sys") -> bool:
    """Is ``fd`` a TPM character device of the kernel (class ``tpm`` or ``tpmrm``)?  Those
    run a blocking write's command in the write, and time it out themselves; a CUSE node or
    a FUSE file may never answer, so those are only ever written O_NONBLOCK."""
    st = os.fstat(fd)
    if not stat.S_ISCHR(st.st_mode):
        return False
    dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    subsystem = os.path.realpath(os.path.join(sysfs, "dev", "char", dev, "subsystem"))
    return os.path.basename(subsystem) in ("tpm", "tpmrm")
