# SPDX-License-Identifier: GPL-2.0-only
"""A TPM character device (``device:/dev/tpm0``, or any file that behaves like one), on trio.

The kernel's /dev/tpm0 (tpm-dev.c) runs a command written to a file opened O_NONBLOCK in its
work queue and makes the file readable when the response is there, so one write, a wait for
readability and one read are the whole exchange: no worker thread, unlike tpm2-tss's device
TCTI behind :class:`~.tcti.TctiBackend` (which costs about 0.3 ms a command more).  The
write needs no await, so the chip may begin a command from the request loop with it
(:meth:`DeviceBackend.send_now`, TpmChip.start_inline); the rest waits in the worker.
"""

from __future__ import annotations

import errno
import logging
import os

import trio

from ..kernel import wire
from .base import BackendError

log = logging.getLogger(__name__)

#: errnos that mean the device went away (the daemon then reconnects): the chip was
#: unregistered (EPIPE from tpm_common_write), or the file is dead.
_GONE = {errno.EPIPE, errno.ENODEV, errno.ENXIO, errno.EBADF, errno.ENOTCONN}


class DeviceBackend:
    """One open file of a TPM device, one command at a time (the chip lock above)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.commands_sent = 0
        self._fd: int | None = None
        #: The deadline of the exchange :meth:`send_now` began, from its start.
        self._timeout = 0.0

    def open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(f"cannot open TPM device {self.path}: {exc.strerror}") from None

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

    def send_now(self, data: bytes, timeout: float) -> int | None:
        """Write the command without awaiting (``ready_now``): None, and :meth:`answer`
        awaits the response; or the errno the write failed with.  Never reads at once: a
        read() while the kernel's async work runs the command sleeps on the file's mutex."""
        self.commands_sent += 1
        fd = self._fd
        assert fd is not None
        self._timeout = timeout
        try:
            os.write(fd, data)
        except OSError as exc:
            return self._failed(exc)
        return None

    async def answer(self) -> bytes | int:
        """The response to what :meth:`send_now` wrote, once the file is readable."""
        fd = self._fd
        if fd is None:
            return -errno.EPIPE
        try:
            with trio.fail_after(self._timeout):
                while True:
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

    def _failed(self, exc: OSError) -> int:
        log.warning("TPM device %s: %s", self.path, exc.strerror)
        if exc.errno in _GONE:
            self._close()
            return -errno.EPIPE
        return -(exc.errno or errno.EIO)

    def _close(self) -> None:
        if self._fd is not None:
            trio.lowlevel.notify_closing(self._fd)
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
