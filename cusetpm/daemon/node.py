# SPDX-License-Identifier: GPL-2.0-only
"""One device node on a shared chip (the node half of the trio adapter).

A :class:`Node` is one /dev/tpmrm0 as user space sees it: a name, the kernel profile it
reproduces, its open files (:mod:`.file`), and (through its core chip's seam) any opt-in
feature.  Several nodes may share one :class:`~.chip.TpmChip`.  The front ends call
``Node.open`` and the five ``DeviceFile`` methods, nothing else.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter
from typing import TYPE_CHECKING

import trio

from ..kernel.profiles import KernelProfile
from ..kernel.seam import Seam
from ..tenants.policy import OPEN, Policy
from ..tenants.rate import TokenBucket
from ..tenants.seam import TenantSeam
from .chip import TpmChip
from .file import DeviceFile, Opener
from .recorder import Recorder

if TYPE_CHECKING:
    from ..tenants.audit import AuditLog, PcapngWriter
    from .metrics import Metrics

log = logging.getLogger(__name__)


class Node:
    """One node (/dev/NAME or a FUSE file) on a chip, reproducing one kernel profile."""

    def __init__(
        self, chip: TpmChip, profile: KernelProfile, name: str = "tpmrm0", seam: Seam | None = None,
        policy: Policy | None = None,
    ) -> None:  # fmt: skip
        self.chip = chip
        self.profile = profile
        self.name = name
        #: The core's view of the chip for this node: its profile, command table and seam.
        self.core = chip.core(profile)
        self.files: set[DeviceFile] = set()
        #: A tenant node (``--config``) judges every command at its seam, even with an open
        #: policy, so that a reload may tighten it; a node of the command line has no policy
        #: layer at all and is the kernel's, byte for byte.
        self.policy = policy or OPEN
        self.tenant: TenantSeam | None = None
        self.bucket: TokenBucket | None = None
        if policy is not None:
            self.tenant = TenantSeam(lambda: self.policy, lambda: (f.state.space for f in self.files), seam)
            seam = self.tenant
            # A rate-limited file's async command waits in its own task, not in the one
            # worker every node's O_NONBLOCK commands share (the kernel's tpm_dev_wq is
            # concurrent as well).
            chip.concurrent_work = True
            self.set_policy(policy)
        self.core.seam = seam
        if seam is not None and seam.may_wait:
            chip.concurrent_work = True
        #: False once a reload removed the node: no new opens; it goes when its last file closes.
        self.accepting = True
        #: Refusals by rule (``max_open`` included), for status and metrics.
        self.refusals: Counter[str] = Counter()
        #: ``cusetpm record``: every call on every file, as a scenario (None: not recording).
        self.recorder: Recorder | None = None
        #: ``--metrics``: the counters each finished command updates (None: no metrics).
        self.metrics: Metrics | None = None
        #: The audit trail and the capture of a tenant node (None: none).
        self.audit: AuditLog | None = None
        self.pcap: PcapngWriter | None = None
        self._streams = 0
        #: Set when the last file of a removed node closes (see cusetpm.serve).
        self.emptied = trio.Event()

    def set_policy(self, policy: Policy) -> None:
        """A new policy (a reload): the next command of every file is judged by it."""
        rate = policy.commands_per_second
        if not rate:
            self.bucket = None
        elif self.bucket is None or self.bucket.rate != rate:
            self.bucket = TokenBucket(rate)
        self.policy = policy

    def open(self, flags: int = os.O_RDWR, opener: Opener = Opener()) -> DeviceFile:
        """tpmrm_open(): a new file with an empty space.  Nothing reaches the TPM.  A tenant
        node at its ``max_open`` refuses with EMFILE."""
        if not self.accepting:
            raise OSError(errno.ENOENT, f"{self.name}: the node was removed")
        if self.policy.max_open and len(self.files) >= self.policy.max_open:
            self.refusals["max_open"] += 1
            if self.metrics is not None:
                self.metrics.refused(self.name, "max_open")
            raise OSError(errno.EMFILE, f"{self.name}: max_open ({self.policy.max_open}) files are open")
        f = DeviceFile(self, opener)
        self.files.add(f)
        self.chip.files.add(f)
        if self.recorder is not None:
            self.recorder.opened(f, flags)
        return f

    @property
    def audited(self) -> bool:
        return self.audit is not None or self.pcap is not None

    @property
    def observed(self) -> bool:
        """Something watches each command (metrics, a tenant's seam, the audit trail): it is
        timed and counted around, and told when it ends (:meth:`command_done`)."""
        return self.metrics is not None or self.tenant is not None or self.audited

    def turn_now(self) -> bool:
        """``commands_per_second``: may this command go now, with no wait (its token taken)?
        False, having taken nothing: it must wait its turn (:meth:`throttle`)."""
        return self.bucket is None or self.bucket.take_now(trio.current_time())

    async def throttle(self) -> None:
        """``commands_per_second``: wait for this command's turn (shielded, like the TPM
        taking its time: the command is already the file's)."""
        if self.bucket is not None:
            wait = self.bucket.delay(trio.current_time())
            if wait > 0:
                if self.metrics is not None:
                    self.metrics.throttled(self.name, wait)
                with trio.CancelScope(shield=True):
                    await trio.sleep(wait)

    def command_done(self, f: DeviceFile, command: bytes, result: int, seconds: float, wall: float,
                     backend: int) -> None:  # fmt: skip
        """One command finished (``result``: the response length, or a negative errno):
        metrics, the refusal it may have been, the audit trail."""
        refusal = self.tenant.take_refusal(f.state.space) if self.tenant is not None else None
        if refusal is not None:
            self.refusals[refusal.rule] += 1
        if self.metrics is not None:
            self.metrics.observe(self.name, command, result, f.state.buf, seconds)
            if refusal is not None:
                self.metrics.refused(self.name, refusal.rule)
            self.metrics.backend(self.name, backend)
        if self.audited:
            from ..tenants.audit import Entry

            entry = Entry(
                time=wall, node=self.name, uid=f.opener.uid, gid=f.opener.gid, pid=f.opener.pid, comm=f.comm,
                command=command, response=bytes(f.state.buf[:result]) if result > 0 else b"",
                errno=errno.errorcode.get(-result, str(-result)) if result < 0 else None,
                decision="allowed" if refusal is None else f"refused:{refusal.rule}",
                duration=seconds, backend_commands=backend, stream=f.stream,
            )  # fmt: skip
            try:
                if self.audit is not None:
                    self.audit.write(entry)
                if self.pcap is not None:
                    self.pcap.write(entry)
            except Exception:  # the audit trail must never fail a command
                log.exception("%s: audit", self.name)

    def tenant_status(self) -> dict[str, object]:
        """What ``cusetpm status`` shows of a tenant node: its quotas and their use, refusals."""
        if self.tenant is None:
            return {}
        p, use = self.policy, self.tenant.usage()
        return {
            "quota": {
                "open": [len(self.files), p.max_open],
                "objects": [use.objects, p.max_objects],
                "sessions": [use.sessions, p.max_sessions],
                "commands_per_second": p.commands_per_second,
                "max_command_bytes": p.max_command_bytes,
            },
            "refusals": dict(self.refusals),
            "accepting": self.accepting,
        }

    def next_stream(self) -> int:
        self._streams += 1
        return self._streams

    async def close_all(self) -> None:
        """Release every file of this node still open (the node is going away)."""
        for f in list(self.files):
            await f.release()
