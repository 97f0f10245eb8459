#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""How much a user command costs through the cusetpm node, against swtpm direct and tpm2-abrmd.

``make bench`` runs this.  One client stack for every path (tpm2-pytss ESAPI over a tpm2-tss
TCTI), so only the path differs:

* direct: ``swtpm`` TCTI to a swtpm,
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

Prints; never asserts on speed.  Exits 1 only if some part failed to run.

The parts live in cusetpm.testing: bench_rig (processes), bench_paths (client, paths,
measuring), bench_report (the tables); swtpm, daemon and relay are the test support's own.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from cusetpm.testing.bench_paths import abrmd_route, count_commands, direct_route, measure, missing, node_route
from cusetpm.testing.bench_report import report
from cusetpm.testing.bench_rig import Rig

# The relay's frame counting, as tests/test_bench.py checks it.
from cusetpm.testing.relay import CountingRelay, count_frames  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    ap.add_argument("--random", type=int, default=100, help="GetRandom calls per batch (default 100)")
    ap.add_argument("--sign", type=int, default=30, help="Sign calls per batch (default 30)")
    ap.add_argument("--warmup", type=int, default=10, help="warm-up calls per op and path (default 10)")
    ap.add_argument("--count", type=int, default=20, help="user commands per op in the counting pass")
    ap.add_argument("--kernel", action="append", help="node kernel profile(s) (default: 6.12 and 6.1)")
    ap.add_argument("--no-abrmd", action="store_true", help="skip tpm2-abrmd")
    args = ap.parse_args(argv)

    # Leave through the cleanup on SIGTERM/SIGHUP too, not only on Ctrl-C.
    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)

    kernels = args.kernel or ["6.12", "6.1"]
    paths = [direct_route()] + [node_route(k) for k in kernels] + [node_route(kernels[0], "global")]
    paths += [] if args.no_abrmd else [abrmd_route()]
    sizes = {"get_random": args.random, "sign": args.sign}
    for p in paths:
        p.error = missing(p)
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    rig = Rig()
    try:
        with rig.phase():
            measure(paths, rig, args.rounds, sizes, args.warmup)
        with rig.phase():
            count_commands(paths, rig, args.count)
    finally:
        rig.close()
    report(paths, args, time.monotonic() - t0, (load_before, os.getloadavg()[0]))
    failed = any(p.error or p.count_error for p in paths)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted (everything it started is stopped)", file=sys.stderr)
        sys.exit(130)
