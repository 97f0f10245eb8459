# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py's turns figure: two clients, each holding its own key, taking turns to Sign.

What ``--swap-residents`` is for.  With one resident file, each turn on a ``--swap lazy`` node
puts the other client's key away and loads its own: the kernel's four backend commands a
Sign, as in kernel mode and on tpm2-abrmd.  With two resident, both keys stay loaded and a
Sign is one backend command.  Paths: the node in kernel mode, with ``--swap lazy``, with
``--swap lazy --swap-residents 2``, and tpm2-abrmd; each on its own fresh swtpm, one path at a
time in interleaved rounds (the bench's client, :class:`~.bench_paths.Client`).  Backend
commands per Sign are counted in a separate pass through a counting relay, as the paths' are.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
from dataclasses import dataclass, field

from .bench_paths import Client, abrmd_route, missing, time_batch
from .bench_rig import Rig
from .relay import CountingRelay

LAZY = ("--swap", "lazy")
RESIDENTS = 2


@dataclass
class TurnsPath:
    """One path of the figure: ``extra`` are its ``cusetpm serve`` arguments (None: abrmd)."""

    label: str
    extra: tuple[str, ...] | None
    #: Per-batch mean µs per Sign.
    batches: list[float] = field(default_factory=list)
    cmds: float | None = None
    error: str | None = None

    def median(self) -> float | None:
        return statistics.median(self.batches) if self.batches else None


def turns_paths(kernel: str, residents: bool = True, abrmd: bool = True) -> list[TurnsPath]:
    """The figure's paths; ``residents``: the daemon offers ``--swap-residents``."""
    paths = [TurnsPath(f"node({kernel})", ()), TurnsPath(f"node({kernel},lazy)", LAZY)]
    if residents:
        paths.append(TurnsPath(f"node({kernel},lazy,{RESIDENTS})", (*LAZY, "--swap-residents", str(RESIDENTS))))
    if abrmd:
        paths.append(TurnsPath("abrmd", None, error=missing(abrmd_route())))
    return paths


def _tag(p: TurnsPath) -> str:
    return "turns-" + p.label.replace("(", "-").replace(")", "").replace(",", "-")


def _setup(rig: Rig, p: TurnsPath, kernel: str, count: bool) -> tuple[str, str, CountingRelay | None]:
    """(TCTI name, conf, relay): the path on a fresh swtpm, behind a counting relay if
    ``count``."""
    tag = _tag(p) + ("-count" if count else "")
    port = rig.swtpm(tag, startup=p.extra is None)  # a node starts its TPM itself
    relay = rig.relay(port) if count else None
    if relay is not None:
        port = relay.port
    if p.extra is None:
        return "tabrmd", rig.abrmd(tag, port), relay
    return "device", rig.node(tag, kernel, tcti=f"swtpm:host=127.0.0.1,port={port}", extra=p.extra), relay


def _pair(name: str, conf: str, api: str, stack: contextlib.ExitStack) -> tuple[Client, Client]:
    """Two clients of one path, each with its key, past swtpm's first-Sign RETRY."""
    pair = []
    for _ in range(2):
        c = Client(name, conf, with_key=True, api=api)
        stack.callback(c.close)
        c.sign()
        pair.append(c)
    return pair[0], pair[1]


def _turn(a: Client, b: Client) -> None:
    a.sign()
    b.sign()


def turns_figure(
    rig: Rig, kernel: str, rounds: int, signs: int, count: int, paths: list[TurnsPath], api: str = "tcti"
) -> list[TurnsPath]:
    """Time ``signs`` turns per batch (a Sign of each client), ``rounds`` interleaved rounds,
    then count backend commands over ``count`` turns per path; failures are kept per path."""
    with contextlib.ExitStack() as stack:
        pairs: dict[str, tuple[Client, Client]] = {}
        for p in paths:
            if p.error:
                continue
            try:
                name, conf, _ = _setup(rig, p, kernel, count=False)
                pairs[p.label] = _pair(name, conf, api, stack)
            except Exception as exc:
                p.error = f"{type(exc).__name__}: {exc}"
        for _ in range(rounds):
            for p in paths:
                pair = pairs.get(p.label)
                if pair is None or p.error:
                    continue
                try:
                    p.batches.append(time_batch(functools.partial(_turn, *pair), signs) / 2)
                except Exception as exc:
                    p.error = f"{type(exc).__name__}: {exc}"
    for p in paths:
        if p.error:
            continue
        try:
            with contextlib.ExitStack() as stack:
                name, conf, relay = _setup(rig, p, kernel, count=True)
                assert relay is not None
                pair = _pair(name, conf, api, stack)
                before = relay.commands
                for _ in range(count):
                    _turn(*pair)
                p.cmds = (relay.commands - before) / (2 * count)
        except Exception as exc:
            p.error = f"command count: {type(exc).__name__}: {exc}"
    return paths
