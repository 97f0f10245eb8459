# SPDX-License-Identifier: GPL-2.0-only
"""Live checking, the running: ``cusetpm check -- PROGRAM`` runs the program itself under
``strace -f -xx -s 65536`` against a fresh node on this host and against each kernel's genuine
/dev/tpmrm0 in its guest, and compares what it observed (:mod:`.live`).

A replay sends the recorded bytes again, and a TPM's randomness is not in them: HMAC and salted
sessions get other nonces, and a context saved by one process was issued by the recording TPM.
Running the program itself in every environment gives each its own nonces and contexts, as a
user's run would.  Each environment gets a fresh TPM, a fresh empty working directory (programs
write files such as ``p.ctx``), stdin from /dev/null and the same environment variables, with
those of :func:`cusetpm.record.client_environment` pointing at its device.

``python -m cusetpm.conformance.live_run`` is the in-guest driver (:func:`guest_main`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .. import progress
from .live import LiveRun, compare_live, failed_run
from .sides import KernelChip, SideError
from .strace import observe_strace

__all__ = ["STRACE", "run_traced", "node_run", "kernel_run", "check_live", "guest_main"]

#: How every environment traces the program (the converter needs -xx and whole strings).
STRACE = ("strace", "-f", "-xx", "-s", "65536")
#: How much of the program's output is kept for the report.
OUTPUT_TAIL = 4000
#: Seconds of a guest run's limit kept for booting and reporting, not for the program.
GUEST_OVERHEAD = 120.0


def run_traced(
    program: Sequence[str], env: dict[str, str], cwd: str, trace: str, output: str, timeout: float
) -> tuple[int | None, str | None]:
    """Run ``program`` under :data:`STRACE` (``-o trace``) in ``cwd``, stdin /dev/null, stdout
    and stderr to ``output``; returns its exit status (None if it had to be killed) and why
    not.  The same function runs on the host and in the guest, so both run it alike."""
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            [*STRACE, "-o", trace, "--", *program],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: a timeout kills the program's children too
        )
        try:
            return proc.wait(timeout), None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, f"the program did not finish in {timeout:.0f} s (killed)"


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-OUTPUT_TAIL:].decode(errors="replace")


def _observed(status: int | None, error: str | None, trace: Path, output: Path, node: str) -> LiveRun:
    """A run from its trace: the calls on ``node`` (its exact path) and what they got."""
    try:
        steps = observe_strace(trace.read_text(errors="replace"), re.escape(node))
    except (OSError, ValueError) as exc:
        return failed_run(f"cannot read the program's trace: {exc}")
    return {"status": status, "steps": steps, "error": error, "output": _tail(output)}


def node_run(program: Sequence[str], env: dict[str, str], kernel: str, *, node_kind: str, tcti: str | None,
             workdir: Path, timeout: float) -> LiveRun:  # fmt: skip
    """The program against a fresh node on this host serving ``kernel``'s profile."""
    import trio

    from ..record import client_environment, serving

    workdir.mkdir(parents=True)
    (workdir / "cwd").mkdir()
    trace, output = workdir / "trace", workdir / "output"

    async def go() -> tuple[int | None, str | None, str]:
        async with serving(kernel, tcti, node_kind) as path:
            status, error = await trio.to_thread.run_sync(
                run_traced, program, client_environment(path, env), str(workdir / "cwd"), str(trace), str(output),
                timeout,
            )  # fmt: skip
        return status, error, path

    try:
        status, error, path = trio.run(go)
    except Exception as exc:  # noqa: BLE001 - the node could not be served: reported as this side's error
        return failed_run(f"cannot serve a node: {type(exc).__name__}: {exc}")
    return _observed(status, error, trace, output, path)


def kernel_run(program: Sequence[str], env: dict[str, str], kernel: str, *, timeout: float) -> LiveRun:
    """The program against ``kernel``'s own /dev/tpmrm0: one guest boot (:func:`guest_main`
    inside it, a fresh swtpm behind vtpm_proxy).  A guest that gives no result raises
    :class:`cusetpm.rig.RigError`."""
    from .. import rig

    with tempfile.TemporaryDirectory(prefix="cusetpm-check-") as share:
        request = {"program": list(program), "env": env, "timeout": max(30.0, timeout - GUEST_OVERHEAD)}
        Path(share, "request.json").write_text(json.dumps(request))
        repo = str(Path(__file__).resolve().parents[2])  # the directory holding the cusetpm package
        argv = [sys.executable, "-m", "cusetpm.conformance.live_run", "--kernel", kernel, "--share", share]
        command = f"cd {shlex.quote(repo)} && " + " ".join(shlex.quote(a) for a in argv)
        res = rig.run_in_guest(kernel, command, timeout=timeout, share=share)
        result_path = Path(share, "result.json")
        if res.returncode != 0 or not result_path.exists():
            raise rig.RigError(
                f"check: the in-guest run failed (status {res.returncode}):\n{res.output[-6000:]}"
                f"\n--- console tail ---\n{res.console[-3000:]}"
            )
        result = json.loads(result_path.read_text())
        if result.get("node") is None:
            return failed_run(result.get("error") or "no kernel device")
        return _observed(result["status"], result["error"], Path(share, "trace"), Path(share, "output"), result["node"])


