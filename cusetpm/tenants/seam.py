# SPDX-License-Identifier: GPL-2.0-only
"""The tenant's policy at the seam: every command is judged before it reaches the TPM.

:class:`TenantSeam` sits in front of another seam (the kernel's own, or the shared
``--sessions global`` one) and only adds :meth:`before_command`: the command, as the tenant
wrote it, goes through :func:`~.policy.decide`; a refused one is answered by the RM layer with
the rule's response code (nothing is sent, the file's space is untouched, exactly as if the TPM
had refused it with no side effect).  Everything else is the inner seam's.  The policy is read
at every command, so a SIGHUP reload applies to the next one.
"""

from __future__ import annotations

from typing import Callable, Iterable

from ..kernel import wire
from ..kernel.request import Io
from ..kernel.seam import KERNEL, Seam
from ..kernel.structs import Chip, Space
from ..kernel.wire import be32
from ..sessions.parse import has_rhandle, rm_answer
from .policy import CC_START_AUTH_SESSION, Policy, Refusal, Usage, decide


def _creates_object(chip: Chip, cc: int) -> bool:
    """The command returns a new handle (TPMA_CC rHandle) and it is not a session's."""
    return has_rhandle(chip, cc) and cc != CC_START_AUTH_SESSION


class TenantSeam(Seam):
    """One node's policy in front of ``inner``."""

    def __init__(self, policy: Callable[[], Policy], spaces: Callable[[], Iterable[Space]],
                 inner: Seam | None = None) -> None:  # fmt: skip
        self.policy = policy
        self.spaces = spaces
        self.inner = inner or KERNEL
        self.may_wait = self.inner.may_wait
        #: The refusal of each space's last command, until the node takes it (audit, metrics).
        self.refused: dict[int, Refusal] = {}

    def usage(self) -> Usage:
        """Objects and sessions held over all the node's files."""
        use = Usage()
        for space in self.spaces():
            use.objects += sum(1 for h in space.context_tbl if h)
            use.sessions += sum(1 for h in space.session_tbl if h)
        return use

    def before_command(self, chip: Chip, space: Space, buf: bytearray, bufsiz: int) -> Io[int]:
        policy = self.policy()
        length = min(be32(buf, 2), bufsiz) if bufsiz >= wire.TPM_HEADER_SIZE else bufsiz
        cmd = bytes(buf[:length])
        usage = self.usage() if policy.max_objects or policy.max_sessions else None
        creates = len(cmd) >= wire.TPM_HEADER_SIZE and _creates_object(chip, be32(cmd, 6))
        refusal = decide(policy, cmd, creates, usage)
        if refusal is not None:
            self.refused[id(space)] = refusal
            return rm_answer(buf, refusal.rc)
        return (yield from self.inner.before_command(chip, space, buf, bufsiz))

    def take_refusal(self, space: Space) -> Refusal | None:
        return self.refused.pop(id(space), None)

    def load(self, chip: Chip, space: Space, buf: bytearray, bufsiz: int) -> Io[int]:
        return (yield from self.inner.load(chip, space, buf, bufsiz))

    def unload(self, chip: Chip) -> Io[None]:
        yield from self.inner.unload(chip)

    def save(self, chip: Chip, space: Space, buf: bytearray, length: int) -> Io[int]:
        return (yield from self.inner.save(chip, space, buf, length))

    def after_response(self, chip: Chip, space: Space, buf: bytearray, length: int) -> Io[int]:
        return (yield from self.inner.after_response(chip, space, buf, length))

    @property
    def feature(self) -> Seam:
        return self.inner.feature

    @property
    def features(self) -> tuple[Seam, ...]:
        return self.inner.features

    def tpm_restarted(self) -> None:
        """Nothing of the policy's to forget; the chip tells the inner feature itself."""

    def release(self, chip: Chip, space: Space) -> Io[None]:
        self.refused.pop(id(space), None)
        yield from self.inner.release(chip, space)
