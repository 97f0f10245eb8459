# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py's report: the tables, how they were measured, and the goals."""

from __future__ import annotations

import argparse
import os
import textwrap
from dataclasses import dataclass, field
from typing import Callable

from .bench_floor import FLOOR_GOAL, Floor
from .bench_guest import (
    DEFAULT_NAME,
    GUEST_GOAL,
    PATHS,
    PY_RELAY_PATH,
    RELAY_PATH,
    ROWS,
    TRIO_RELAY_PATH,
    GuestFigure,
)
from .bench_limits import BackendCost, cycle_commands
from .bench_load import FAIRNESS_GOAL, FILE_KIB_GOAL, THROUGHPUT_GOAL, FilesFigure, LoadFigure
from .bench_paths import OPS, Route
from .bench_relay import LABEL as RELAY
from .bench_turns import TurnsPath

#: Issue 9's goals against the limits and abrmd, all ratios in the same run.
LIMIT_GOAL = 1.3  # a node's row costs at most this times its limit
SIGN_ABRMD_GOAL = 1.0  # kernel mode: Sign at most this times abrmd's
LAZY_ABRMD_GOAL = 0.8  # --swap lazy: each row at most this times abrmd's
LAZY_CMDS_GOAL = 1.0  # --swap lazy: backend commands per user command, a client alone
#: FUSE requests per command: the tpm2-tss device TCTI's write, poll, read header, poll, read rest.
FLOOR_REQUESTS = 5
#: The rows' names in a goal's figures.
SHORT = {"GetRandom(16)": "GetRandom", "  same, key loaded": "key loaded", "Sign ECDSA P256": "Sign"}


def cell_us(v: float | None, base: float | None, direct: bool) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0f}" if direct or not base else f"{v:.0f} {v / base:.2f}x"


def grid(title: str, rows: list[str], cols: list[list[str]]) -> list[str]:
    """A table: ``cols`` are [header, cell per row], right-aligned after the row names."""
    w0 = max(len(title), *(len(r) for r in rows)) + 2
    widths = [max(len(x) for x in col) + 3 for col in cols]
    lines = [[title, *rows]] + cols
    return [
        f"{lines[0][i]:<{w0}}" + "".join(f"{col[i]:>{w}}" for col, w in zip(cols, widths, strict=True))
        for i in range(len(rows) + 1)
    ]


def table(paths: list[Route], title: str, cell: Callable[[Route, str], str]) -> list[str]:
    return grid(title, [op for op, _, _ in OPS], [[p.label] + [cell(p, op) for op, _, _ in OPS] for p in paths])


@dataclass
class Figures:
    """What the benchmark measures besides the two tables."""

    floor: Floor | None = None
    backend: BackendCost | None = None
    files: FilesFigure | None = None
    load: list[LoadFigure] = field(default_factory=list)
    turns: list[TurnsPath] = field(default_factory=list)
    guest: GuestFigure | None = None

    def failed(self) -> bool:
        parts = [self.floor, self.backend, self.files, *self.load, *self.turns, self.guest]
        return any(x is not None and x.error for x in parts)


def ratio(v: float | None, base: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}" if not base else f"{v:.0f} {v / base:.2f}x"


def met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def report_floor(paths: list[Route], floor: Floor) -> list[str]:
    nodes = [p for p in paths if p.request_us is not None or p.poll_us is not None]
    cols = [["C libfuse", ratio(floor.read_us, None), ratio(floor.poll_us, None)]]
    cols += [[p.label, ratio(p.request_us, floor.read_us), ratio(p.poll_us, floor.poll_us)] for p in nodes]
    rows = ["read(), nothing pending", "poll()"]
    if floor.pinned_read_us is not None:
        rows += ["read(), one CPU", "poll(), one CPU"]
        cols[0] += [ratio(floor.pinned_read_us, None), ratio(floor.pinned_poll_us, None)]
        for col, p in zip(cols[1:], nodes, strict=True):
            col += [ratio(p.pinned_request_us, floor.pinned_read_us), ratio(p.pinned_poll_us, floor.pinned_poll_us)]
    out = grid("µs per idle request (x C libfuse)", rows, cols)
    if floor.error:
        out.append(f"  C libfuse: FAILED: {floor.error}")
    if floor.pin_error:
        out.append(f"  one CPU: not measured: {floor.pin_error}")
    for p in nodes:
        out.append(floor_goal(p.label, [("read", p.request_us, floor.read_us), ("poll", p.poll_us, floor.poll_us)]))
        if floor.pinned_read_us is not None:
            pairs = [("read", p.pinned_request_us, floor.pinned_read_us),
                     ("poll", p.pinned_poll_us, floor.pinned_poll_us)]  # fmt: skip
            out.append(floor_goal(p.label, pairs, ", client and daemon on one CPU"))
    return out


