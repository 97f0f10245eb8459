# SPDX-License-Identifier: GPL-2.0-only
"""``python -m cusetpm.rig {fetch,run,shell}``: prefetch kernels, debug boots by hand."""

from __future__ import annotations

import argparse
import sys

from .kernels import KERNELS, RigError, ensure_kernel
from .prelude import guest_swtpm_prelude
from .qemu import run_in_guest, run_interactive

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """CLI for prefetching kernels and debugging boots by hand."""
    import cusetpm.rig as package

    description = (package.__doc__ or "").splitlines()[0]
    ap = argparse.ArgumentParser(prog="python -m cusetpm.rig", description=description)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download/extract kernels into the cache")
    f.add_argument("versions", nargs="*", default=list(KERNELS))
    r = sub.add_parser("run", help="run a command in a guest, print its output")
    r.add_argument("version", choices=KERNELS)
    r.add_argument("command")
    r.add_argument("--timeout", type=float, default=600)
    r.add_argument("--share")
    r.add_argument("--swtpm", action="store_true", help="prefix the swtpm prelude")
    r.add_argument("--console", action="store_true", help="also print the console log")
    s = sub.add_parser("shell", help="interactive shell in a guest (Ctrl-A x quits)")
    s.add_argument("version", choices=KERNELS)
    s.add_argument("--share")
    s.add_argument("--swtpm", action="store_true", help="run the swtpm prelude first")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            for v in args.versions:
                k = ensure_kernel(v)
                print(f"{v}: {k.package} {k.package_version} release={k.release} {k.vmlinuz}")
            return 0
        if args.cmd == "run":
            cmd = (guest_swtpm_prelude() + " && " + args.command) if args.swtpm else args.command
            res = run_in_guest(args.version, cmd, timeout=args.timeout, share=args.share)
            if args.console:
                sys.stderr.write(res.console)
            sys.stdout.write(res.output)
            print(f"[rig: rc={res.returncode} {res.seconds:.1f}s]", file=sys.stderr)
            return res.returncode
        cmd = (guest_swtpm_prelude() + "; exec /bin/bash -i") if args.swtpm else "exec /bin/bash -i"
        return run_interactive(args.version, cmd, share=args.share)
    except RigError as exc:
        print(exc, file=sys.stderr)
        return 125
