# SPDX-License-Identifier: GPL-2.0-only
"""The nodes a config describes, on one chip, and what a reload (SIGHUP) changes of them.

:class:`Tenants` owns the daemon's nodes: it makes each one (its kernel profile, its seam, its
policy, its audit trail), puts it in front of user space (one CUSE device each, or one file
each in one FUSE directory) and, on :meth:`reload`, adds the new ones, retires the removed ones
(no new opens; gone when their last file closes) and gives changed policies to the next
command.  A node of the plain command line is the one-tenant case of the same code, with no
policy layer.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio

from .backends.device import DeviceBackend
from .backends.socket import SocketBackend
from .daemon.chip import TpmChip
from .daemon.node import Node
from .kernel.profiles import get_profile
from .kernel.seam import Seam
from .tenants.config import ConfigError, DaemonConfig, NodeConfig, load

if TYPE_CHECKING:
    from .backends.spin import SpinWait
    from .daemon.metrics import Metrics
    from .frontends.fuse import TpmFuse
    from .frontends.fuse_pyfuse3 import TpmFuse as PyTpmFuse
    from .swap import LazySwap

log = logging.getLogger(__name__)


class Tenants:
    """Every node of the daemon; ``nodes`` is the live list status and metrics read."""

    def __init__(
        self, chip: TpmChip, config: DaemonConfig, kind: str, *, major: int = 0, minor: int = 0,
        overrides: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.chip = chip
        #: Settings the command line gave over the file's; every reload keeps them.
        self.overrides = overrides or {}
        self.config = config
        self.kind = kind
        self.major, self.minor = major, minor
        self.nodes: list[Node] = []
        self.metrics: Metrics | None = None
        #: The CUSE device of each node (cancelled: the device goes).
        self._scopes: dict[Node, trio.CancelScope] = {}
        self._fuse: TpmFuse | PyTpmFuse | None = None
        self._sessions: Seam | None = None
        self._swap: LazySwap | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def tenant_mode(self) -> bool:
        """Nodes of a config file judge every command (their policy may change on reload)."""
        return self.config.path is not None

    @property
    def sessions_seam(self) -> Seam | None:
        """The one GlobalSessions every ``sessions = "global"`` node shares (one registry for
        the one TPM), made when the first such node is."""
        return self._sessions

    @property
    def pause_spin(self) -> Callable[[], bool] | None:
        """With ``cpu`` the managed swtpm shares the request loop's CPU: the loop stops spinning
        while the chip is busy (a command at the TPM), whose CPU time the spin would take."""
        return self.chip.busy if self.config.cpu is not None else None

    def _spin_wait(self) -> SpinWait | None:
        """The backend's spin for the TPM's answer (:mod:`.backends.spin`), one for the
        daemon, which every channel of ours stops; ``spin_us`` long.  A socket or device
        backend has one; None for a TCTI, and with ``spin_us`` 0."""
        backend = getattr(self.chip, "backend", None)
        if not isinstance(backend, (SocketBackend, DeviceBackend)) or self.config.spin_us <= 0:
            return None
        if backend.spin_wait is None:
            from .backends.spin import SpinWait

            backend.spin_wait = SpinWait(self.config.spin_us / 1e6, alone=self.chip.alone)
        return backend.spin_wait

    def path(self, name: str) -> str:
        if self.kind == "cuse":
            return os.path.join("/dev", name)
        return os.path.join(os.path.abspath(self.fuse_dir), name)

    @property
    def fuse_dir(self) -> str:
        from .cli import default_fuse_dir

        return self.config.fuse_dir or default_fuse_dir()

    def seam_for(self, nc: NodeConfig) -> Seam | None:
        if self.config.swap == "lazy":
            if self._swap is None:
                from .swap import LazySwap

                self._swap = LazySwap(self.config.swap_residents)
            if nc.sessions != "global":
                return self._swap  # one for the chip: the TPM's slots are the chip's
        if nc.sessions != "global":
            return None
        if self._sessions is None:
            from .sessions import GlobalSessions

            self._sessions = GlobalSessions(self.config.sessions, swap=self._swap)
        return self._sessions

    def _make(self, nc: NodeConfig) -> Node:
        node = Node(self.chip, get_profile(nc.kernel), nc.name, self.seam_for(nc),
                    policy=nc.policy if self.tenant_mode else None)  # fmt: skip
        self._open_audit(node, nc)
        node.metrics = self.metrics
        return node

    def _open_audit(self, node: Node, nc: NodeConfig) -> None:
        if nc.audit is None and nc.audit_pcapng is None:
            return
        from .tenants.audit import AuditLog, PcapngWriter

        if nc.audit is not None:
            node.audit = AuditLog(nc.audit)
        if nc.audit_pcapng is not None:
            node.pcap = PcapngWriter(nc.audit_pcapng, redact=nc.audit_redact)

    @staticmethod
    def _close_audit(node: Node) -> None:
        for sink in (node.audit, node.pcap):
            if sink is not None:
                sink.close()
        node.audit = node.pcap = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Make every node and serve it; returns once each can be opened."""
        self._nursery = nursery
        if self.kind == "fuse":
            if self.config.fuse_lib == "pyfuse3":
                from .frontends import fuse_pyfuse3

                self._fuse = fuse_pyfuse3.TpmFuse()
                serve: Any = fuse_pyfuse3.serve_fuse
            else:
                from .frontends import fuse

                self._fuse = fuse.TpmFuse()
                serve = functools.partial(fuse.serve_fuse, spin=self.config.spin_us / 1e6, pause_spin=self.pause_spin,
                                          watch=self._spin_wait())  # fmt: skip
        for nc in self.config.nodes:
            await self._add(nc)
        if self._fuse is not None:
            await nursery.start(functools.partial(serve, self._fuse, self.fuse_dir))

    async def _add(self, nc: NodeConfig) -> None:
        """One node, in front of user space: a file of the FUSE directory (live once the
        directory is mounted), or its own CUSE device."""
        node = self._make(nc)
        assert self._nursery is not None
        if self._fuse is not None:
            self._fuse.add(node, nc.name, nc.mode, nc.owner, nc.group)
        else:
            from .frontends.cuse import serve_cuse

            scope = trio.CancelScope()

            async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with scope:
                    await serve_cuse(node, nc.name, major=self.major, minor=self.minor, mode=nc.mode,
                                     owner=nc.owner, group=nc.group, spin=self.config.spin_us / 1e6,
                                     pause_spin=self.pause_spin, watch=self._spin_wait(),
                                     task_status=task_status)  # fmt: skip

            await self._nursery.start(run)
            self._scopes[node] = scope
        self.nodes.append(node)

    async def _retire(self, node: Node) -> None:
        """No new opens of a removed node; once its last file closes it is gone."""
        node.accepting = False
        if self._fuse is not None:
            self._fuse.hide(node.name)
        if node.files:
            node.emptied = trio.Event()
            await node.emptied.wait()
        if self._fuse is not None:
            self._fuse.forget_node(node)
        scope = self._scopes.pop(node, None)
        if scope is not None:
            scope.cancel()
        self._close_audit(node)
        if node in self.nodes:
            self.nodes.remove(node)
        log.warning("node %s removed", node.name)

    def check(self, new: DaemonConfig) -> None:
        """What a reload cannot change without a restart; ConfigError says which."""
        for attr in (
            "tcti",
            "state_dir",
            "front",
            "fuse_dir",
            "fuse_lib",
            "spin_us",
            "cpu",
            "metrics",
            "control",
            "sessions",
            "swap",
            "swap_residents",
        ):
            if getattr(new, attr) != getattr(self.config, attr):
                raise ConfigError(f"{new.path}: {attr} cannot change on reload (restart the daemon)")
        current = {nc.name: nc for nc in self.config.nodes}
        closing = {n.name for n in self.nodes if not n.accepting}
        for nc in new.nodes:
            old = current.get(nc.name)
            if old is not None and (old.kernel, old.sessions) != (nc.kernel, nc.sessions):
                raise ConfigError(f"{new.path}: node {nc.name}: kernel and sessions cannot change on reload")
            if old is None and nc.name in closing:
                raise ConfigError(f"{new.path}: node {nc.name} was removed and still has open files")

    async def reload(self) -> bool:
        """SIGHUP: reread the config.  If it does not parse (or asks what only a restart can
        do), one line says why and nothing changes.  True if it was applied."""
        assert self.config.path is not None and self._nursery is not None
        try:
            new = replace(load(self.config.path), **self.overrides)
            self.check(new)
        except ConfigError as exc:
            log.error("reload refused, nothing changed: %s", exc)
            print(f"cusetpm: reload refused, nothing changed: {exc}", flush=True)
            return False
        current = {nc.name: nc for nc in self.config.nodes}
        live = {n.name: n for n in self.nodes if n.accepting}
        wanted = {nc.name: nc for nc in new.nodes}
        for name, gone in live.items():
            if name not in wanted:
                self._nursery.start_soon(self._retire, gone)
        for name, nc in wanted.items():
            node = live.get(name)
            if node is None:
                try:
                    await self._add(nc)
                except OSError as exc:  # a CUSE name another process took meanwhile, say
                    log.error("node %s not added: %s", name, exc)
                continue
            old = current[name]
            node.set_policy(nc.policy)
            if (old.audit, old.audit_pcapng, old.audit_redact) != (nc.audit, nc.audit_pcapng, nc.audit_redact):
                self._close_audit(node)
                self._open_audit(node, nc)
            elif node.audit is not None:
                node.audit.reopen()  # log rotation: SIGHUP reopens the same path
            if (old.mode, old.owner, old.group) != (nc.mode, nc.owner, nc.group):
                self._set_attrs(nc)
        self.config = new
        print(f"cusetpm: reloaded {new.path}: {len(wanted)} nodes", flush=True)
        return True

    def _set_attrs(self, nc: NodeConfig) -> None:
        if self._fuse is not None:
            self._fuse.set_attrs(nc.name, nc.mode, nc.owner, nc.group)
            return
        path = os.path.join("/dev", nc.name)
        os.chmod(path, nc.mode)
        os.chown(path, -1 if nc.owner is None else nc.owner, -1 if nc.group is None else nc.group)

    def close(self) -> None:
        for node in self.nodes:
            self._close_audit(node)
