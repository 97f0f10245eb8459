#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""How much a user command costs through the cusetpm node, against swtpm direct and tpm2-abrmd.

``make bench`` runs this.  One client stack for every path, so only the path differs: issue 9's
tpm2-pytss TCTI loop (a command's bytes transmitted, the whole response received, its response
code checked), or with ``--api esapi`` tpm2-pytss ESAPI over the same TCTI:

* direct: ``swtpm`` TCTI to a swtpm,
* C relay: ``device`` TCTI on a C libfuse file that forwards each command to a swtpm in its
  write() (bench_relay): the whole path in C with no resource manager, the floor of a node column,
* node:   ``device`` TCTI on the cusetpm FUSE file (``cusetpm serve --fuse``, its own managed
  swtpm, as ``make run`` does), one daemon per kernel profile,
* abrmd:  ``tabrmd`` TCTI to tpm2-abrmd on a private D-Bus session bus, abrmd on a swtpm.

Every path has its own fresh swtpm (same arguments as cusetpm's managed one) and two
connections: one with nothing loaded (GetRandom) and one holding an ECC P-256 signing key
(GetRandom again, and Sign).  The second GetRandom row shows what the kernel's resource
manager costs a file with an object in its space: every command loads, saves and flushes
it.  All paths are set up first, then measured in interleaved rounds (one batch per path
and row per round, never two paths at once), so a change of background load hits every path
alike; each number is the median over rounds of the batch mean.

Backend commands per user command are counted in a separate pass, because a relay adds
latency: each path is set up again with a counting TCP relay in front of its swtpm (the node
then takes ``--tcti swtpm:port=RELAY``), and the relay counts the TPM command frames it
passes during K user commands.

With ``--lazy`` (the default when ``cusetpm serve --help`` offers ``--swap``) the node also
runs with ``--swap lazy``: the column ``node(6.12,lazy)``, and ``node(6.12,global,lazy)`` with
``--sessions global`` on it.  With ``--pin`` (the default when it
offers ``--cpu``) the node runs on one CPU with its swtpm as well, in kernel mode and with
``--swap lazy``: ``node(6.12,cpu1)`` and ``node(6.12,lazy,cpu1)`` (the client stays unpinned).

Then the figures of issue 9, each against a baseline measured in the same run:

* the idle request (a read() with nothing pending, a poll()) on the node against the same on
  a C libfuse low-level file system the bench builds (bench_floor): goal <= 1.5x,
* the limits: the backend's own cost per row over one persistent raw socket to a swtpm of its
  own (bench_limits; the command alone, and inside the kernel's four-command cycle when the
  file holds a key), timed in the same interleaved rounds as the paths; a row's limit is that
  cost + five floor requests (the C file's idle read; issue 9 counts five requests per
  command on the device TCTI: ESAPI's, whose receive reads the header, then the rest; the TCTI
  loop's full-buffer receive makes three: write, poll, read).  Goals: kernel mode (the kernel
  profiles, --sessions global) each row <= 1.3x its limit (the cycle) and Sign <= 1.0x abrmd;
  --swap lazy each row <= 0.8x abrmd and <= 1.3x its limit (the command alone), and 1.00
  backend command per user command,
* 1 000 files open on a node in kernel mode, one GetRandom each: the daemon's VmRSS per file
  (bench_load): goal <= 8 KiB,
* two clients, each holding its own key, signing in turn, on the node in kernel mode, with
  ``--swap lazy``, with ``--swap lazy --swap-residents 2`` and on tpm2-abrmd (bench_turns):
  µs and backend commands per Sign (no goal: what ``--swap-residents`` is for),
* 64 client processes calling GetRandom at once for a fixed time, on the node in kernel mode
  and on tpm2-abrmd (bench_load, bench_clients): goal node >= 1.0x abrmd in commands/s, and
  the slowest client's count >= 0.5x the fastest's on the node,

and one in a real kernel (bench_guest; ``--no-guest`` skips it, and it is skipped with a line
saying why where the rig cannot boot): in one 6.12 guest under qemu TCG, the CUSE node against
the kernel's own /dev/tpmrm0, the same swtpm behind vtpm_proxy and behind the node (through the
kernel's /dev/tpm0), both open at once: goal node <= 1.5x kernel, as a ratio only (absolute
times under TCG mean nothing).

Prints; never asserts on speed.  Exits 1 only if some part failed to run.

The parts live in cusetpm.testing: bench_rig (processes), bench_paths (client, paths,
measuring), bench_relay (the C relay), bench_floor, bench_limits, bench_load, bench_turns and
bench_clients (the figures), bench_guest (the guest figure, both sides), bench_report (the
tables and goals); swtpm, daemon and relay are the test support's own.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from cusetpm.testing.bench_floor import measure_floors
from cusetpm.testing.bench_guest import GuestFigure, guest_figure
from cusetpm.testing.bench_limits import start_backend
from cusetpm.testing.bench_load import clients_figure, files_figure
from cusetpm.testing.bench_paths import APIS, abrmd_route, count_commands, direct_route, measure, missing, node_route
from cusetpm.testing.bench_relay import c_relay_route
from cusetpm.testing.bench_report import Figures, report, report_guest
from cusetpm.testing.bench_rig import Rig, serve_offers
from cusetpm.testing.bench_turns import turns_figure, turns_paths

# The relay's frame counting, as tests/test_bench.py checks it.
from cusetpm.testing.relay import CountingRelay, count_frames  # noqa: F401

