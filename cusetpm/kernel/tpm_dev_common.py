# SPDX-License-Identifier: GPL-2.0-only
"""The file semantics of /dev/tpmrm0: one open file, its buffer, and one command's run.

Port of drivers/char/tpm/tpm-dev-common.c (tpm_dev_transmit(), tpm_common_write(),
tpm_common_read(), tpm_common_poll(), tpm_dev_async_work(), tpm_timeout_work(),
user_reader_timeout()) and tpmrm-dev.c (tpmrm_open(), tpmrm_release()).

Sans-I/O: :class:`FileState` holds what ``struct file_priv`` holds and applies every file
rule; the adapter (:mod:`cusetpm.daemon.chip`) only moves bytes, holds the locks, keeps time
and runs the async worker, calling these methods in the order the kernel does.  Every errno
leaves here as ``OSError``.
"""

from __future__ import annotations

import errno
import os
import select
from dataclasses import dataclass, field

from . import wire
from .profiles import KernelProfile
from .request import Io
from .seam import KERNEL
from .structs import Chip, Space
from .tpm2_space import EOPNOTSUPP
from .tpm_interface import transmit
from .wire import be32

#: The unread-response timer of user_reader_timeout(): 120 * HZ.
USER_READ_TIMEOUT = 120.0

#: tpm_dev_transmit()'s answer to a command code the TPM does not implement.
#: (A response header has a command's layout, with the rc where the command code goes.)
COMMAND_CODE_RESPONSE = wire.command(wire.RC_COMMAND_CODE | wire.RC_RESMGR_TPM_LAYER)

POLL_IN = select.POLLIN | select.POLLRDNORM
POLL_OUT = select.POLLOUT | select.POLLWRNORM


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def tpm_dev_transmit(chip: Chip, space: Space, buf: bytearray, bufsiz: int = wire.TPM_BUFSIZE) -> Io[int]:
    """tpm_dev_transmit(): prepare the space, send, commit.  Returns the response length in
    ``buf`` or a negative errno.

    This is the one place a user command passes on its way to the TPM, and each of its steps
    goes through the chip's seam (the kernel's own unless a feature installed another).
    """
    seam = chip.seam or KERNEL
    ret = yield from seam.before_command(chip, space, buf, bufsiz)
    if ret:
        return ret
    ret = yield from seam.load(chip, space, buf, bufsiz)
    if ret == EOPNOTSUPP:
        # Unknown command code: no TPM traffic, the space untouched.
        buf[: wire.TPM_HEADER_SIZE] = COMMAND_CODE_RESPONSE
        ret = wire.TPM_HEADER_SIZE
    elif not ret:
        length = yield from transmit(buf, bufsiz)
        if length < 0:
            yield from seam.unload(chip)
            ret = length
        else:
            ret = yield from seam.save(chip, space, buf, length)
    return (yield from seam.after_response(chip, space, buf, ret))


def release_space(chip: Chip, space: Space) -> Io[None]:
    """tpmrm_release(): flush the file's sessions in slot order."""
    yield from (chip.seam or KERNEL).release(chip, space)


@dataclass
class FileState:
    """struct file_priv + its struct tpm_space (tpmrm_priv).

    ``response_length`` > 0: unread response bytes; < 0: a pending errno from the async path.
    """

    profile: KernelProfile
    buf: bytearray = field(default_factory=lambda: bytearray(wire.TPM_BUFSIZE))
    response_length: int = 0
    response_read: bool = True
    command_enqueued: bool = False
    pos: int = 0
    #: Absolute time at which the unread response is thrown away, or None.
    deadline: float | None = None
    space: Space = field(default_factory=Space)

    # --- write(), tpm_common_write() -------------------------------------------------------

    @staticmethod
    def check_size(size: int) -> None:
        """Step 1, before the lock: more than TPM_BUFSIZE is E2BIG."""
        if size > wire.TPM_BUFSIZE:
            raise _error(errno.E2BIG)

    def accept_write(self, data: bytes, nonblock: bool = False) -> None:
        """Steps 3-6, under the file lock: EBUSY, copy into ``buf``, EINVAL, reset; and for
        O_NONBLOCK, mark the command enqueued (the adapter then queues the async work).

        The copy happens before the length check, so a rejected write still clobbers the
        buffer a partly read response is read from (the kernel's quirk).
        """
        if (not self.response_read and self.response_length) or self.command_enqueued:
            raise _error(errno.EBUSY)
        size = len(data)
        self.buf[:size] = data
        if size < 6 or size < be32(self.buf, 2):
            raise _error(errno.EINVAL)
        self.response_length = 0
        self.response_read = False
        self.pos = 0
        if nonblock:
            self.command_enqueued = True

    @staticmethod
    def check_chip(available: bool) -> None:
        """A blocking write whose chip is gone (tpm_try_get_ops() failed) is EPIPE."""
        if not available:
            raise _error(errno.EPIPE)

    def command_finished(self, result: int, size: int, now: float) -> int:
        """After a synchronous command: keep the response and return what write() returns
        (the size written, not the response length), or raise the command's errno."""
        if result > 0:
            self.response_length = result
            self.deadline = now + USER_READ_TIMEOUT
            return size
        if result < 0:
            raise _error(-result)
        return 0

    def async_finished(self, result: int, now: float) -> None:
        """tpm_dev_async_work(): store a response or an errno for read() to report."""
        self.command_enqueued = False
        if result:
            self.response_length = result
            self.deadline = now + USER_READ_TIMEOUT

    def async_chip_gone(self) -> None:
        """tpm_dev_async_work() when the chip cannot be had: read() will say EIO, no timer."""
        self.command_enqueued = False
        self.response_length = -errno.EIO

    # --- read(), tpm_common_read() ---------------------------------------------------------

    def read_needs_lock(self, size: int) -> bool:
        """D6: 6.12 answers a zero-length read with 0 before taking the file lock; 6.1 takes it
        and processes the read (which discards a pending response)."""
        return size != 0 or not self.profile.read_zero_returns_early

    def read(self, size: int) -> bytes:
        """Under the file lock.  Returns the next bytes of the response, b'' if none."""
        out = b""
        err = 0
        if self.response_length:
            self.response_read = True
            n = min(size, self.response_length)
            if n <= 0:
                self.response_length = 0
                err = -n
            else:
                out = bytes(self.buf[self.pos : self.pos + n])
                self.buf[self.pos : self.pos + n] = bytes(n)
                self.response_length -= n
                self.pos += n
        if self.response_length == 0:
            self.pos = 0
            self.deadline = None
        if err:
            raise _error(err)
        return out

    def poll_mask(self) -> int:
        """tpm_common_poll()."""
        return POLL_IN if self.response_length else POLL_OUT

    def timeout(self) -> None:
        """tpm_timeout_work(): the unread response is discarded."""
        self.response_read = True
        self.response_length = 0
        self.deadline = None
        self.buf[:] = bytes(wire.TPM_BUFSIZE)
