# SPDX-License-Identifier: GPL-2.0-only
"""The file semantics of /dev/tpmrm0: one open file, its buffer, and one command's run.

Port of drivers/char/tpm/tpm-dev-common.c (tpm_dev_transmit(), tpm_common_write(),
tpm_common_read(), tpm_common_poll(), tpm_dev_async_work(), tpm_timeout_work(),
user_reader_timeout()) and tpmrm-dev.c (tpmrm_open(), tpmrm_release()).

Sans-I/O: :class:`FileState` holds what ``struct file_priv`` holds and applies the rules; the
adapter (:mod:`cusetpm.device`) owns the locks, the timer and the async worker and calls these
methods in the order the kernel does.  Every errno leaves here as ``OSError``.
"""
from __future__ import annotations

import errno
import os
import select
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import tpm
from .profiles import KernelProfile
from .tpm import Io, be32
from .tpm2_space import EOPNOTSUPP, Space, commit_space, del_space, flush_space, prepare_space
from .tpm_interface import transmit

if TYPE_CHECKING:
    from .tpm_chip import Chip

#: The unread-response timer of user_reader_timeout(): 120 * HZ.
USER_READ_TIMEOUT = 120.0

#: tpm_dev_transmit()'s answer to a command code the TPM does not implement.
#: (A response header has a command's layout, with the rc where the command code goes.)
COMMAND_CODE_RESPONSE = tpm.command(tpm.RC_COMMAND_CODE | tpm.RC_RESMGR_TPM_LAYER)

POLL_IN = select.POLLIN | select.POLLRDNORM
POLL_OUT = select.POLLOUT | select.POLLWRNORM


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def tpm_dev_transmit(chip: "Chip", space: Space, buf: bytearray, bufsiz: int = tpm.TPM_BUFSIZE) -> Io[int]:
    """tpm_dev_transmit(): prepare the space, send, commit.  Returns the response length in
    ``buf`` or a negative errno.

    This is the one place a user command passes on its way to the TPM.
    """
    ret = yield from prepare_space(chip, space, buf, bufsiz)
    if ret == EOPNOTSUPP:
        # Unknown command code: no TPM traffic, the space untouched.
        buf[: tpm.TPM_HEADER_SIZE] = COMMAND_CODE_RESPONSE
        return tpm.TPM_HEADER_SIZE
    if ret:
        return ret
    length = yield from transmit(buf, bufsiz)
    if length < 0:
        yield from flush_space(chip)
        return length
    return (yield from commit_space(chip, space, buf, length))


def release_space(space: Space) -> Io[None]:
    """tpmrm_release(): flush the file's sessions in slot order."""
    yield from del_space(space)


@dataclass
class FileState:
    """struct file_priv + its struct tpm_space (tpmrm_priv).

    ``response_length`` > 0: unread response bytes; < 0: a pending errno from the async path.
    """

    profile: KernelProfile
    buf: bytearray = field(default_factory=lambda: bytearray(tpm.TPM_BUFSIZE))
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
        if size > tpm.TPM_BUFSIZE:
            raise _error(errno.E2BIG)

    def accept_write(self, data: bytes) -> None:
        """Steps 3-6, under the file lock: EBUSY, copy into ``buf``, EINVAL, reset.

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

    def async_ops_failed(self, err: int) -> None:
        """tpm_dev_async_work() when the chip cannot be had: an errno, no timer."""
        self.command_enqueued = False
        self.response_length = -err

    # --- read(), tpm_common_read() ---------------------------------------------------------

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
        self.buf[:] = bytes(tpm.TPM_BUFSIZE)
