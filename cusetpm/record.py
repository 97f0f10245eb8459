# SPDX-License-Identifier: GPL-2.0-only
"""``cusetpm record`` and ``cusetpm check``: test a program against the kernels' RM semantics.

``record`` serves a node (FUSE, on its own fresh swtpm), runs the program with the usual
variables pointing at it, and writes what the daemon saw as a conformance scenario
(:class:`cusetpm.daemon.recorder.Recorder`).  The program's exit status is passed through.
``check -- PROGRAM`` runs the program itself on a fresh node here and on each real kernel's
/dev/tpmrm0 in its qemu guest, traced, and compares what it observed
(:mod:`cusetpm.conformance.live_run`); ``check FILE.scn`` replays a scenario against the kernels
and the node, through ``cusetpm conformance``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator

import trio

from .backends import open_backend
from .daemon import Node, TpmChip
from .daemon.recorder import Recorder
from .kernel.profiles import DEFAULT_PROFILE, PROFILES, get_profile

#: The variables that point common clients at the node.
TCTI_VARIABLES = ("TPM2TOOLS_TCTI", "TPM2OPENSSL_TCTI", "TPM2_PKCS11_TCTI", "TCTI")


def client_environment(node: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ours) with every TCTI variable set to ``device:NODE`` and
    ``CUSETPM_DEVICE=NODE`` for programs that open the device themselves (go-tpm, say)."""
    env = dict(os.environ if base is None else base)
    env.update({name: f"device:{node}" for name in TCTI_VARIABLES})
    env["CUSETPM_DEVICE"] = node
    return env


def scenario_name(program: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(program[0])) or "recorded"


def node_kind(requested: str) -> str:
    """``auto``: a CUSE device where this kernel allows it (as ``serve --node auto``), else FUSE."""
    if requested != "auto":
        return requested
    from .cli import cuse_usable

    return "cuse" if cuse_usable() else "fuse"


@contextlib.asynccontextmanager
async def serving(
    kernel: str = DEFAULT_PROFILE, tcti: str | None = None, node_kind: str = "fuse", recorder: Recorder | None = None
) -> AsyncIterator[str]:
    """A fresh node (``node_kind`` "fuse" or "cuse", on its own fresh swtpm unless ``tcti``)
    while the body runs; yields its path.  On the way out it waits for the last closes (FUSE
    sends RELEASE after close() returned), so what the body's programs did is all done."""
    profile = get_profile(kernel)
    with tempfile.TemporaryDirectory(prefix="cusetpm-record-") as tmp:
        async with open_backend(tcti, Path(tmp) / "swtpm") as backend:
            chip = TpmChip(backend)
            with trio.fail_after(30):
                await chip.register()
            node = Node(chip, profile)
            node.recorder = recorder
            async with trio.open_nursery() as nursery:
                await nursery.start(chip.serve)
                if node_kind == "cuse":
                    from .frontends.cuse import serve_cuse

                    name = f"cusetpm-record{os.getpid()}"
                    await nursery.start(functools.partial(serve_cuse, node, name, mode=0o600))
                    path = os.path.join("/dev", name)
                else:
                    from .frontends.fuse import serve_fuse

                    mnt = os.path.join(tmp, "mnt")
                    await nursery.start(serve_fuse, node, mnt)
                    path = os.path.join(mnt, node.name)
                yield path
                with trio.move_on_after(5):
                    while node.files:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()


async def record(program: list[str], *, kernel: str = DEFAULT_PROFILE, tcti: str | None = None,
                 program_stdout: int | None = None, node_kind: str = "fuse") -> tuple[int, str]:  # fmt: skip
    """Run ``program`` against a fresh node (``node_kind`` "fuse" or "cuse"); returns its exit
    status and the scenario."""
    recorder = Recorder()
    async with serving(kernel, tcti, node_kind, recorder) as path:
        proc = await trio.run_process(
            program, env=client_environment(path), check=False, stdin=None, stdout=program_stdout
        )
    header = f"recorded by cusetpm record (kernel {kernel}, {node_kind.upper()}): {subprocess.list2cmdline(program)}"
    return proc.returncode, recorder.scenario(scenario_name(program), header)


