# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py's report: the two tables, how it was measured, and the goal."""

from __future__ import annotations

import argparse
import os
import textwrap
from typing import Callable

from .bench_paths import GOAL_OPS, OPS, Route

GOAL = 1.5  # the node must cost at most GOAL x direct (the project's issue)


def cell_us(v: float | None, base: float | None, direct: bool) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0f}" if direct or not base else f"{v:.0f} {v / base:.2f}x"


def table(paths: list[Route], title: str, cell: Callable[[Route, str], str]) -> list[str]:
    w0 = max(len(title), *(len(op) for op, _, _ in OPS)) + 2
    cols = [[p.label] + [cell(p, op) for op, _, _ in OPS] for p in paths]
    widths = [max(len(x) for x in col) + 3 for col in cols]
    out = [f"{title:<{w0}}" + "".join(f"{col[0]:>{w}}" for col, w in zip(cols, widths, strict=True))]
    for i, (op, _, _) in enumerate(OPS, 1):
        out.append(f"{op:<{w0}}" + "".join(f"{col[i]:>{w}}" for col, w in zip(cols, widths, strict=True)))
    return out


def report(paths: list[Route], args: argparse.Namespace, elapsed: float, load: tuple[float, float]) -> None:
    direct = paths[0]

    def us(p: Route, op: str) -> str:
        return cell_us(p.median(op), direct.median(op), p is direct)

    def cmds(p: Route, op: str) -> str:
        return f"{p.cmds[op]:.2f}" if op in p.cmds else "n/a"

    print("\n".join(table(paths, "µs per command (x direct)", us)))
    print()
    print("\n".join(table(paths, "backend cmds per user cmd", cmds)))
    print()
    for p in paths:
        if p.batches:
            spread = ", ".join(f"{min(b):.0f}-{max(b):.0f}" for op, _, _ in OPS if (b := p.batches.get(op)))
            print(f"  batch means {p.label}: {spread} µs")
        if p.error:
            print(f"  {p.label}: FAILED: {p.error}")
        if p.count_error:
            print(f"  {p.label}: command count FAILED: {p.count_error}")
    how = (
        "How measured: the same client for every path, tpm2-pytss ESAPI over a tpm2-tss TCTI (swtpm, "
        "device, tabrmd), in this one process (the swtpm TCTI, so direct too, connects anew per command).  "
        "Each path has its own fresh swtpm (cusetpm's managed arguments).  node = `cusetpm serve --fuse` "
        "with its managed swtpm (as `make run`), one daemon per kernel profile; abrmd = tpm2-abrmd on a "
        "private D-Bus session bus.  Per path two connections: one with nothing loaded (GetRandom) and one "
        "holding an ECC P-256 signing primary (Sign: sha256 digest, null scheme = the key's ECDSA-SHA256).  "
        f"All paths set up and warmed up ({args.warmup} calls per row), then {args.rounds} interleaved "
        f"rounds, each one batch per row and path ({args.random} GetRandom, {args.sign} Sign), one path at "
        "a time; a figure is the median over rounds of the batch's mean wall-clock µs per command.  "
        "Backend commands: a separate pass, each path set up again with a counting TCP relay in front of "
        "its swtpm (the node then uses --tcti swtpm:port=RELAY), over "
        f"{args.count} user commands per row; direct must read 1.00.  {elapsed:.0f} s in all."
    )
    print()
    print(textwrap.fill(how, width=96, break_on_hyphens=False))
    busy = max(load) > 0.5 * (os.cpu_count() or 1)
    print(
        f"Load average {load[0]:.2f} before, {load[1]:.2f} after, on {os.cpu_count()} CPUs"
        + (":\nthe machine was busy, expect noisy numbers (the ratios suffer least)." if busy else ".")
    )
    for p in paths[1:]:
        if not p.label.startswith("node"):
            continue
        medians = [(op, p.median(op), direct.median(op)) for op in GOAL_OPS]
        ratios = [(op, v, base) for op, v, base in medians if v is not None and base]
        if len(ratios) < len(medians):
            print(f"Goal (node <= {GOAL}x direct): {p.label}: not measured")
            continue
        met = all(v / base <= GOAL for _, v, base in ratios)
        if p.request_us is not None:
            floor = 5 * p.request_us
            print(
                f"  {p.label}: one request to the node file costs {p.request_us:.0f} µs with no TPM work (an idle"
                f" read); the device TCTI makes 5 per command (write, poll, read, poll, read): {floor:.0f} µs,"
                f" {floor / ratios[0][2]:.2f}x direct GetRandom before any TPM work"
            )
        detail = ", ".join(f"{op.split()[0]} {v / base:.2f}x" for op, v, base in ratios)
        print(f"Goal (node <= {GOAL}x direct, GetRandom and Sign): {p.label}: {'MET' if met else 'NOT MET'} ({detail})")
