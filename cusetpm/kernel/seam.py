# SPDX-License-Identifier: GPL-2.0-only
"""The one seam where an opt-in feature meets the port.

tpm_dev_transmit() (drivers/char/tpm/tpm-dev-common.c) runs every user command as
"prepare the space, send, commit"; tpmrm_release() flushes a closing file's space.  A
:class:`Seam` is each of those steps, and this class is the kernel's own: every method does
what Linux does and nothing else, so the default is byte-identical to the real kernels.  A
feature (global session accounting, tenant policy, lazy swapping) subclasses it, overrides
what it needs and is installed with ``Chip.seam``; the rest of the port does not change.

Every method is a sans-I/O generator (see :mod:`cusetpm.kernel.request`), so a feature may
send its own commands to the TPM, sleep, or give up the chip and :class:`~.request.Wait`.
"""

from __future__ import annotations

from .request import Io
from .structs import Chip, Space
from .tpm2_space import commit_space, del_space, flush_space, prepare_space


class Seam:
    """The kernel's behaviour at each step of a command.  Subclass to change a step."""

    #: The seam may give up the chip mid-command (:class:`~.request.Wait`).  The driver must
    #: then run O_NONBLOCK commands side by side, as the kernel's tpm_dev_wq may, or one that
    #: waits would hold up the very command that ends its wait.  The kernel never waits.
    may_wait = False

    @property
    def feature(self) -> Seam:
        """The seam that holds state about the TPM: itself, unless it is a filter in front of
        another (a tenant's policy in front of the shared session registry).  Status, metrics
        and restarts go to each feature once, however many nodes share it."""
        return self

    @property
    def features(self) -> tuple[Seam, ...]:
        """Every feature behind this seam: :attr:`feature`, and one it runs on (global session
        accounting on lazy swapping).  Each is told of restarts and reports its status."""
        return (self.feature,)

    def before_command(self, chip: Chip, space: Space, buf: bytearray, bufsiz: int) -> Io[int]:
        """See the command as user space wrote it, virtual handles and all, before anything
        reaches the TPM.  0 goes on; a positive value is the length of a response the seam
        wrote into ``buf`` itself (an RM-layer answer, nothing sent); a negative value is the
        errno write() fails with.  The kernel: always 0."""
        return 0
        yield  # a generator, like every step

    def load(self, chip: Chip, space: Space, buf: bytearray, bufsiz: int) -> Io[int]:
        """Validate the command, load the file's contexts and map its handles:
        tpm2_prepare_space().  0, ``EOPNOTSUPP`` (unknown command) or a negative errno."""
        return (yield from prepare_space(chip, space, buf, bufsiz))

    def unload(self, chip: Chip) -> Io[None]:
        """The TPM could not be reached: forget what the work space loaded (tpm2_flush_space())."""
        yield from flush_space(chip)

    def save(self, chip: Chip, space: Space, buf: bytearray, length: int) -> Io[int]:
        """Map the response, save the work space back to the file's space:
        tpm2_commit_space().  The response length, or a negative errno."""
        return (yield from commit_space(chip, space, buf, length))

    def after_response(self, chip: Chip, space: Space, buf: bytearray, length: int) -> Io[int]:
        """See the result (a response length in ``buf``, or a negative errno) before user space
        does, and return what it gets.  The kernel: unchanged."""
        return length
        yield

    def tpm_restarted(self) -> None:
        """The daemon found the TPM behind the chip restarted (cusetpm.daemon.recovery): every
        handle a feature knows of is gone.  The kernel has no such event (its chip would be a
        new device with new files), so the kernel's seam does nothing."""

    def loaded_flushed(self) -> None:
        """The daemon flushed everything loaded in the TPM (objects and loaded sessions) after
        a command whose answer was lost (cusetpm.daemon.chip): what a feature kept loaded
        between commands is gone.  The kernel keeps nothing loaded between commands, so its
        seam does nothing."""

    def release(self, chip: Chip, space: Space) -> Io[None]:
        """The file is closing: tpmrm_release() -> tpm2_del_space() flushes its sessions."""
        yield from del_space(space)


#: The kernel's seam, shared by every chip that installs none.
KERNEL = Seam()
