# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py's paths to the TPM and how they are measured.

One client stack for every path (by default issue 9's tpm2-pytss TCTI loop over a tpm2-tss
TCTI, :class:`Client`), so only the path differs; :func:`measure` times them in interleaved rounds and
:func:`count_commands` counts backend commands per user command through a relay.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import os
import re
import select
import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from .bench_commands import DIGEST, GET_RANDOM, KEY_ATTRS, RETRIES, check, retry, sign
from .bench_rig import Rig
from .relay import CountingRelay

# --- the client: one TCTI per path ------------------------------------------------------

#: The client stacks: issue 9's "tpm2-pytss TCTI loop" (the default), or ESAPI over the same TCTI.
APIS = ("tcti", "esapi")


class Client:
    """One connection of a path; ``with_key``: holding an ECC P-256 signing primary (owner
    hierarchy, made through ESAPI).

    ``api="tcti"``: each command is the TCTI's transmit() of its bytes and a receive() of the
    whole response, response code checked (bench_commands): issue 9's client, a tpm2-pytss
    TCTI loop.  ``api="esapi"``: the same commands through tpm2-pytss ESAPI, which adds its
    own work, and on a node two FUSE requests a command (its receive asks for the header, then
    the rest; a full-buffer receive reads once).
    """

    def __init__(self, tcti_name: str, tcti_conf: str, with_key: bool = True, api: str = "tcti") -> None:
        from tpm2_pytss import ESAPI, TCTILdr
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_ST
        from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK

        if api not in APIS:
            raise ValueError(f"api: one of {', '.join(APIS)}, not {api!r}")
        self.esapi_calls = api == "esapi"
        self.tcti = TCTILdr(tcti_name, tcti_conf)
        try:
            self.esapi = ESAPI(self.tcti)
        except Exception:
            self.tcti.close()
            raise
        self.key = None
        self.sign_command = b""
        if not with_key:
            return
        template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=KEY_ATTRS)
        try:
            self.key = self.esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)[0]
            self.sign_command = sign(self.esapi.tr_get_tpm_handle(self.key))
        except Exception:
            self.close()
            raise
        self.digest = DIGEST
        self.scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)  # the key's own: ECDSA-SHA256
        self.ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)

    def call(self, cmd: bytes) -> bytes:
        """One command through the TCTI: the whole response; TpmError unless it succeeded."""
        tcti = self.tcti
        for _ in range(RETRIES):
            tcti.transmit(cmd)
            rsp = tcti.receive()
            if not retry(rsp):
                break
        return check(cmd, rsp)

    def get_random(self) -> None:
        if self.esapi_calls:
            self.esapi.get_random(16)
        else:
            self.call(GET_RANDOM)

    def sign(self) -> None:
        if self.esapi_calls:
            self.esapi.sign(self.key, self.digest, self.scheme, self.ticket)
        else:
            self.call(self.sign_command)

    def close(self) -> None:
        if self.key is not None:
            with contextlib.suppress(Exception):
                self.esapi.flush_context(self.key)
        self.esapi.close()
        self.tcti.close()


#: (row label, which client: "plain" has nothing loaded, "keyed" holds the signing key, method)
OPS: list[tuple[str, str, str]] = [
    ("GetRandom(16)", "plain", "get_random"),
    ("  same, key loaded", "keyed", "get_random"),
    ("Sign ECDSA P256", "keyed", "sign"),
]


@dataclass
class Route:
    """One path to the TPM: its label, how to set it up, and what was measured."""

    label: str
    setup: Callable[[Rig], tuple[str, str]]  # -> (tcti name, tcti conf)
    count_setup: Callable[[Rig], tuple[str, str, CountingRelay]]
    #: Programs and tpm2-tss TCTI libraries the path needs (checked before anything starts).
    needs: tuple[str, ...] = ("swtpm",)
    tctis: tuple[str, ...] = ("swtpm",)
    batches: dict[str, list[float]] = field(default_factory=dict)  # op -> per-batch mean µs
    cmds: dict[str, float] = field(default_factory=dict)  # op -> backend commands per user cmd
    error: str | None = None
    count_error: str | None = None
    #: µs for one request to the node file that does no TPM work (an idle read; an idle
    #: poll), node only: bench_floor.measure_floors.
    request_us: float | None = None
    poll_us: float | None = None
    #: The same with the bench and the daemon on one CPU (bench_floor.one_cpu).
    pinned_request_us: float | None = None
    pinned_poll_us: float | None = None
    #: A node's swap mode ("kernel" or "lazy": what its limit and goals are), None for the others.
    mode: str | None = None

    def median(self, op: str) -> float | None:
        b = self.batches.get(op)
        return statistics.median(b) if b else None


def direct_route() -> Route:
    def setup(rig: Rig) -> tuple[str, str]:
        return "swtpm", f"host=127.0.0.1,port={rig.swtpm('direct')}"

    def count(rig: Rig) -> tuple[str, str, CountingRelay]:
        relay = rig.relay(rig.swtpm("direct-count"))
        return "swtpm", f"host=127.0.0.1,port={relay.port}", relay

    return Route("direct", setup, count)


