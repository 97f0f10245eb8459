# SPDX-License-Identifier: GPL-2.0-only
"""The command lines: ``cusetpm conformance`` and ``python -m cusetpm.conformance``.

Importing this module costs only argparse: ``cusetpm serve`` builds its parser with
:func:`add_conformance_parser`, so the harness itself is imported inside the functions that
run it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from . import KERNELS, NODE_KINDS

if TYPE_CHECKING:
    from .normalize import GuestRun, Transcript

__all__ = ["add_conformance_parser", "run_conformance", "main"]


def _add_conformance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default="all", choices=[*KERNELS, "all"], help="kernel(s) to compare with")
    p.add_argument("--node", default="fuse", choices=NODE_KINDS, help="which cusetpm node to test")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this scenario (repeatable)")
    p.add_argument("--timeout", type=float, default=1500.0, help="limit for one guest run (seconds)")
    p.add_argument("--json", metavar="FILE", help="also write the raw transcripts to FILE")
    p.add_argument(
        "--serve-arg", action="append", default=[], metavar="ARG", dest="serve_args",
        help="pass ARG to the node's `cusetpm serve` (repeatable), e.g. --serve-arg=--swap --serve-arg=lazy",
    )  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "files",
        nargs="*",
        metavar="SCENARIO_FILE",
        help="scenario files or directories (default: the shipped corpus, cusetpm/conformance/corpus/)",
    )


def add_conformance_parser(subparsers: Any) -> None:
    """Add ``cusetpm conformance`` to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "conformance",
        help="compare cusetpm with the real kernel /dev/tpmrm0 on scenario files (boots qemu guests)",
        description="Run each scenario against the real kernel resource manager and against cusetpm "
        "(each on a fresh TPM, inside a qemu guest per kernel) and print every difference.",
    )
    _add_conformance_args(p)
    p.set_defaults(func=run_conformance)


def run_conformance(args: argparse.Namespace) -> int:
    """``cusetpm conformance``: exit status 0 if identical, 1 if any scenario differs, 2 on
    a usage or rig error."""
    from .. import progress, rig
    from .report import compare
    from .scenario import ParseError, load_scenarios

    progress.configure(quiet=getattr(args, "quiet", False))
    kernels = KERNELS if args.kernel == "all" else (args.kernel,)
    try:
        names = {s.name for s in load_scenarios(args.files)}
        unknown = set(args.only) - names
        if unknown:
            raise ParseError(f"no scenario named {', '.join(sorted(unknown))}")
    except (ParseError, OSError) as exc:
        print(f"cusetpm conformance: {exc}", file=sys.stderr)
        return 2
    total_same = total_diff = 0
    raw: dict[str, GuestRun] = {}
    for k in kernels:
        try:
            c = compare(k, args.files, node=args.node, only=args.only, timeout=args.timeout,
                        serve_args=getattr(args, "serve_args", ()))  # fmt: skip
        except rig.RigError as exc:
            print(f"cusetpm conformance: kernel {k}: {exc}", file=sys.stderr)
            return 2
        print(c.report(), flush=True)
        total_same += c.identical
        total_diff += c.differ
        raw[k] = c.raw
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)
    print(f"{total_same} scenarios identical, {total_diff} differ")
    split = _kernels_disagree(raw) if getattr(args, "kernels_must_agree", False) else 0
    return 1 if total_diff or split else 0


def _kernels_disagree(raw: dict[str, GuestRun]) -> int:
    """``cusetpm check``: print every step the real kernels answer differently, with the rule
    that explains it; the number of scenarios that differ."""
    from .kernel_diff import kernel_differences
    from .normalize import failed_transcript

    if len(raw) < 2:
        return 0
    split = 0
    for name in next(iter(raw.values()))["order"]:
        diffs = kernel_differences(
            name, {k: run["kernel_side"].get(name, failed_transcript("not run")) for k, run in raw.items()}
        )
        for d in diffs:
            print(d.describe())
        split += bool(diffs)
    kernels = " and ".join(raw)
    print(
        f"kernels {kernels}: {split} scenarios differ between them"
        + (" (the program depends on the kernel)" if split else "")
    )
    return split