def floor_goal(label: str, pairs: list[tuple[str, float | None, float | None]], where: str = "") -> str:
    """The idle-request goal for one node and one placement."""
    got = [(op, v / base) for op, v, base in pairs if v is not None and base]
    if len(got) < len(pairs):
        verdict = "not measured"
    else:
        detail = ", ".join(f"{op} {x:.2f}x" for op, x in got)
        verdict = f"{met(all(x <= FLOOR_GOAL for _, x in got))} ({detail})"
    return f"Goal (idle request on the node <= {FLOOR_GOAL}x C libfuse{where}): {label}: {verdict}"


def report_files(fig: FilesFigure) -> list[str]:
    per = fig.per_file
    if fig.error or per is None:
        return [f"{fig.files} files on {fig.label}: FAILED: {fig.error or 'not measured'}"]
    return [
        f"{fig.files} files open on {fig.label}, one GetRandom each: daemon VmRSS {fig.rss_before} KiB after"
        f" {fig.warmup} warm-up files, {fig.rss_after} KiB with all open ({fig.seconds or 0:.2f} s to open them)",
        f"Goal (daemon memory <= {FILE_KIB_GOAL:g} KiB per open file): {fig.label}: {met(per <= FILE_KIB_GOAL)}"
        f" ({per:.1f} KiB per file)",
    ]


def report_load(figs: list[LoadFigure]) -> list[str]:
    node, abrmd = figs[0], next((f for f in figs if f.label == "abrmd"), None)
    base = abrmd.throughput if abrmd else None

    def pct(f: LoadFigure) -> str:
        return f"{100 * f.server_cpu / f.window:.0f}%" if f.server_cpu is not None and f.window else "n/a"

    def cpu_per(f: LoadFigure) -> str:
        n = sum(f.counts)
        return f"{1e6 * f.client_cpu / n:.0f}" if n else "n/a"

    cols = [
        [f.label, ratio(f.throughput, base if f is node else None),
         "n/a" if f.fairness is None else f"{f.fairness:.2f}", pct(f), cpu_per(f)]
        for f in figs
    ]  # fmt: skip
    rows = ["commands/s, all clients", "slowest / fastest client", "server CPU, % of one CPU",
            "client CPU per command, µs"]  # fmt: skip
    out = grid(f"{node.clients} clients, GetRandom(16) for {node.seconds:g} s", rows, cols)
    out += [f"  {f.label}: FAILED: {f.error}" for f in figs if f.error]
    tp = node.throughput
    if tp is not None and base:
        out.append(
            f"Goal (node >= {THROUGHPUT_GOAL}x abrmd, commands/s, {node.clients} clients): {node.label}:"
            f" {met(tp / base >= THROUGHPUT_GOAL)} ({tp / base:.2f}x)"
        )
    else:
        out.append(f"Goal (node >= {THROUGHPUT_GOAL}x abrmd, commands/s, {node.clients} clients): not measured")
    fair = node.fairness
    verdict = "not measured" if fair is None else f"{met(fair >= FAIRNESS_GOAL)} ({fair:.2f})"
    out.append(f"Goal (slowest / fastest client >= {FAIRNESS_GOAL}, {node.clients} clients): {node.label}: {verdict}")
    return out


def report_turns(paths: list[TurnsPath]) -> list[str]:
    """Two clients taking turns to Sign: µs and backend commands per Sign, per path."""
    cols = [[p.label, ratio(p.median(), None), "n/a" if p.cmds is None else f"{p.cmds:.2f}"] for p in paths]
    out = grid("Two clients taking turns, each its own key", ["µs per Sign", "backend cmds per Sign"], cols)
    return out + [f"  {p.label}: FAILED: {p.error}" for p in paths if p.error]