def check_live(program: Sequence[str], kernels: Sequence[str], *, node_kind: str, tcti: str | None,
               timeout: float) -> int:  # fmt: skip
    """``cusetpm check -- PROGRAM``: print every finding; 0 only if all is identical.

    With several kernels the node runs once per profile, each compared with its own kernel:
    the node's job is to reproduce each kernel, and a node serving one profile would answer
    the other kernel's differences (docs/kernel-rules.md, D1-D6) the other way, so a program
    that depends on the kernel would show as a node difference instead of as ``KERNELS
    DIFFER``.  Host runs take seconds, so the second one costs little.
    """
    from .. import rig
    from ..record import scenario_name

    name = scenario_name(list(program))
    found = shutil.which(program[0]) or program[0]
    argv = [os.path.abspath(found) if os.sep in found else found, *program[1:]]  # the cwd is a fresh directory
    env = dict(os.environ)
    ours: dict[str, LiveRun] = {}
    theirs: dict[str, LiveRun] = {}
    with tempfile.TemporaryDirectory(prefix="cusetpm-check-") as tmp:
        for k in kernels:
            with progress.stage(f"[{k}] running {name} on a node ({node_kind.upper()}, profile {k})") as st:
                ours[k] = node_run(argv, env, k, node_kind=node_kind, tcti=tcti, workdir=Path(tmp, k), timeout=timeout)
                st.finish(ok=not ours[k]["error"])
            progress.note(f"[{k}] on the node: {_summary(ours[k])}")
    for k in kernels:
        try:
            theirs[k] = kernel_run(argv, env, k, timeout=timeout)
        except rig.RigError as exc:
            theirs[k] = failed_run(str(exc))
    report = compare_live(name, ours, theirs, node_kind)
    print(report.text(), flush=True)
    return report.exit_status


def _summary(run: LiveRun) -> str:
    if run["error"]:
        return f"failed: {run['error'].splitlines()[0]}"
    return f"exit status {run['status']}, {len(run['steps'])} calls"


def guest_main(argv: Sequence[str] | None = None) -> int:
    """In the guest: a fresh ``swtpm chardev --vtpm-proxy`` (the kernel's own /dev/tpmrmN),
    then the program of ``SHARE/request.json`` traced against it in a fresh empty directory.
    Writes ``SHARE/result.json`` (``node``, ``status``, ``error``, ``release``), the trace and
    the output; a marker line says how it went.  Exit status 0 whenever the result is written."""
    ap = argparse.ArgumentParser(prog="python -m cusetpm.conformance.live_run")
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--share", required=True)
    args = ap.parse_args(argv)
    share = Path(args.share)
    request = json.loads((share / "request.json").read_text())
    base = Path(tempfile.mkdtemp(prefix="cusetpm-check-", dir="/run" if os.path.isdir("/run") else None))
    result: dict[str, object] = {"node": None, "status": None, "error": None, "release": os.uname().release}
    chip = KernelChip(base / "chip")
    try:
        from ..record import client_environment  # the slow import, while the chip registers

        try:
            node = chip.ready()
        except SideError as exc:
            result["error"] = f"the kernel chip did not start: {exc}"
        else:
            result["node"] = node
            cwd = base / "cwd"
            cwd.mkdir()
            t0 = time.monotonic()
            status, error = run_traced(
                request["program"],
                client_environment(node, request["env"]),
                str(cwd),
                str(base / "trace"),
                str(base / "output"),
                float(request["timeout"]),
            )
            result.update(status=status, error=error)
            for part in ("trace", "output"):
                shutil.copyfile(base / part, share / part)
            how = f"exit status {status}" if error is None else error
            name = os.path.basename(request["program"][0])
            progress.emit_marker(f"{name} on the kernel's {node}: {how} in {time.monotonic() - t0:.1f} s")
    finally:
        chip.stop()
    tmp = share / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(share / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(guest_main())