def node_route(kernel: str, sessions: str = "kernel", extra: tuple[str, ...] = (), label: str | None = None) -> Route:
    """The node with a kernel profile; ``sessions="global"``: with global session accounting;
    ``extra``: more ``cusetpm serve`` arguments, e.g. ``("--swap", "lazy")``.

    The label defaults to ``node(KERNEL[,SESSIONS][,VALUES of extra])``: ``node(6.12,lazy)``.
    """
    args = (("--sessions", sessions) if sessions != "kernel" else ()) + tuple(extra)
    mode = extra[extra.index("--swap") + 1] if "--swap" in extra[:-1] else "kernel"
    if label is None:
        parts = [kernel] + ([sessions] if sessions != "kernel" else []) + [a for a in extra if not a.startswith("-")]
        label = f"node({','.join(parts)})"
    # A directory name: swtpm's --log option would split on a comma.
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", label.removeprefix("node")).strip("-") or kernel

    def setup(rig: Rig) -> tuple[str, str]:
        return "device", rig.node(f"node-{tag}", kernel, extra=args)

    def count(rig: Rig) -> tuple[str, str, CountingRelay]:
        relay = rig.relay(rig.swtpm(f"node-{tag}-count", startup=False))
        node = rig.node(f"node-{tag}-count", kernel, tcti=f"swtpm:host=127.0.0.1,port={relay.port}", extra=args)
        return "device", node, relay

    return Route(label, setup, count, tctis=("swtpm", "device"), mode=mode)


def abrmd_route() -> Route:
    def setup(rig: Rig) -> tuple[str, str]:
        return "tabrmd", rig.abrmd("abrmd", rig.swtpm("abrmd"))

    def count(rig: Rig) -> tuple[str, str, CountingRelay]:
        relay = rig.relay(rig.swtpm("abrmd-count"))
        return "tabrmd", rig.abrmd("abrmd-count", relay.port), relay

    return Route(
        "abrmd", setup, count, needs=("swtpm", "tpm2-abrmd", "dbus-daemon", "dbus-send"), tctis=("swtpm", "tabrmd")
    )


# --- measuring ---------------------------------------------------------------------------


def time_batch(fn: Callable[[], None], n: int) -> float:
    """Mean µs per call over n calls."""
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(n):
        fn()
    return (clock() - t0) / n / 1000.0


def open_clients(name: str, conf: str, stack: contextlib.ExitStack, api: str = "tcti") -> dict[str, Client]:
    """Two connections of one path: "plain" (empty) and "keyed" (the signing key loaded)."""
    clients = {}
    for kind in ("plain", "keyed"):
        c = Client(name, conf, with_key=kind == "keyed", api=api)
        stack.callback(c.close)
        clients[kind] = c
    return clients


def missing(p: Route) -> str | None:
    """What the path needs and this machine lacks, as a message, or None."""
    progs = [x for x in p.needs if shutil.which(x) is None]
    libs = [f"libtss2-tcti-{t}" for t in p.tctis if ctypes.util.find_library(f"tss2-tcti-{t}") is None]
    if not progs and not libs:
        return None
    pkgs = {"libtss2-tcti-tabrmd": "libtss2-tcti-tabrmd0", "dbus-daemon": "dbus", "dbus-send": "dbus"}
    need = ", ".join(progs + libs)
    return f"not installed: {need} (Debian: {' '.join(sorted({pkgs.get(x, x) for x in progs + libs}))})"


def request_floor(path: str, n: int = 2000, op: str = "read") -> float:
    """µs per idle request on the file ``path``: one FUSE round trip through its server, no TPM
    work.  ``op="read"``: read() with nothing pending (0 bytes); ``"poll"``: poll(), 0 timeout."""
    fd = os.open(path, os.O_RDWR)
    try:
        if op == "read":
            call: Callable[[], object] = functools.partial(os.read, fd, 4096)
        else:
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLOUT)
            call = functools.partial(poller.poll, 0)
        for _ in range(50):
            call()
        t = time.perf_counter()
        for _ in range(n):
            call()
        return (time.perf_counter() - t) / n * 1e6
    finally:
        os.close(fd)


def measure(
    paths: list[Route],
    rig: Rig,
    rounds: int,
    sizes: dict[str, int],
    warmup: int,
    each_round: Callable[[], None] | None = None,
    api: str = "tcti",
) -> dict[str, str]:
    """Time every path's rows in interleaved rounds; returns each node path's file (label -> path).

    ``each_round`` runs once per round after the paths' batches (the backend's own cost,
    bench_limits), so that it sees the same background load; ``api``: the clients' stack
    (:class:`Client`)."""
    clients: dict[str, dict[str, Client]] = {}
    nodes: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        for p in paths:
            if p.error:
                continue
            try:
                name, conf = p.setup(rig)
                if name == "device" and p.mode is not None:  # a node (the C relay has no mode)
                    nodes[p.label] = conf
                cs = open_clients(name, conf, stack, api)
                for _, kind, meth in OPS:
                    for _ in range(warmup):
                        getattr(cs[kind], meth)()
                clients[p.label] = cs
            except Exception as exc:  # report, measure the others
                p.error = f"{type(exc).__name__}: {exc}"
        for _ in range(rounds):
            for op, kind, meth in OPS:
                for p in paths:
                    got = clients.get(p.label)
                    if got is None or p.error:
                        continue
                    try:
                        p.batches.setdefault(op, []).append(time_batch(getattr(got[kind], meth), sizes[meth]))
                    except Exception as exc:
                        p.error = f"{type(exc).__name__}: {exc}"
            if each_round is not None:
                each_round()
    failed = {p.label for p in paths if p.error}
    return {label: node for label, node in nodes.items() if label not in failed}


def count_commands(paths: list[Route], rig: Rig, k: int, api: str = "tcti") -> None:
    for p in paths:
        if p.error:
            continue
        try:
            with contextlib.ExitStack() as stack:
                name, conf, relay = p.count_setup(rig)
                cs = open_clients(name, conf, stack, api)
                for op, kind, meth in OPS:
                    fn = getattr(cs[kind], meth)
                    fn()  # settle (e.g. the key's first context save)
                    before = relay.commands
                    for _ in range(k):
                        fn()
                    p.cmds[op] = (relay.commands - before) / k
        except Exception as exc:
            p.count_error = f"{type(exc).__name__}: {exc}"