GUEST_TITLE = "CUSE node against the kernel's /dev/tpmrm0"
#: The guest figure's floors, each a relay on the kernel's own /dev/tpmrm0: its path, its column.
GUEST_RELAYS = {
    RELAY_PATH: "C CUSE relay",
    PY_RELAY_PATH: "Python CUSE relay",
    TRIO_RELAY_PATH: "Python CUSE relay (trio)",
}


def report_guest(fig: GuestFigure) -> list[str]:
    """The guest figure: µs (under TCG, for the record) and the ratio node / kernel, the figure."""
    head = f"{GUEST_TITLE}, one {fig.kernel} guest"
    label = f"node({fig.kernel},cuse)"
    goal = f"Goal (CUSE node <= {GUEST_GOAL}x the kernel's /dev/tpmrm0, same swtpm, one {fig.kernel} guest)"
    if fig.skipped:
        return [f"{head}: not measured: {fig.skipped}"]
    out = []
    relays = {p: what for p, what in GUEST_RELAYS.items() if all(fig.median(row, p) is not None for row in ROWS)}
    paths = [*PATHS, *relays]
    if all(fig.median(row, p) is not None for row in ROWS for p in PATHS):
        cols = [["/dev/tpmrm0", *(ratio(fig.median(row, "kernel"), None) for row in ROWS)]]
        for p, what in {"node": f"/dev/{DEFAULT_NAME}", **relays}.items():
            cols.append([what, *(ratio(fig.median(row, p), fig.median(row, "kernel")) for row in ROWS)])
        out += grid("µs per command in the guest (TCG; x kernel)", list(ROWS), cols)
        for p in paths:
            spread = ", ".join(f"{min(b):.0f}-{max(b):.0f}" for row in ROWS if (b := fig.batches[row][p]))
            out.append(f"  batch means {p}: {spread} µs")
    if fig.error:
        out.append(f"{head}: FAILED: {fig.error}")
    got = [(_op(row), x) for row in ROWS if (x := fig.ratio(row)) is not None]
    if fig.error or len(got) < len(ROWS):
        out.append(f"{goal}: not measured")
    else:
        detail = ", ".join(f"{op} {x:.2f}x" for op, x in got)
        out.append(f"{goal}: {label}: {met(all(x <= GUEST_GOAL for _, x in got))} ({detail})")
    for p, what in GUEST_RELAYS.items():
        if p in relays:
            floor = ", ".join(f"{_op(row)} {fig.ratio(row, p):.2f}x" for row in ROWS)
            over = ", ".join(f"{_op(row)} {fig.ratio(row, 'node', p):.2f}x" for row in ROWS)
            out.append(f"The floor, a {what} on the kernel's own /dev/tpmrm0: {floor} the kernel; the node {over} it")
        elif not fig.error:
            why = fig.relay_skipped if p == RELAY_PATH else None
            out.append(f"The floor, a {what}: not measured: {why or 'the guest did not run it'}")
    if not fig.error:
        out.append(textwrap.fill(fig.how(), width=96, break_on_hyphens=False))
    return out


def _op(row: str) -> str:
    """A guest row's command: "GetRandom", "ReadPublic"."""
    return row.split(",")[0].split("(")[0]


def api_words(args: argparse.Namespace) -> str:
    """The clients' stack (bench_paths.Client), in words."""
    if getattr(args, "api", "tcti") == "esapi":
        return "tpm2-pytss ESAPI (its receive reads the header, then the rest)"
    return "a tpm2-pytss TCTI loop (transmit the bytes, receive the whole response, check its code)"


