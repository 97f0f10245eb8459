# SPDX-License-Identifier: GPL-2.0-only
"""The in-guest driver: every scenario on a fresh kernel chip and a fresh daemon.

``python -m cusetpm.conformance guest`` runs :func:`guest_run` inside a rig guest; the host
side (:func:`cusetpm.conformance.report.compare`) reads the JSON it writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .. import progress
from .normalize import GuestRun, Transcript, failed_transcript
from .runner import run_scenario
from .scenario import load_scenarios
from .sides import ForkedDaemon, KernelChip, SideError, mount_fusectl

__all__ = ["guest_run", "SCENARIO_TIMEOUT", "LOOKAHEAD"]

#: Wall-clock limit for one scenario on one side.
SCENARIO_TIMEOUT = 90.0
#: How many scenarios ahead the in-guest driver starts kernel chips and daemons.
LOOKAHEAD = 2


def _with_watchdog(timeout: float, on_timeout: Callable[[], None], fn: Callable[[], Transcript]) -> Transcript:
    """Run fn; if it takes longer than ``timeout``, kill the side (which unblocks its
    syscalls: EPIPE from a dead chip, ENOTCONN from a dead FUSE/CUSE daemon)."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        on_timeout()

    timer = threading.Timer(timeout, fire)
    timer.daemon = True
    timer.start()
    try:
        result = fn()
    finally:
        timer.cancel()
        timer.join()
    if fired.is_set():
        result["error"] = (result.get("error") or "") + f" TIMEOUT after {timeout}s (side killed)"
    return result


def _side(name: str, t: Transcript) -> str:
    return f"{name} {'FAILED ' if t.get('error') else ''}{float(t.get('seconds') or 0):.1f} s"


def _report_scenario(i: int, total: int, name: str, result: GuestRun, seconds: float) -> None:
    """A marker line on stdout: the host relays it as a progress line while the guest runs."""
    k, o = result["kernel_side"][name], result["ours"][name]
    progress.emit_marker(f"scenario {i}/{total} {name} {seconds:.1f} s ({_side('kernel', k)}, {_side('node', o)})")


def guest_run(
    kernel: str,
    node_kind: str,
    files: Sequence[str],
    out: str,
    *,
    only: Sequence[str] = (),
    timeout: float = SCENARIO_TIMEOUT,
    serve_args: Sequence[str] = (),
) -> int:
    """The in-guest driver: each scenario on a fresh kernel chip and a fresh daemon.

    Writes ``{"kernel", "release", "node", "kernel_side": {name: transcript},
    "ours": {name: transcript}, "seconds": ...}`` to ``out``.  Resources for the next
    scenario are started while the current one runs; a progress marker line goes to stdout
    after each scenario.
    """
    t_start = time.monotonic()
    scenarios = load_scenarios(files)
    if only:
        scenarios = [s for s in scenarios if s.name in set(only)]
    base = Path(tempfile.mkdtemp(prefix="cusetpm-conf-", dir="/run" if os.path.isdir("/run") else None))
    if node_kind == "fuse":
        mount_fusectl()
    result: GuestRun = {
        "kernel": kernel,
        "release": os.uname().release,
        "node": node_kind,
        "kernel_side": {},
        "ours": {},
        "order": [s.name for s in scenarios],
    }

    def new_chip(i: int) -> KernelChip | SideError:
        try:
            return KernelChip(base / f"k{i}")
        except OSError as exc:
            return SideError(f"cannot start swtpm: {exc}")

    def new_daemon(i: int) -> ForkedDaemon:
        return ForkedDaemon(base / f"d{i}", kernel, node_kind, i, serve_args)

    chips: dict[int, KernelChip | SideError] = {}
    daemons: dict[int, ForkedDaemon] = {}
    phases: dict[str, float] = {}
    retries = {"chips": 0, "daemons": 0}

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            phases[name] = phases.get(name, 0.0) + time.monotonic() - t

    if scenarios:
        chips[0] = new_chip(0)
    t_import = time.monotonic()
    from .. import cli  # noqa: F401 - the slow import, while the first chip registers

    result["import_seconds"] = round(time.monotonic() - t_import, 2)
    if scenarios:
        daemons[0] = new_daemon(0)
    started = {0} if scenarios else set()
    stopping_chips: list[KernelChip] = []
    stopping_daemons: list[tuple[str, ForkedDaemon]] = []

    def finish_daemon(name: str, d: ForkedDaemon) -> None:
        rc = d.stop()
        t = result["ours"][name]
        if rc != 0 and not t.get("error"):
            t["error"] = f"cusetpm exited with status {rc}:\n{d.log()[-3000:]}"

    def reap(block: bool) -> None:
        for c in list(stopping_chips):
            if block or c.done():
                c.wait()
                stopping_chips.remove(c)
        for name, d in list(stopping_daemons):
            if block or d.done():
                finish_daemon(name, d)
                stopping_daemons.remove((name, d))

    try:
        for i, sc in enumerate(scenarios):
            t_scenario = time.monotonic()
            # Start what the next scenarios need; no scenario file is open now, so the
            # forked daemons inherit nothing of the kernel side.
            with phase("start"):
                for j in range(i, min(i + 1 + LOOKAHEAD, len(scenarios))):
                    if j not in started:
                        started.add(j)
                        chips[j] = new_chip(j)
                        if j not in daemons:
                            daemons[j] = new_daemon(j)
                reap(block=False)
            chip = chips.pop(i)
            if isinstance(chip, SideError):
                result["kernel_side"][sc.name] = failed_transcript(str(chip))
            else:
                try:
                    with phase("chip-ready"):
                        try:
                            node = chip.ready()
                        finally:
                            retries["chips"] += chip.attempts - 1
                    result["kernel_side"][sc.name] = _with_watchdog(
                        timeout, chip.kill, functools.partial(run_scenario, sc, node, kernel=kernel)
                    )
                except SideError as exc:
                    result["kernel_side"][sc.name] = failed_transcript(str(exc))
                finally:
                    chip.terminate()
                    stopping_chips.append(chip)
            d = daemons.pop(i)
            try:
                with phase("daemon-ready"):
                    try:
                        node = d.ready()
                    finally:
                        retries["daemons"] += d.attempts - 1
                waiter = d.close_waiter()
                t = _with_watchdog(
                    timeout, d.kill, functools.partial(run_scenario, sc, node, kernel=kernel, after_close=waiter)
                )
            except SideError as exc:
                t = failed_transcript(str(exc))
            result["ours"][sc.name] = t
            _report_scenario(i + 1, len(scenarios), sc.name, result, time.monotonic() - t_scenario)
            d.terminate()
            stopping_daemons.append((sc.name, d))
        with phase("final-stop"):
            reap(block=True)
    finally:
        for c in chips.values():
            if isinstance(c, KernelChip):
                c.stop()
        for d in daemons.values():
            d.stop()
        for c in stopping_chips:
            c.stop()
        for _, d in stopping_daemons:
            d.stop()
    result["seconds"] = round(time.monotonic() - t_start, 2)
    result["phases"] = {k: round(v, 2) for k, v in phases.items()}
    result["retries"] = retries
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, out)
    return 0
