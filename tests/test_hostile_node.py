# SPDX-License-Identifier: GPL-2.0-only
"""Mutated valid commands through a live node (issue 10): a real daemon on a real swtpm, a
bystander file holding a loaded key and a policy session, and N mutants (bit flips,
truncations, wrong header sizes, tag and code swaps, handle swaps with the bystander's handles,
session areas with bogus sizes) written by other files.  Every write is answered with an errno
the kernel gives or a well-formed TPM response; afterwards the daemon is alive, the bystander's
key signs and its session answers, and once both files close the backend's handles are at
baseline.

The same through a tenant node (its default policy, an audit trail and a rate), N / 5 mutants:
its commands are watched and rationed, so they take both the request loop's path and the
worker's.

A hostile file is closed and a new one opened every 50 mutants; mutants that would hurt the
bystander on Linux too are not sent (:func:`cusetpm.testing.hostile.harmless_to_others`).
N is ``CUSETPM_HOSTILE_N``: the issue's 10^4 per kernel by default (about 8 s each here),
10^5 in ``make fuzz``.  The figures are printed (``-s``).
"""

from __future__ import annotations

import collections
import json
import os
import random
import select
import time
from pathlib import Path

import pytest

from conftest import Daemon, settled_backend_handles, swtpm_backend_handles
from cusetpm.kernel import wire
from cusetpm.kernel.wire import be32, command, u32
from cusetpm.testing.hostile import (
    CC_POLICY_GET_DIGEST,
    KERNEL_ERRNOS,
    Pools,
    create_primary,
    foreign_handles,
    get_cap_handles,
    handles_of,
    harmless_to_others,
    mutant,
    response_problem,
    self_saved_session,
    sign,
    start_auth_session,
)
from helpers import free_port, scrape
from helpers import transact as cmd

N = int(os.environ.get("CUSETPM_HOSTILE_N", "10000"))
SEED = int(os.environ.get("CUSETPM_HOSTILE_SEED", "10"))
#: A hostile file is closed and another opened every so many commands (its space fills up).
REOPEN = 50
#: The bystander is checked every so many commands, not only at the end.
CHECK_EVERY = int(os.environ.get("CUSETPM_HOSTILE_CHECK_EVERY", "500"))


#: TPM responses the files of :func:`send_mutants` got, the bystander's (:func:`ok`) too.
answered = collections.Counter[str]()


def ok(fd: int, data: bytes) -> bytes:
    rsp = cmd(fd, data)
    answered["ok"] += 1
    assert be32(rsp, 6) == 0, f"{data.hex()}: rc {be32(rsp, 6):#x}"
    return rsp


def read_answer(fd: int, nonblock: bool) -> bytes:
    """The response; for an O_NONBLOCK file, once poll() says it is there."""
    if nonblock:
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(30_000), "no POLLIN within 30 s of an O_NONBLOCK write"
    return os.read(fd, 4096)


def check_bystander(fd: int, key: int, session: int) -> None:
    """The key is the space's only object and signs; the session is loaded and answers."""
    assert handles_of(ok(fd, get_cap_handles())) == [key]
    rsp = ok(fd, sign(key))
    assert be32(rsp, 2) > 20  # a signature came back
    ok(fd, command(CC_POLICY_GET_DIGEST, u32(session)))


#: ``--swap lazy``: the bystander's key and session stay loaded between its commands (one
#: resident: until a hostile file's command; three: beside the hostile files'), and must come
#: through all the same (issue 9).
LAZY = ("--swap", "lazy")
RESIDENTS = (*LAZY, "--swap-residents", "3")
#: Global session accounting on lazy swapping: the registry's answers in front of it.
GLOBAL_LAZY = (*LAZY, "--sessions", "global")


@pytest.mark.parametrize(
    "kernel,extra",
    [("6.12", ()), ("6.1", ()), ("6.12", LAZY), ("6.12", RESIDENTS), ("6.12", GLOBAL_LAZY)],
    ids=["6.12", "6.1", "6.12-swap-lazy", "6.12-swap-residents", "6.12-global-lazy"],
)
def test_mutated_commands_through_a_live_node(daemon, kernel, extra):
    d = daemon(kernel, extra_args=extra, inspectable=True, verbose=False)
    send_mutants(d, d.node, f"{kernel}{' '.join(('',) + extra)}", kernel == "6.1")