def how_figures(args: argparse.Namespace) -> str:
    parts = [
        "Backend cost: one more fresh swtpm (the same arguments, serving on a Unix socket as the node's "
        "managed swtpm does), one persistent connection to its data channel from this process, raw command "
        "bytes (blocking socket), every response code "
        "checked (RETRY and TESTING sent again, as the kernel does); an ECC P-256 signing primary made once.  "
        "In each round, after the paths' batches, with the bench thread and that swtpm pinned to one CPU: per "
        "row one batch of the command alone (the key loaded for its rows) and one inside the kernel's cycle "
        "for the rows with the key (ContextLoad of its last saved context, the command, ContextSave, "
        "FlushContext), the paths' batch sizes; GetRandom with nothing loaded is its own cycle; also the "
        "first row alone unpinned.  Median over rounds of the batch mean per user command."
    ]
    if args.floor:
        parts.append(
            "Idle request: read() of the node's file with nothing pending and poll() with a 0 timeout, "
            f"{args.floor} in a loop, 5 times alternating with the same loop on a C libfuse low-level file "
            "system built by the bench (gcc, libfuse3; one thread, fuse_session_loop; an empty direct-I/O "
            "file whose read answers 0 bytes and poll POLLOUT, as the idle node); median of the 5.  Then the "
            "same 5 alternations with this thread and every thread of the file's server on CPU 0 (one CPU): "
            "the server's own cost, without the wake-up of an idle CPU the scheduler may add."
        )
    if args.files:
        parts.append(
            f"Files: a fresh node in kernel mode; {args.files_warmup} warm-up files opened, each sending one "
            f"GetRandom(16) and staying open, then {args.files} more; the daemon's VmRSS (/proc/PID/status) "
            "before and after, over the count."
        )
    if args.clients:
        parts.append(
            f"Clients: {args.clients} processes forked from one launcher, each the bench's client "
            f"({api_words(args)}) on its own connection (device TCTI on a fresh node in kernel mode, "
            "tabrmd TCTI on tpm2-abrmd "
            f"--max-connections={args.clients + 1}; each its own fresh swtpm), started together, GetRandom(16) "
            f"in a loop for {args.client_seconds:g} s; one path at a time.  commands/s: the sum of each "
            "client's count over its own time; server CPU: the daemon's or abrmd's process (not its swtpm) "
            "over the window."
        )
    if getattr(args, "turns", 0):
        parts.append(
            f"Turns: per path two connections, each holding its own ECC P-256 primary, Sign in turn "
            f"(one of each a turn), {args.turns} turns a batch, {args.rounds} interleaved rounds, each path on "
            "its own fresh swtpm (the nodes through --tcti swtpm:...); µs per Sign: median over rounds of the "
            f"batch mean; backend commands: {args.count} turns through a counting relay."
        )
    return "".join(f"{x}  " for x in parts)


def report(
    paths: list[Route], args: argparse.Namespace, elapsed: float, load: tuple[float, float], figures: Figures
) -> None:
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
        f"How measured: the same client for every path, {api_words(args)} over a tpm2-tss TCTI (swtpm, "
        "device, tabrmd), in this one process (the swtpm TCTI, so direct too, connects anew per command).  "
        "Each path has its own fresh swtpm (cusetpm's managed arguments).  node = `cusetpm serve --fuse` "
        "with its managed swtpm (as `make run`), one daemon per kernel profile; abrmd = tpm2-abrmd on a "
        "private D-Bus session bus; C relay = a C libfuse low-level file the bench builds (gcc, libfuse3; "
        "one thread) whose write() sends the command to its own swtpm over a Unix socket and waits for "
        "the response, which read() hands out: the whole path in C, with no resource manager.  Per path "
        "two connections: one with nothing loaded (GetRandom) and one "
        "holding an ECC P-256 signing primary (Sign: sha256 digest, null scheme = the key's ECDSA-SHA256).  "
        f"All paths set up and warmed up ({args.warmup} calls per row), then {args.rounds} interleaved "
        f"rounds, each one batch per row and path ({args.random} GetRandom, {args.sign} Sign), one path at "
        "a time; a figure is the median over rounds of the batch's mean wall-clock µs per command.  "
        "Backend commands: a separate pass, each path set up again with a counting TCP relay in front of "
        "its swtpm (the node then uses --tcti swtpm:port=RELAY), over "
        f"{args.count} user commands per row; direct must read 1.00.  {how_figures(args)}"
        f"{elapsed:.0f} s in all."
    )
    print()
    print(textwrap.fill(how, width=96, break_on_hyphens=False))
    busy = max(load) > 0.5 * (os.cpu_count() or 1)
    print(
        f"Load average {load[0]:.2f} before, {load[1]:.2f} after, on {os.cpu_count()} CPUs"
        + (":\nthe machine was busy, expect noisy numbers (the ratios suffer least)." if busy else ".")
    )
    for part in (
        report_floor(paths, figures.floor) if figures.floor else [],
        report_limits(paths, figures.backend, figures.floor),
        report_files(figures.files) if figures.files else [],
        report_load(figures.load) if figures.load else [],
        report_turns(figures.turns) if figures.turns else [],
        report_guest(figures.guest) if figures.guest else [],
    ):
        if part:
            print()
            print("\n".join(part))


