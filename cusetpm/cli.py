# SPDX-License-Identifier: GPL-2.0-only
"""The ``cusetpm`` command line."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

import trio

from .backends import BackendError, open_backend
from .daemon import Node, TpmChip
from .kernel.profiles import DEFAULT_PROFILE, PROFILES, get_profile
from .kernel.tpm2_cmd import ChipInitError

log = logging.getLogger("cusetpm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cusetpm", description="A user-space /dev/tpmrm0.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a TPM resource-manager node")
    serve.add_argument(
        "--node", choices=("auto", "cuse", "fuse"), default="auto",
        help="auto (default): a CUSE device where /dev/cuse works, else a FUSE file",
    )  # fmt: skip
    serve.add_argument("--cuse", metavar="NAME", help="serve /dev/NAME as a CUSE character device")
    serve.add_argument("--fuse", metavar="DIR", help="serve DIR/NAME as a FUSE file")
    serve.add_argument("--name", help="name of the FUSE file (default: tpmrm0)")
    serve.add_argument("--major", type=int, default=0, help="CUSE device major (default: the kernel picks)")
    serve.add_argument("--minor", type=int, default=0, help="CUSE device minor")
    serve.add_argument("--mode", default="0660", help="file mode of the node (octal, default 0660)")
    serve.add_argument("--owner", help="owner of the node (user name or uid; default: the daemon's)")
    serve.add_argument("--group", help="group of the node (group name or gid; default: the daemon's)")
    serve.add_argument(
        "--kernel", default=DEFAULT_PROFILE, choices=sorted(PROFILES), help="kernel behaviour to reproduce"
    )
    serve.add_argument("--tcti", metavar="CONF", help="backing TPM as a tpm2-tss TCTI, e.g. swtpm:port=2321")
    serve.add_argument("--state-dir", type=Path, help="state directory of the managed swtpm")
    serve.add_argument(
        "--ready-fd", type=int, metavar="N",
        help="once the node serves, write its path and a newline to file descriptor N and close it",
    )  # fmt: skip
    serve.add_argument("-v", "--verbose", action="count", default=0)
    # Only the parser: the harness itself is imported when `conformance` runs.
    from .conformance.cli import add_conformance_parser

    add_conformance_parser(sub)
    from .record import add_parsers as add_record_parsers

    add_record_parsers(sub)
    return parser


def default_fuse_dir() -> str:
    """Where ``--node auto`` puts the FUSE file: the user's runtime dir, /run for root."""
    if os.getuid() == 0:
        return "/run/cusetpm"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/cusetpm-{os.getuid()}", "cusetpm", "node")


def cuse_usable() -> bool:
    """Can this process create CUSE devices?  (cuse.ko loaded and /dev/cuse writable.)"""
    try:
        os.close(os.open("/dev/cuse", os.O_RDWR | os.O_CLOEXEC))
        return True
    except OSError:
        return False


def choose_node(args: argparse.Namespace) -> tuple[str, str]:
    """("cuse", NAME) or ("fuse", DIR) from the options; auto prefers CUSE."""
    if args.cuse and args.fuse:
        raise ValueError("give --cuse NAME or --fuse DIR, not both")
    kind = "cuse" if args.cuse else "fuse" if args.fuse else args.node
    if kind == "auto":
        kind = "cuse" if cuse_usable() else "fuse"
        why = "/dev/cuse works" if kind == "cuse" else "this kernel has no usable /dev/cuse"
        print(f"cusetpm: --node auto: {kind.upper()} ({why})", flush=True)
    if kind == "cuse":
        name = args.cuse or args.name or ("tpmrm0" if not os.path.exists("/dev/tpmrm0") else "cusetpmrm0")
        return "cuse", name
    return "fuse", args.fuse or default_fuse_dir()


def _uid(value: str | None) -> int | None:
    import pwd

    return None if value is None else int(value) if value.isdigit() else pwd.getpwnam(value).pw_uid


def _gid(value: str | None) -> int | None:
    import grp

    return None if value is None else int(value) if value.isdigit() else grp.getgrnam(value).gr_gid


async def serve(args: argparse.Namespace) -> int:
    profile = get_profile(args.kernel)
    kind, where = choose_node(args)
    mode = int(args.mode, 8)
    async with open_backend(args.tcti, args.state_dir) as backend:
        chip = TpmChip(backend)
        with trio.fail_after(30):
            await chip.register()
        # The signal receiver is open before anyone is told the node serves, so a SIGTERM
        # sent right after the ready line is a clean shutdown, not the default death.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(chip.serve)
                if kind == "cuse":
                    from .frontends.cuse import serve_cuse

                    node = Node(chip, profile, where)
                    path = os.path.join("/dev", where)
                    await nursery.start(functools.partial(
                        serve_cuse, node, where, major=args.major, minor=args.minor, mode=mode,
                        owner=_uid(args.owner), group=_gid(args.group)))  # fmt: skip
                else:
                    from .frontends.fuse import serve_fuse

                    node = Node(chip, profile, args.name or "tpmrm0")
                    path = os.path.join(os.path.abspath(where), node.name)
                    await nursery.start(functools.partial(
                        serve_fuse, node, where, name=node.name, mode=mode,
                        owner=_uid(args.owner), group=_gid(args.group)))  # fmt: skip
                print(f"cusetpm: serving {path} ({kind.upper()}, kernel {profile.name})", flush=True)
                print(f"  export TPM2TOOLS_TCTI=device:{path}", flush=True)
                if args.ready_fd is not None:
                    signal_ready(args.ready_fd, path)
                async for _ in signals:
                    log.info("shutting down")
                    nursery.cancel_scope.cancel()
                    break
    return 0


def signal_ready(fd: int, path: str) -> None:
    """``--ready-fd``: one line, the node's path, then EOF, so a parent waits on a pipe
    instead of scraping the output."""
    try:
        os.write(fd, path.encode() + b"\n")
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("record", "check"):
        from .record import run_check, run_record

        return run_record(args) if args.command == "record" else run_check(args)
    if args.command == "conformance":
        from .conformance.cli import run_conformance

        return run_conformance(args)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2), format="cusetpm: %(levelname)s %(name)s: %(message)s"
    )
    try:
        return trio.run(serve, args)
    except (BackendError, ChipInitError, trio.TooSlowError, ValueError, KeyError, OSError) as exc:
        message = "the backing TPM did not answer in time" if isinstance(exc, trio.TooSlowError) else str(exc)
        print(f"cusetpm: error: {message}", file=sys.stderr)
        return 1