def add_parsers(sub: Any) -> None:
    """``cusetpm record`` and ``cusetpm check``."""
    for name, help_ in (
        ("record", "run a program against a node and write what it did as a scenario"),
        ("check", "run a program (or replay a .scn file) on the node and on the real kernels and compare"),
    ):
        p = sub.add_parser(name, help=help_)
        if name == "record":
            p.add_argument("--kernel", default=DEFAULT_PROFILE, choices=sorted(PROFILES), help="profile to serve")
            p.add_argument(
                "--node",
                default="auto",
                choices=("auto", "fuse", "cuse"),
                help="serve a CUSE /dev node or a FUSE file (default auto: CUSE where /dev/cuse works)",
            )
            p.add_argument("-o", "--output", metavar="FILE", help="write the scenario here (default: stdout)")
        else:
            p.add_argument("--kernel", default="all", choices=[*sorted(PROFILES), "all"], help="kernel(s)")
            p.add_argument(
                "--node",
                default="auto",
                choices=("auto", "fuse", "cuse"),
                help="which cusetpm node to compare (default auto: for a program, CUSE where this host's "
                "/dev/cuse works, else FUSE; for a .scn, FUSE in the guest)",
            )
            p.add_argument(
                "--timeout", type=float, default=1500.0, help="limit for one guest run and for the program (seconds)"
            )
        p.add_argument("--tcti", metavar="CONF", help="the node's backing TPM (default: a fresh swtpm)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
        p.add_argument(
            "program",
            nargs=argparse.REMAINDER,
            help="-- PROGRAM [ARGS...]" if name == "record" else "-- PROGRAM [ARGS...] or FILE.scn",
        )


def _program(args: argparse.Namespace) -> list[str]:
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise SystemExit(f"cusetpm {args.command}: give a program after --")
    return list(program)


def _missing(program: list[str]) -> bool:
    """A program the shell could not start: said once, exit status 127 as a shell gives."""
    if shutil.which(program[0]) is None:
        print(f"cusetpm: {program[0]}: command not found", file=sys.stderr)
        return True
    return False


def run_record(args: argparse.Namespace) -> int:
    from . import progress

    progress.configure(quiet=args.quiet)
    program = _program(args)
    # The scenario goes to stdout unless -o is given; then the program keeps stdout itself.
    out_fd = None if args.output else sys.stderr.fileno()
    if _missing(program):
        return 127
    kind = node_kind(args.node)
    rc, text = trio.run(
        lambda: record(program, kernel=args.kernel, tcti=args.tcti, program_stdout=out_fd, node_kind=kind)
    )
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return rc


def run_check(args: argparse.Namespace) -> int:
    """Exit status 0 only if the node and every chosen kernel agree on every step, and the
    kernels agree with each other (a program that depends on the kernel is a finding).

    ``check -- PROGRAM`` runs the program itself in every environment (live,
    :mod:`cusetpm.conformance.live_run`); ``check FILE.scn`` replays a scenario
    (``cusetpm conformance``)."""
    from . import progress
    from .conformance.cli import run_conformance

    progress.configure(quiet=args.quiet)
    program = _program(args)
    if len(program) == 1 and program[0].endswith(".scn") and os.path.isfile(program[0]):
        conf = argparse.Namespace(
            kernel=args.kernel,
            node="fuse" if args.node == "auto" else args.node,
            only=[],
            timeout=args.timeout,
            json=None,
            files=[program[0]],
            kernels_must_agree=True,
            quiet=args.quiet,
        )
        return run_conformance(conf)
    if _missing(program):
        return 127
    from .conformance.live_run import check_live

    kernels = list(PROFILES) if args.kernel == "all" else [args.kernel]
    return check_live(program, kernels, node_kind=node_kind(args.node), tcti=args.tcti, timeout=args.timeout)