# --- the limits: the backend's own cost + five floor requests ----------------------------


def floor_us(floor: Floor | None) -> float | None:
    """The floor request: the C libfuse file's idle read()."""
    return floor.read_us if floor is not None else None


def limit_of(cost: BackendCost | None, floor: Floor | None, op: str, mode: str) -> float | None:
    """A row's limit in µs for a node in swap ``mode``: the backend's own cost for the row (kernel
    mode: inside the kernel's cycle; lazy: the command alone) + five floor requests."""
    base = floor_us(floor)
    cost_us = cost.median("alone" if mode == "lazy" else "cycle", op) if cost is not None else None
    return None if cost_us is None or base is None else cost_us + FLOOR_REQUESTS * base


def no_limit(cost: BackendCost | None, floor: Floor | None) -> str | None:
    """Why the limits are not measured, or None."""
    if floor is None:
        return "no C libfuse floor: --floor 0"
    if floor.read_us is None:
        return "the C libfuse floor failed" if floor.error else "no C libfuse floor"
    if cost is None:
        return "no backend cost"
    return "the backend cost failed" if cost.error else None


def no_abrmd(abrmd: Route | None) -> str | None:
    """Why abrmd's figures are missing, or None."""
    if abrmd is None:
        return "no abrmd: --no-abrmd"
    return "abrmd failed" if abrmd.error else None


def verdict(
    figures: list[tuple[str, float | None]], ok: Callable[[float], bool], why: str | None, unit: str = "x"
) -> str:
    """MET or NOT MET (each row's figure), or "not measured (why)" when ``why`` is given or a
    row's figure is missing."""
    lost = [name for name, v in figures if v is None]
    why = why or (f"{', '.join(lost)} not measured" if lost else None)
    if why:
        return f"not measured ({why})"
    detail = ", ".join(f"{name} {v:.2f}{unit}" for name, v in figures)
    return f"{met(all(ok(v) for _, v in figures if v is not None))} ({detail})"


def report_limits(paths: list[Route], cost: BackendCost | None, floor: Floor | None) -> list[str]:
    """The backend's own cost, each row's limit, every node column against its limit, and
    issue 9's goals for kernel mode and ``--swap lazy``."""
    rows = [op for op, _, _ in OPS]
    out: list[str] = []
    if cost is not None:

        def us(mode: str, op: str) -> str:
            v = cost.median(mode, op)
            return "n/a" if v is None else f"{v:.0f}" + (f" ({cycle_commands(op)})" if mode == "cycle" else "")

        def lim(mode: str, op: str) -> str:
            v = limit_of(cost, floor, op, mode)
            return "n/a" if v is None else f"{v:.0f}"

        cols = [["alone", *(us("alone", op) for op in rows)], ["kernel cycle", *(us("cycle", op) for op in rows)]]
        cols += [[f"limit, {m}", *(lim(m, op) for op in rows)] for m in ("kernel", "lazy")]
        out += grid("backend's own cost, µs (cmds)", rows, cols)
        where = f"both on CPU {cost.cpu}" if cost.cpu is not None else f"not pinned ({cost.pin_error})"
        free = cost.median("unpinned", rows[0])
        out.append(
            f"  one raw socket to its own swtpm, {where}"
            + (f"; unpinned, {rows[0]} alone: {free:.0f} µs" if free is not None and cost.cpu is not None else "")
        )
        for mode in ("alone", "cycle"):
            spread = ", ".join(f"{min(b):.0f}-{max(b):.0f}" for op in rows if (b := cost.batches[mode].get(op)))
            if spread:
                out.append(f"  batch means backend {mode}: {spread} µs")
        if cost.error:
            out.append(f"  backend cost: FAILED: {cost.error}")
    why_limit = no_limit(cost, floor)
    base = floor_us(floor)
    if why_limit is None and base is not None:
        out.append(
            f"  limit = backend cost + {FLOOR_REQUESTS} x the C libfuse idle read ({base:.0f} µs);"
            " kernel mode: the kernel's cycle, --swap lazy: the command alone"
        )
    else:
        out.append(f"  limits: not measured ({why_limit})")
    nodes = [p for p in paths if p.mode is not None]
    relay = next((p for p in paths if p.label == RELAY and not p.error), None)
    if nodes and why_limit is None:
        # The C relay sends the command alone: its limit is --swap lazy's.
        with_relay = [(relay, "lazy")] if relay is not None else []
        cols = [[p.label, *(ratio(p.median(op), limit_of(cost, floor, op, mode)) for op in rows)]
                for p, mode in with_relay + [(p, p.mode or "kernel") for p in nodes]]  # fmt: skip
        out += [""] + grid("µs per command (x its limit)", rows, cols)
        if relay is not None:
            out.append(f"  {RELAY}: the whole path in C, no resource manager; its limit is --swap lazy's")
    return out + report_relay(paths) + [""] + goals(paths, cost, floor)