#: A tenant whose every command is watched (a policy, an audit trail) and rationed
#: (``commands_per_second``): its commands run in the request loop while within the rate, and
#: in the worker, waiting their turn, once over it.  The rate is low enough that any machine
#: sends faster (a command of this test takes well under 5 ms), so both paths are taken.
TENANT = """
[[node]]
name = "hostile"
commands_per_second = 200
audit = "{audit}"
"""
#: Mutants through the tenant: a fifth of N (about 6 s at N = 10^4: some 60% reach the TPM, 200 a second).
TENANT_N = max(1, N // 5)


def test_mutated_commands_through_a_watched_rate_limited_tenant_node(tenants, tmp_path):
    """The same through a tenant node; and its audit trail has one line per command answered
    with a response, each well-formed JSON, and some commands waited for their turn."""
    audit, port = tmp_path / "audit.jsonl", free_port()
    t = tenants(TENANT.format(audit=audit), f'[metrics]\nlisten = "127.0.0.1:{port}"\n', inspectable=True)
    got = send_mutants(t.daemon, t.nodes["hostile"], "6.12 tenant", False, TENANT_N)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sum(1 for e in lines if e["rc"] is not None) == got
    assert all(e["node"] == "hostile" for e in lines)
    assert scrape(port)['cusetpm_rate_waits_total{node="hostile"}'] > 0


def send_mutants(d: Daemon, node: Path, label: str, other_seed: bool, n: int = N) -> int:
    """``n`` mutants through ``node``, and every check of the module's docstring; the number
    of TPM responses every file got (bystander's too)."""
    answered.clear()
    baseline = settled_backend_handles(d)
    assert baseline.transient == [] and baseline.loaded_sessions == [] and baseline.saved_sessions == []

    bystander = os.open(node, os.O_RDWR)
    key = be32(ok(bystander, create_primary()), 10)
    session = be32(ok(bystander, start_auth_session(policy=True)), 10)
    check_bystander(bystander, key, session)

    pools = Pools()
    pools.handles += [key, session]
    rng = random.Random(SEED + other_seed)
    outcomes: collections.Counter[str] = collections.Counter()
    self_saved: set[int] = set()
    failures: list[str] = []
    nonblock = False  # every other hostile file is O_NONBLOCK: the async worker's path
    fd = os.open(node, os.O_RDWR)
    start = time.monotonic()
    i = -1
    while i < n - 1:  # n mutants sent; those left out are counted apart
        data = mutant(rng, pools)
        if not harmless_to_others(data, {session}):
            outcomes["(not sent: would hurt the bystander on Linux too)"] += 1
            continue
        i += 1
        try:
            written = os.write(fd, data)
        except OSError as exc:
            outcomes[f"write: {os.strerror(exc.errno or 0)}"] += 1
            if exc.errno not in KERNEL_ERRNOS:
                failures.append(f"write of {data.hex()}: errno {exc.errno}")
            written = -1
        rsp = None
        if written >= 0:
            try:
                rsp = read_answer(fd, nonblock and bool(data))
            except OSError as exc:  # an O_NONBLOCK command's errno, given by read()
                outcomes[f"read: {os.strerror(exc.errno or 0)}"] += 1
                if not nonblock or exc.errno not in KERNEL_ERRNOS:
                    failures.append(f"read after {data.hex()}: errno {exc.errno}")
        if rsp is not None:
            if not data:
                ok_empty = written == 0 and rsp == b""  # FUSE answers a 0-byte write itself
                outcomes["0-byte write: 0"] += 1
                if not ok_empty:
                    failures.append(f"0-byte write gave {written}, read {rsp.hex()}")
            elif written != len(data) or response_problem(rsp):
                failures.append(f"write of {data.hex()}: wrote {written}, read {rsp.hex()}: {response_problem(rsp)}")
            else:
                outcomes["TPM response" if be32(rsp, 6) else "TPM response, success"] += 1
                answered["hostile"] += 1
                if foreign := foreign_handles(data, rsp, {0x80FFFFFF, 0x80FFFFFE, 0x80FFFFFD}):
                    failures.append(f"{data.hex()} lists handles of another space: {foreign}")
                pools.learn(data, rsp)
                if (h := self_saved_session(data, rsp)) is not None:
                    self_saved.add(h)
        if i % REOPEN == REOPEN - 1:
            os.close(fd)
            nonblock = not nonblock
            fd = os.open(node, os.O_RDWR | (os.O_NONBLOCK if nonblock else 0))
        if i % CHECK_EVERY == CHECK_EVERY - 1:
            try:
                check_bystander(bystander, key, session)
            except AssertionError as exc:
                raise AssertionError(f"after mutant {i} ({data.hex()}): {exc}") from None
        assert len(failures) < 20, "\n".join(failures)
    seconds = time.monotonic() - start
    os.close(fd)
    assert not failures, "\n".join(failures)

    # The daemon serves a fresh file, and the bystander has its key and session.
    assert d.proc.poll() is None
    fresh = os.open(node, os.O_RDWR)
    ok(fresh, command(wire.CC_GET_RANDOM, b"\x00\x08"))
    os.close(fresh)
    check_bystander(bystander, key, session)
    os.close(bystander)

    # The backend: nothing loaded, and no saved session but those a hostile file saved out of
    # its own space with ContextSave (which the kernel forgets, see hostile.self_saved_session).
    left = settled_backend_handles(d)
    assert left.transient == [] and left.loaded_sessions == [], left
    index = wire.HR_HANDLE_MASK
    assert {h & index for h in left.saved_sessions} <= {h & index for h in self_saved}, (left, sorted(self_saved))
    for h in left.saved_sessions:
        d.mux.transact(command(wire.CC_FLUSH_CONTEXT, u32(h)))  # type: ignore[union-attr]
    assert swtpm_backend_handles(d) == baseline
    assert "Traceback" not in d.log()
    print(
        f"\nhostile node ({label}): {n} mutants sent in {seconds:.1f} s ({n / seconds:.0f}/s), "
        f"{len(left.saved_sessions)} sessions saved away by hostile files (flushed by hand), outcomes:"
    )
    for what, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {n:6d}  {what}")
    return answered.total()
