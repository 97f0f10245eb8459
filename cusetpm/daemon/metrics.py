# SPDX-License-Identifier: GPL-2.0-only
"""Prometheus metrics (``cusetpm serve --metrics HOST:PORT``; off unless asked).

What an operator watching a shared TPM wants on a dashboard: commands by node, command and
outcome, their latency, what the backend was sent, open files, the TPM's restarts and lost
connections, and the session registry's counts under ``--sessions global``.  Counters are
updated as each command finishes (:meth:`Metrics.observe`); gauges are read from the daemon
at scrape time.  The HTTP server is prometheus-client's own, in its own thread, listening only
on the address given.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from tpm2_pytss.constants import TPM2_CC

from ..kernel import wire
from ..kernel.wire import be32
from .chip import TpmChip
from .node import Node

log = logging.getLogger(__name__)

#: Latency buckets, seconds: a GetRandom through FUSE is ~0.5 ms, an RSA key seconds.
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)


@functools.lru_cache(maxsize=512)
def command_name(cc: int) -> str:
    """tpm2-pytss's name for a command code ("GetRandom"), else its hex."""
    try:
        name = TPM2_CC.to_string(cc)
    except ValueError:  # not a command tpm2-pytss knows (a vendor's, say)
        return f"0x{cc:08x}"
    return name.split(".", 1)[1] if name.startswith("TPM2_CC.") else f"0x{cc:08x}"


def outcome(result: int, rsp: bytes | bytearray) -> str:
    """``success``, ``tpm_error`` (the TPM answered a code), ``rm_error`` (the RM layer
    answered, 0x000Bxxxx) or ``errno_NAME`` (write() or read() failed)."""
    if result < 0:
        import errno

        return "errno_" + errno.errorcode.get(-result, str(-result))
    rc = be32(rsp, 6) if len(rsp) >= wire.TPM_HEADER_SIZE else 0
    if rc == 0:
        return "success"
    return "rm_error" if rc & 0xFFFF0000 == wire.RC_RESMGR_TPM_LAYER else "tpm_error"


class _State(Collector):
    """Gauges read from the daemon when Prometheus scrapes."""

    def __init__(self, chip: TpmChip, nodes: list[Node]) -> None:
        self.chip, self.nodes = chip, nodes

    def collect(self) -> Iterator[Metric]:
        chip = self.chip
        for name, doc, value in (
            ("cusetpm_tpm_available", "1 while the backing TPM answers", int(chip.available)),
            ("cusetpm_tpm_epoch", "how many times the backing TPM was found restarted", chip.epoch),
            ("cusetpm_tpm_restarts", "restarts of the backing TPM seen", chip.restarts),
            ("cusetpm_tpm_reconnects", "lost connections to the backing TPM", chip.reconnects),
            ("cusetpm_backend_commands", "commands sent to the backing TPM", chip.backend.commands_sent),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        files = GaugeMetricFamily("cusetpm_open_files", "open files", labels=["node"])
        objects = GaugeMetricFamily("cusetpm_objects", "objects held in the files' spaces", labels=["node"])
        sessions = GaugeMetricFamily("cusetpm_sessions", "sessions held in the files' spaces", labels=["node"])
        for node in self.nodes:
            spaces = [f.state.space for f in node.files]
            files.add_metric([node.name], len(spaces))
            objects.add_metric([node.name], sum(1 for s in spaces for h in s.context_tbl if h))
            sessions.add_metric([node.name], sum(1 for s in spaces for h in s.session_tbl if h))
        yield from (files, objects, sessions)
        seen: set[int] = set()
        features = [f for node in self.nodes if node.core.seam is not None for f in node.core.seam.features]
        for feature in features:
            snap = getattr(feature, "snapshot", None)
            if snap is None or id(feature) in seen:
                continue
            seen.add(id(feature))
            registry: dict[str, Any] = snap()
            if "known" not in registry:  # --swap lazy: its counters
                swap = GaugeMetricFamily("cusetpm_swap_events", "lazy context swapping counters", labels=["event"])
                for event, n in registry.items():
                    if isinstance(n, int) and not isinstance(n, bool):
                        swap.add_metric([event], n)
                yield swap
                continue
            yield GaugeMetricFamily("cusetpm_registry_sessions", "sessions the registry knows", value=registry["known"])
            yield GaugeMetricFamily(
                "cusetpm_session_waiters", "StartAuthSessions waiting for a slot", value=registry["queue"]
            )
            counters = GaugeMetricFamily("cusetpm_session_events", "session registry counters", labels=["event"])
            for event, n in registry["counters"].items():
                counters.add_metric([event], n)
            yield counters


class Metrics:
    """The counters the nodes update, and the registry the HTTP server serves."""

    def __init__(self, chip: TpmChip, nodes: list[Node]) -> None:
        self.registry = CollectorRegistry()
        self.commands = Counter(
            "cusetpm_commands", "user commands by node, command and outcome", ["node", "command", "outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "cusetpm_command_seconds", "user command latency in the daemon", ["node"], buckets=BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.refusals = Counter(
            "cusetpm_refusals", "commands and opens a tenant's policy refused, by rule", ["node", "rule"],
            registry=self.registry,
        )  # fmt: skip
        self.throttle_waits = Counter(
            "cusetpm_rate_waits", "commands held back by commands_per_second", ["node"], registry=self.registry
        )
        self.throttle_seconds = Counter(
            "cusetpm_rate_wait_seconds", "time commands were held back by commands_per_second", ["node"],
            registry=self.registry,
        )  # fmt: skip
        self.node_backend = Counter(
            "cusetpm_node_backend_commands", "commands sent to the TPM for each node's commands", ["node"],
            registry=self.registry,
        )  # fmt: skip
        self.registry.register(_State(chip, nodes))
        self._server: Any = None

    def observe(self, node: str, command: bytes, result: int, rsp: bytes | bytearray, seconds: float) -> None:
        try:
            cc = be32(command, 6) if len(command) >= wire.TPM_HEADER_SIZE else 0
            self.commands.labels(node, command_name(cc), outcome(result, rsp)).inc()
            self.latency.labels(node).observe(seconds)
        except Exception:  # metrics must never fail a command
            log.exception("metrics")

    def refused(self, node: str, rule: str) -> None:
        self.refusals.labels(node, rule).inc()

    def throttled(self, node: str, seconds: float) -> None:
        self.throttle_waits.labels(node).inc()
        self.throttle_seconds.labels(node).inc(seconds)

    def backend(self, node: str, commands: int) -> None:
        self.node_backend.labels(node).inc(commands)

    def listen(self, where: str) -> None:
        """``HOST:PORT`` (``[v6]:PORT`` too).  A port in use is an OSError at start."""
        host, _, port = where.rpartition(":")
        self._server, _thread = start_http_server(int(port), host.strip("[]") or "127.0.0.1", self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