def report_relay(paths: list[Route]) -> list[str]:
    """Every node column and abrmd against the C relay: what the daemon costs beyond the
    whole path done in C (bench_relay).  No goal: where the time goes."""
    relay = next((p for p in paths if p.label == RELAY), None)
    if relay is None:
        return []
    if relay.error or not relay.batches:
        return ["", f"  x {RELAY}: not measured ({RELAY} failed)"]
    others = [p for p in paths if p.mode is not None or p.label == "abrmd"]
    cols = [[p.label, *(ratio(p.median(op), relay.median(op)) for op, _, _ in OPS)] for p in others]
    return [""] + grid(f"µs per command (x {RELAY})", [op for op, _, _ in OPS], cols)


def goals(paths: list[Route], cost: BackendCost | None, floor: Floor | None) -> list[str]:
    """Issue 9's goals for every node column: kernel mode (the kernel's profiles, global
    sessions) and ``--swap lazy``; "not measured" where a figure is missing, with why."""
    rows = [op for op, _, _ in OPS]
    abrmd = next((p for p in paths if p.label == "abrmd"), None)
    why_limit, why_abrmd = no_limit(cost, floor), no_abrmd(abrmd)
    out: list[str] = []
    lazy_goals = (
        f"Goal (--swap lazy: each row <= {LAZY_ABRMD_GOAL}x abrmd)",
        f"Goal (--swap lazy: each row <= {LIMIT_GOAL}x its limit, the command alone + {FLOOR_REQUESTS} floor requests)",
        f"Goal (--swap lazy: {LAZY_CMDS_GOAL:.2f} backend command per user command, a client alone)",
    )
    for p in paths:
        if p.mode is None:
            continue
        failed = f"{p.label} failed" if p.error else None

        def to_limit(op: str, p: Route = p) -> float | None:
            v, lim = p.median(op), limit_of(cost, floor, op, p.mode or "kernel")
            return v / lim if v is not None and lim else None

        def to_abrmd(op: str, p: Route = p) -> float | None:
            v, base = p.median(op), abrmd.median(op) if abrmd is not None else None
            return v / base if v is not None and base else None

        within = [(SHORT[op], to_limit(op)) for op in rows]
        if p.mode == "lazy":
            against = [(SHORT[op], to_abrmd(op)) for op in rows]
            cmds = [(SHORT[op], p.cmds.get(op)) for op in rows]
            why_cmds = failed or ("the command count failed" if p.count_error else None)
            out += [
                f"{lazy_goals[0]}: {p.label}: {verdict(against, lambda x: x <= LAZY_ABRMD_GOAL, failed or why_abrmd)}",
                f"{lazy_goals[1]}: {p.label}: {verdict(within, lambda x: x <= LIMIT_GOAL, failed or why_limit)}",
                f"{lazy_goals[2]}: {p.label}: "
                + verdict(cmds, lambda x: abs(x - LAZY_CMDS_GOAL) < 0.005, why_cmds, unit=""),
            ]
        else:
            sign = [(SHORT[op], to_abrmd(op)) for op in rows if SHORT[op] == "Sign"]
            out += [
                f"Goal (kernel mode: each row <= {LIMIT_GOAL}x its limit, the kernel's cycle + {FLOOR_REQUESTS} floor"
                f" requests): {p.label}: {verdict(within, lambda x: x <= LIMIT_GOAL, failed or why_limit)}",
                f"Goal (kernel mode: Sign <= {SIGN_ABRMD_GOAL}x abrmd): {p.label}: "
                + verdict(sign, lambda x: x <= SIGN_ABRMD_GOAL, failed or why_abrmd),
            ]
    if not any(p.mode == "lazy" for p in paths):
        out += [f"{goal}: not measured (no --swap lazy column: --no-lazy, or no --swap)" for goal in lazy_goals]
    return out