GUEST_KERNEL = "6.12"  # the guest figure's kernel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    ap.add_argument("--random", type=int, default=100, help="GetRandom calls per batch (default 100)")
    ap.add_argument("--sign", type=int, default=30, help="Sign calls per batch (default 30)")
    ap.add_argument("--warmup", type=int, default=10, help="warm-up calls per op and path (default 10)")
    ap.add_argument("--count", type=int, default=20, help="user commands per op in the counting pass")
    ap.add_argument("--kernel", action="append", help="node kernel profile(s) (default: 6.12 and 6.1)")
    ap.add_argument("--api", choices=APIS, default="tcti",
                    help="the clients' stack: tcti (default; issue 9's TCTI loop) or esapi")  # fmt: skip
    ap.add_argument("--no-abrmd", action="store_true", help="skip tpm2-abrmd")
    ap.add_argument("--no-relay", action="store_true", help="skip the C relay (the whole path in C: bench_relay)")
    ap.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=None,
                    help="also the node with --swap lazy (default: if `cusetpm serve` offers --swap)")  # fmt: skip
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also the node with --cpu (the last CPU): in kernel mode and lazy",
    )
    ap.add_argument("--floor", type=int, default=2000,
                    help="idle requests per repetition, node and C libfuse (default 2000; 0: skip)")  # fmt: skip
    ap.add_argument("--files", type=int, default=1000, help="files open at once on a node (default 1000; 0: skip)")
    ap.add_argument("--files-warmup", type=int, default=10, help="files opened before the first VmRSS (default 10)")
    ap.add_argument("--clients", type=int, default=64, help="client processes at once (default 64; 0: skip)")
    ap.add_argument("--client-seconds", type=float, default=5.0, help="how long they run, per path (default 5)")
    ap.add_argument("--turns", type=int, default=15,
                    help="turns per batch of two clients signing in turn (default 15; 0: skip)")  # fmt: skip
    ap.add_argument("--guest", action=argparse.BooleanOptionalAction, default=True,
                    help="the CUSE node against the kernel's /dev/tpmrm0 in a 6.12 guest (default: on)")  # fmt: skip
    ap.add_argument("--guest-only", action="store_true", help="only the guest figure")
    ap.add_argument("--guest-rounds", type=int, default=5, help="interleaved rounds in the guest (default 5)")
    ap.add_argument("--guest-random", type=int, default=100, help="GetRandom calls per guest batch (default 100)")
    ap.add_argument("--guest-public", type=int, default=50, help="ReadPublic calls per guest batch (default 50)")
    args = ap.parse_args(argv)
    if args.lazy is None:
        args.lazy = serve_offers("--swap")
    if args.pin is None:
        args.pin = serve_offers("--cpu")

    # Leave through the cleanup on SIGTERM/SIGHUP too, not only on Ctrl-C.
    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)

    if args.guest_only:
        fig = run_guest(args)
        print("\n".join(report_guest(fig)))
        return 1 if fig.error else 0
    kernels = args.kernel or ["6.12", "6.1"]
    paths = [direct_route()] + ([] if args.no_relay else [c_relay_route()])
    paths += [node_route(k) for k in kernels] + [node_route(kernels[0], "global")]
    paths += [node_route(kernels[0], extra=("--swap", "lazy"))] if args.lazy else []
    paths += [node_route(kernels[0], "global", extra=("--swap", "lazy"))] if args.lazy else []
    if args.pin:
        cpu = str(max(os.sched_getaffinity(0)))
        paths += [node_route(kernels[0], extra=("--cpu", cpu), label=f"node({kernels[0]},cpu{cpu})")]
        if args.lazy:
            lazy_pinned = ("--swap", "lazy", "--cpu", cpu)
            paths += [node_route(kernels[0], extra=lazy_pinned, label=f"node({kernels[0]},lazy,cpu{cpu})")]
    paths += [] if args.no_abrmd else [abrmd_route()]
    sizes = {"get_random": args.random, "sign": args.sign}
    for p in paths:
        p.error = missing(p)
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    figures = Figures()
    rig = Rig()
    try:
        with rig.phase():
            backend = start_backend(rig, sizes, args.warmup)
            nodes = measure(paths, rig, args.rounds, sizes, args.warmup, each_round=backend.round, api=args.api)
            figures.backend = backend.cost
            if args.floor:
                figures.floor = measure_floors(paths, nodes, rig, args.floor)
        with rig.phase():
            count_commands(paths, rig, args.count, args.api)
        if args.files:
            with rig.phase():
                figures.files = files_figure(rig, kernels[0], args.files, args.files_warmup)
        if args.turns:
            with rig.phase():
                figures.turns = turns_figure(
                    rig, kernels[0], args.rounds, args.turns, args.count,
                    turns_paths(kernels[0], serve_offers("--swap-residents"), not args.no_abrmd), args.api,
                )  # fmt: skip
        if args.clients:
            with rig.phase():
                figures.load = clients_figure(
                    rig, kernels[0], args.clients, args.client_seconds, not args.no_abrmd, args.api
                )
    finally:
        rig.close()
    figures.guest = run_guest(args)
    report(paths, args, time.monotonic() - t0, (load_before, os.getloadavg()[0]), figures)
    failed = any(p.error or p.count_error for p in paths) or figures.failed()
    return 1 if failed else 0


def run_guest(args: argparse.Namespace) -> GuestFigure:
    """The guest figure, last and alone: a guest under TCG takes both CPUs of a small host."""
    if not args.guest:
        return GuestFigure(GUEST_KERNEL, args.guest_rounds, skipped="--no-guest")
    return guest_figure(GUEST_KERNEL, args.guest_rounds, args.guest_random, args.guest_public, args.warmup)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted (everything it started is stopped)", file=sys.stderr)
        sys.exit(130)
