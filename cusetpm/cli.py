# SPDX-License-Identifier: GPL-2.0-only
"""The ``cusetpm`` command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

import trio

from .backends import BackendError, open_backend
from .daemon import TpmChip
from .daemon.control import serve_control
from .kernel.profiles import DEFAULT_PROFILE, PROFILES
from .kernel.seam import Seam
from .kernel.tpm2_cmd import ChipInitError
from .serve import Tenants
from .tenants.config import ConfigError, DaemonConfig, check_cpu, check_spin
from .tenants.config import from_args as config_from_args
from .tenants.config import load as load_config

log = logging.getLogger("cusetpm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cusetpm", description="A user-space /dev/tpmrm0.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a TPM resource-manager node")
    serve.add_argument(
        "--node", choices=("auto", "cuse", "fuse"), default="auto",
        help="auto (default): a CUSE device where /dev/cuse works, else a FUSE file",
    )  # fmt: skip
    serve.add_argument(
        "--config", metavar="FILE",
        help="serve the tenant nodes FILE describes (TOML; see README, 'Tenants'); SIGHUP rereads it",
    )  # fmt: skip
    serve.add_argument("--cuse", metavar="NAME", help="serve /dev/NAME as a CUSE character device")
    serve.add_argument("--fuse", metavar="DIR", help="serve DIR/NAME as a FUSE file")
    serve.add_argument("--name", help="name of the FUSE file (default: tpmrm0)")
    serve.add_argument(
        "--fuse-lib", choices=("channel", "pyfuse3"),
        help="what serves the FUSE directory: channel (default, the node's own request loop, "
        "as the CUSE device's) or pyfuse3",
    )  # fmt: skip
    serve.add_argument(
        "--spin-us", type=float, metavar="US",
        help="how long the request loop keeps polling for the next request, and a client alone's "
        "command the TPM's socket for its answer, before sleeping (default 100; 0: sleep at once, "
        "and never write a kernel TPM device blocking); see README, 'The request path'",
    )  # fmt: skip
    serve.add_argument(
        "--cpu", type=int, metavar="N",
        help="run the daemon, and the swtpm it starts, on CPU N only; see README, 'The request path'",
    )  # fmt: skip
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
    serve.add_argument(
        "--swap", choices=("kernel", "lazy"), default="kernel",
        help="kernel (default): save and flush a file's contexts after every command, as the kernel does; "
        "lazy: keep the last file's loaded until another file needs the TPM",
    )  # fmt: skip
    serve.add_argument(
        "--swap-residents", type=int, default=1, metavar="N",
        help="--swap lazy: how many files may stay loaded at once (default 1: the TPM never holds more "
        "than during one of the kernel's commands); see README, 'Lazy context swapping'",
    )  # fmt: skip
    add_session_options(serve)
    serve.add_argument(
        "--control", metavar="PATH", default=None,
        help="the control socket `cusetpm status` asks (mode 0600; default: cusetpm/control.sock in the "
        "runtime dir, /run/cusetpm-control.sock for root); 'off': none",
    )  # fmt: skip
    serve.add_argument(
        "--metrics", metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: none; nothing listens)",
    )  # fmt: skip
    serve.add_argument("-v", "--verbose", action="count", default=0)
    # Only the parser: the harness itself is imported when `conformance` runs.
    from .conformance.cli import add_conformance_parser

    add_conformance_parser(sub)
    from .status import add_parser as add_status_parser

    add_status_parser(sub)
    from .record import add_parsers as add_record_parsers

    add_record_parsers(sub)
    return parser


def add_session_options(serve: argparse.ArgumentParser) -> None:
    """``--sessions`` and its settings (issue 7); kernel, the default, installs no seam."""
    serve.add_argument(
        "--sessions", choices=("kernel", "global"), default="kernel",
        help="kernel (default): the kernel's per-file sessions, byte for byte; global: global session "
        "accounting (eviction of idle sessions, fair waiting, isolation)",
    )  # fmt: skip
    serve.add_argument(
        "--session-tracking", choices=("strict", "lazy"), default="strict",
        help="global: read every destroying command (strict, default) or notice a dead session only "
        "when saving or loading it fails (lazy)",
    )  # fmt: skip
    serve.add_argument(
        "--session-idle", type=float, default=2.0, metavar="SECONDS",
        help="global: a session is evictable once unused this long (default 2)",
    )  # fmt: skip
    serve.add_argument(
        "--session-wait", type=float, default=5.0, metavar="SECONDS",
        help="global: how long a StartAuthSession waits for a slot (default 5, 0: never)",
    )  # fmt: skip
    serve.add_argument(
        "--session-quota-uid", type=int, default=0, metavar="N",
        help="global: sessions one uid may hold over all its files, attached or self-saved (default 0: no limit)",
    )  # fmt: skip
    serve.add_argument(
        "--session-quota-file", type=int, default=3, metavar="N",
        help="global: sessions one file may hold, 1..3 (default 3, the kernel's table)",
    )  # fmt: skip
    serve.add_argument(
        "--session-quota-detached", type=int, default=8, metavar="N",
        help="global: sessions one file may hold context-saved itself (default 8)",
    )  # fmt: skip
    serve.add_argument(
        "--session-status", type=Path, metavar="FILE",
        help="global: on SIGUSR1 write the session registry's status to FILE as JSON (default: to stdout)",
    )  # fmt: skip


def write_session_status(seam: Seam | None, path: Path | None) -> None:
    """SIGUSR1 under ``--sessions global``: the registry's snapshot as one JSON document,
    replacing ``path`` whole (or one stdout line), so a reader never sees half of it."""
    import json

    snapshot = getattr(seam, "snapshot", None)
    if snapshot is None:
        return
    text = json.dumps(snapshot(), sort_keys=True)
    if path is None:
        print(f"cusetpm: sessions {text}", flush=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


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


def daemon_config(args: argparse.Namespace) -> tuple[DaemonConfig, str]:
    """The config (``--config FILE``, or the command line's one node) and the front end."""
    if args.config:
        config = dataclasses.replace(load_config(args.config), **command_line_overrides(args))
        kind = config.front
        if kind == "auto":
            kind = "cuse" if cuse_usable() else "fuse"
            why = "/dev/cuse works" if kind == "cuse" else "this kernel has no usable /dev/cuse"
            print(f"cusetpm: [front] node auto: {kind.upper()} ({why})", flush=True)
        return config, kind
    kind, where = choose_node(args)
    return config_from_args(args, kind, where), kind


def command_line_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--control, --metrics, --fuse-lib, --spin-us and --cpu given with --config win over the
    file's (a test harness, a unit file's drop-in); a reload keeps them."""
    given = {
        key: value
        for key in ("control", "metrics", "fuse_lib", "spin_us", "cpu")
        if (value := getattr(args, key, None)) is not None
    }
    if "spin_us" in given:
        given["spin_us"] = check_spin(given["spin_us"])
    if "cpu" in given:
        given["cpu"] = check_cpu(given["cpu"])
    return given


async def serve(args: argparse.Namespace) -> int:
    config, kind = daemon_config(args)
    if config.cpu is not None:
        # Before anything starts: threads made later, and the managed swtpm, inherit it.
        os.sched_setaffinity(0, {config.cpu})
    control, control_path = open_control(config.control)
    metrics = None
    tenants: Tenants | None = None
    try:
        async with open_backend(config.tcti, config.state_dir) as backend:
            chip = TpmChip(backend)
            with trio.fail_after(30):
                await chip.register()
            tenants = Tenants(chip, config, kind, major=args.major, minor=args.minor,
                              overrides=command_line_overrides(args))  # fmt: skip
            if config.metrics:
                from .daemon.metrics import Metrics

                tenants.metrics = metrics = Metrics(chip, tenants.nodes)
            # The signal receiver is open before anyone is told the node serves, so a SIGTERM
            # sent right after the ready line is a clean shutdown, not the default death.
            wanted = [signal.SIGINT, signal.SIGTERM]
            if any(nc.sessions == "global" for nc in config.nodes):
                wanted.append(signal.SIGUSR1)  # kernel mode: SIGUSR1 as before
            if config.path is not None:
                wanted.append(signal.SIGHUP)
            with trio.open_signal_receiver(*wanted) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(chip.serve)
                    await tenants.start(nursery)
                    paths = [tenants.path(nc.name) for nc in config.nodes]
                    for nc, path in zip(config.nodes, paths, strict=True):
                        features = ", swap lazy" if config.swap == "lazy" else ""
                        features += f" ({config.swap_residents} resident)" if config.swap_residents > 1 else ""
                        features += ", sessions global" if nc.sessions == "global" else ""
                        features += ", tenant" if config.path is not None else ""
                        features += ", pyfuse3" if kind == "fuse" and config.fuse_lib == "pyfuse3" else ""
                        print(f"cusetpm: serving {path} ({kind.upper()}, kernel {nc.kernel}{features})", flush=True)
                        print(f"  export TPM2TOOLS_TCTI=device:{path}", flush=True)
                    if control is not None:
                        nursery.start_soon(serve_control, chip, tenants.nodes, control, control_path)
                    if metrics is not None:
                        metrics.listen(config.metrics or "")
                    if args.ready_fd is not None:
                        signal_ready(args.ready_fd, paths[0])
                    async for signum in signals:
                        if signum == signal.SIGUSR1:
                            write_session_status(tenants.sessions_seam, args.session_status)
                            continue
                        if signum == signal.SIGHUP:
                            await tenants.reload()
                            continue
                        log.info("shutting down")
                        nursery.cancel_scope.cancel()
                        break
    finally:
        if tenants is not None:
            tenants.close()
        if metrics is not None:
            metrics.close()
        if control is not None:  # the daemon did not get as far as serving it
            control.close()
            with contextlib.suppress(OSError):
                os.unlink(control_path)
    return 0


def open_control(option: str | None) -> tuple[socket.socket | None, str]:
    """``--control``: the bound status socket (None for ``off``).  The default path taken by
    another live daemon is only a warning; a path asked for is an error."""
    from .daemon.control import ControlInUse, bind_control, default_control_path

    path = option or default_control_path()
    if option == "off":
        return None, path
    try:
        sock = bind_control(path)
    except ControlInUse as exc:
        if option:
            raise
        log.warning("no control socket: %s", exc)
        return None, path
    log.info("control socket %s", path)
    return sock, path


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
    if args.command == "status":
        from .status import run_status

        return run_status(args)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2), format="cusetpm: %(levelname)s %(name)s: %(message)s"
    )
    try:
        return trio.run(serve, args)
    except (BackendError, ChipInitError, ConfigError, trio.TooSlowError, ValueError, KeyError, OSError) as exc:
        message = "the backing TPM did not answer in time" if isinstance(exc, trio.TooSlowError) else str(exc)
        print(f"cusetpm: error: {message}", file=sys.stderr)
        return 1