def _print_transcript(name: str, tr: Transcript) -> None:
    print(f"scenario {name} ({tr['seconds']}s)")
    for i, s in enumerate(tr["steps"], 1):
        mark = "" if s["expect_ok"] is not False else f"   <-- expected {s['expected']}"
        print(f"  {i:3} L{s['line']:<4} {s['op'][:60]:60} -> {s['result']}{mark}")
    if tr["error"]:
        print(f"  ERROR {tr['error']}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cusetpm.conformance``: run, guest, compare, from-strace."""
    import cusetpm.conformance as package

    from .guest import SCENARIO_TIMEOUT, guest_run
    from .runner import run_scenario
    from .scenario import ParseError, load_scenarios
    from .sides import _auto_close_waiter
    from .strace import DEFAULT_NODE_PATTERN, scenario_from_strace

    description = (package.__doc__ or "").splitlines()[0]
    ap = argparse.ArgumentParser(prog="python -m cusetpm.conformance", description=description)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run scenarios against an existing node and print the transcripts")
    r.add_argument("--node", required=True, help="the device or file to open, e.g. /dev/tpmrm0")
    r.add_argument("--kernel", choices=KERNELS, help="check =>6.1 / =>6.12 expectations for this kernel")
    r.add_argument(
        "--close-settle",
        type=float,
        default=0.0,
        help="pause after each close (default: none; on a FUSE file, wait for the RELEASE)",
    )
    r.add_argument("--out", help="write the transcripts as JSON")
    r.add_argument("--only", action="append", default=[])
    r.add_argument("files", nargs="*")
    g = sub.add_parser("guest", help="(inside a rig guest) fresh chip + fresh daemon per scenario")
    g.add_argument("--kernel", required=True, choices=KERNELS)
    g.add_argument("--node", default="fuse", choices=NODE_KINDS)
    g.add_argument("--out", required=True)
    g.add_argument("--only", action="append", default=[])
    g.add_argument("--timeout", type=float, default=SCENARIO_TIMEOUT)
    g.add_argument("--serve-arg", action="append", default=[], dest="serve_args")
    g.add_argument("files", nargs="*")
    _add_conformance_args(sub.add_parser("compare", help="the same as `cusetpm conformance`"))
    s = sub.add_parser("from-strace", help="make a scenario from strace output")
    s.add_argument("log", help="strace output (-f -xx -s 65536), '-' for stdin")
    s.add_argument(
        "--node-pattern",
        default=DEFAULT_NODE_PATTERN,
        help="regular expression that must match the WHOLE path of a node whose calls are kept "
        "(default: %(default)s, i.e. /dev/tpmrmN, cusetpm's FUSE file DIR/tpmrmN and CUSE /dev/cusetpmrmN); "
        "no match at all is an error",
    )
    s.add_argument("--name", default="recorded")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            results: dict[str, Transcript] = {}
            bad = 0
            for sc in load_scenarios(args.files):
                if args.only and sc.name not in args.only:
                    continue
                tr = run_scenario(
                    sc,
                    args.node,
                    kernel=args.kernel,
                    close_settle=args.close_settle,
                    after_close=None if args.close_settle else _auto_close_waiter(args.node),
                )
                results[sc.name] = tr
                bad += any(s["expect_ok"] is False for s in tr["steps"]) or bool(tr["error"])
                _print_transcript(sc.name, tr)
            if args.out:
                with open(args.out, "w") as fh:
                    json.dump(results, fh, indent=1)
            return 1 if bad else 0
        if args.cmd == "guest":
            return guest_run(args.kernel, args.node, args.files, args.out, only=args.only, timeout=args.timeout,
                             serve_args=args.serve_args)  # fmt: skip
        if args.cmd == "compare":
            return run_conformance(args)
        text = sys.stdin.read() if args.log == "-" else Path(args.log).read_text()
        sys.stdout.write(scenario_from_strace(text, args.node_pattern, args.name))
        return 0
    except (ParseError, ValueError, OSError) as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
