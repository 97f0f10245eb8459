# SPDX-License-Identifier: GPL-2.0-only
"""The ``cusetpm`` command line."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import AsyncIterator, Sequence

import trio

from .backends import BackendError, TctiBackend, managed_swtpm
from .device import Backend, TpmDevice
from .profiles import DEFAULT_PROFILE, PROFILES, get_profile
from .tpm2_cmd import ChipInitError

log = logging.getLogger("cusetpm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cusetpm", description="A user-space /dev/tpmrm0.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a TPM resource-manager node")
    serve.add_argument("--fuse", metavar="DIR", help="serve DIR/NAME as a FUSE file")
    serve.add_argument("--name", default="tpmrm0", help="name of the node (default: tpmrm0)")
    serve.add_argument("--mode", default="0660", help="file mode of the node (octal, default 0660)")
    serve.add_argument(
        "--kernel", default=DEFAULT_PROFILE, choices=sorted(PROFILES), help="kernel behaviour to reproduce"
    )
    serve.add_argument("--tcti", metavar="CONF", help="backing TPM as a tpm2-tss TCTI, e.g. swtpm:port=2321")
    serve.add_argument("--state-dir", type=Path, help="state directory of the managed swtpm")
    serve.add_argument("-v", "--verbose", action="count", default=0)
    return parser


@contextlib.asynccontextmanager
async def open_backend(args: argparse.Namespace) -> AsyncIterator[Backend]:
    if args.tcti:
        backend = TctiBackend(args.tcti)
        try:
            yield backend
        finally:
            await backend.aclose()
    else:
        async with managed_swtpm(args.state_dir) as sock_backend:
            yield sock_backend


async def serve(args: argparse.Namespace) -> int:
    from .fuse_fs import serve_fuse

    profile = get_profile(args.kernel)
    if not args.fuse:
        raise BackendError("give --fuse DIR (the CUSE node is not available in this build)")
    async with open_backend(args) as backend:
        device = TpmDevice(backend, profile)
        with trio.fail_after(30):
            await device.register()
        async with trio.open_nursery() as nursery:
            await nursery.start(device.serve)
            await nursery.start(lambda task_status: serve_fuse(
                device, args.fuse, name=args.name, mode=int(args.mode, 8), task_status=task_status))
            node = os.path.join(os.path.abspath(args.fuse), args.name)
            print(f"cusetpm: serving {node} (FUSE, kernel {profile.name})", flush=True)
            print(f"  export TPM2TOOLS_TCTI=device:{node}", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    log.info("shutting down")
                    nursery.cancel_scope.cancel()
                    break
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2), format="cusetpm: %(levelname)s %(name)s: %(message)s"
    )
    try:
        return trio.run(serve, args)
    except (BackendError, ChipInitError, trio.TooSlowError, ValueError, OSError) as exc:
        message = "the backing TPM did not answer in time" if isinstance(exc, trio.TooSlowError) else str(exc)
        print(f"cusetpm: error: {message}", file=sys.stderr)
        return 1
