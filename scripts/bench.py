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
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import os
import queue
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from cusetpm.backends import free_port_pair

ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.5  # the node must cost at most GOAL x direct (the project's issue)

# --- processes and ports -----------------------------------------------------------------


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream:
            stream.close()


def wait_until(pred: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with status {proc.returncode}")
        time.sleep(0.02)
    raise RuntimeError(f"{what}: not ready within {timeout:.0f} s")


def can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Rig:
    """Owns every process, mount and directory the benchmark makes; undoes them all."""

    def __init__(self) -> None:
        self.base = contextlib.ExitStack()
        self.tmp = Path(tempfile.mkdtemp(prefix="cusetpm-bench-"))
        self.base.callback(shutil.rmtree, self.tmp, ignore_errors=True)
        #: Where what is started now is undone: the current phase's stack (see phase()).
        self.stack = self.base
        self._n = 0
        self._bus: str | None = None
        self._abrmds = 0

    def close(self) -> None:
        self.base.close()

    @contextlib.contextmanager
    def phase(self) -> Iterator[None]:
        """Everything started inside is stopped on leaving (the bus and temp dir stay)."""
        with contextlib.ExitStack() as stack:
            self.stack = stack
            try:
                yield
            finally:
                self.stack = self.base

    def dir(self, name: str) -> Path:
        self._n += 1
        d = self.tmp / f"{self._n:02d}-{name}"
        d.mkdir()
        return d

    def popen(self, argv: list[str], log: Path, **kw) -> subprocess.Popen:
        with open(log, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err, **kw)
        self.stack.callback(stop_process, proc)
        return proc

    def swtpm(self, name: str, startup: bool = True) -> int:
        """A fresh swtpm with cusetpm's managed arguments; returns its data port."""
        state = self.dir(name)
        for _ in range(5):
            port = free_port_pair()
            flags = "not-need-init,startup-clear" if startup else "not-need-init"
            proc = self.popen(
                ["swtpm", "socket", "--tpm2",
                 "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                 "--tpmstate", f"dir={state}", "--flags", flags,
                 "--log", f"file={state / 'swtpm.log'},level=1"],
                state / "stderr", stdout=subprocess.DEVNULL)  # fmt: skip
            try:
                wait_until(lambda: can_connect(port), 10, "swtpm", proc)
                return port
            except RuntimeError:
                stop_process(proc)
        raise RuntimeError("swtpm did not start (see its stderr)")

    def node(self, name: str, kernel: str, tcti: str | None = None) -> str:
        """``cusetpm serve --fuse``; returns the node's path once the daemon says it serves."""
        work = self.dir(name)
        mnt = work / "mnt"
        argv = [sys.executable, "-m", "cusetpm", "serve", "--fuse", str(mnt), "--kernel", kernel]
        argv += ["--tcti", tcti] if tcti else ["--state-dir", str(work / "swtpm")]
        # Registered before the daemon so it runs after it stopped: a daemon that could not
        # unmount (killed) leaves a dead mount behind.
        self.stack.callback(unmount, mnt)
        proc = self.popen(argv, work / "stderr", stdout=subprocess.PIPE, cwd=ROOT)
        lines: queue.Queue[str | None] = queue.Queue()

        def reader() -> None:
            with contextlib.suppress(ValueError, OSError):  # stdout closed under us at cleanup
                for raw in proc.stdout:
                    lines.put(raw.decode(errors="replace"))
            lines.put(None)

        threading.Thread(target=reader, daemon=True).start()
        deadline = time.monotonic() + 30
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"cusetpm ({name}) did not serve within 30 s") from None
            if line is None:
                proc.wait()
                err = (work / "stderr").read_text(errors="replace").strip()
                raise RuntimeError(f"cusetpm ({name}) exited with status {proc.returncode}: {err[-400:]}")
            if line.startswith("cusetpm: serving "):
                return line.split()[2]

    def bus(self) -> str:
        """One private D-Bus session bus for the whole run (GLib keeps one session-bus
        connection per process, so the tabrmd TCTI must find the same bus every time)."""
        if self._bus is None:
            work = self.dir("dbus")
            stack, self.stack = self.stack, self.base
            try:
                bus = self.popen(
                    ["dbus-daemon", "--session", "--nofork", "--print-address=1",
                     f"--address=unix:path={work / 'bus'}"],
                    work / "stderr", stdout=subprocess.PIPE)  # fmt: skip
            finally:
                self.stack = stack
            address = bus.stdout.readline().decode().strip()
            if not address:
                raise RuntimeError("dbus-daemon printed no address")
            os.environ["DBUS_SESSION_BUS_ADDRESS"] = address
            self._bus = address
        return self._bus

    def abrmd(self, name: str, tpm_port: int) -> str:
        """tpm2-abrmd on the private bus under a name of its own; returns the client TCTI conf."""
        work = self.dir(name)
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.bus())
        self._abrmds += 1
        dbus_name = f"com.intel.tss2.Tabrmd.Bench{self._abrmds}"
        proc = self.popen(
            ["tpm2-abrmd", "--session", "--allow-root", "--logger=stdout", f"--dbus-name={dbus_name}",
             f"--tcti=swtpm:host=127.0.0.1,port={tpm_port}"],
            work / "stderr", stdout=subprocess.DEVNULL, env=env)  # fmt: skip

        def owned() -> bool:
            r = subprocess.run(
                ["dbus-send", "--session", "--print-reply", "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                 "org.freedesktop.DBus.NameHasOwner", f"string:{dbus_name}"],
                env=env, capture_output=True, text=True)  # fmt: skip
            return "boolean true" in r.stdout

        wait_until(owned, 20, "tpm2-abrmd", proc)
        return f"bus_name={dbus_name},bus_type=session"

    def relay(self, target_port: int) -> "CountingRelay":
        r = CountingRelay(target_port)
        self.stack.callback(r.close)
        return r


def unmount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        for argv in (["fusermount3", "-u", "-z", str(mnt)], ["umount", "-l", str(mnt)]):
            if subprocess.run(argv, capture_output=True).returncode == 0:
                return


# --- counting relay ----------------------------------------------------------------------


def count_frames(data: bytes) -> tuple[int, bytes]:
    """Complete TPM command frames at the start of ``data`` (size at offset 2), and the rest."""
    n = 0
    while len(data) >= 10:
        size = int.from_bytes(data[2:6], "big")
        if size < 10 or len(data) < size:
            break
        data = data[size:]
        n += 1
    return n, data


class CountingRelay:
    """Loopback TCP relay RELAY -> swtpm (data port) and RELAY+1 -> swtpm+1 (control port).

    Counts the complete TPM command frames (10-byte header, size at offset 2) sent to the
    data port.  Blocking sockets and threads; only used in the counting pass.
    """

    def __init__(self, target_port: int) -> None:
        self.commands = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = False
        for _ in range(200):
            port = random.randrange(20000, 60000)
            try:
                listeners = [self._listen(port), self._listen(port + 1)]
            except OSError:
                continue
            break
        else:
            raise RuntimeError("no free port pair for the relay")
        self.port = port
        for off, lsock in enumerate(listeners):
            threading.Thread(target=self._accept, args=(lsock, target_port + off, off == 0), daemon=True).start()

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            s.listen(8)
        except OSError:
            s.close()
            raise
        self._socks.append(s)
        return s

    def _accept(self, lsock: socket.socket, target: int, count: bool) -> None:
        # tpm2-tss's swtpm TCTI opens a new data connection for every command: keep up.
        while not self._closed:
            try:
                client, _ = lsock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", target))
            except OSError:
                client.close()
                continue
            pair = [client, server]
            with self._lock:
                self._socks += pair
            for s in pair:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            done = threading.Barrier(2, action=lambda pair=pair: self._forget(pair))  # type: ignore[misc]
            threading.Thread(target=self._pump, args=(client, server, count, done), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, done), daemon=True).start()

    def _forget(self, pair: list[socket.socket]) -> None:
        with self._lock:
            for s in pair:
                s.close()
                with contextlib.suppress(ValueError):
                    self._socks.remove(s)

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool, done: threading.Barrier) -> None:
        pending = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if count:
                    n, pending = count_frames(pending + data)
                    with self._lock:
                        self.commands += n
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(threading.BrokenBarrierError):
                done.wait()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


# --- the client: one ESAPI per path ------------------------------------------------------


class Client:
    """ESAPI over one TCTI; ``with_key``: holding an ECC P-256 signing primary (owner hierarchy)."""

    def __init__(self, tcti_name: str, tcti_conf: str, with_key: bool = True) -> None:
        from tpm2_pytss import ESAPI, TCTILdr
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_ST, TPMA_OBJECT
        from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK

        self.tcti = TCTILdr(tcti_name, tcti_conf)
        try:
            self.esapi = ESAPI(self.tcti)
        except Exception:
            self.tcti.close()
            raise
        self.key = None
        if not with_key:
            return
        attrs = (
            TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
        )  # fmt: skip
        template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=attrs)
        try:
            self.key = self.esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)[0]
        except Exception:
            self.close()
            raise
        self.digest = bytes(range(32))
        self.scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)  # the key's own: ECDSA-SHA256
        self.ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)

    def get_random(self) -> None:
        self.esapi.get_random(16)

    def sign(self) -> None:
        self.esapi.sign(self.key, self.digest, self.scheme, self.ticket)

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
#: The rows the project's goal is about.
GOAL_OPS = ("GetRandom(16)", "Sign ECDSA P256")


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
    #: µs for one request to the node file that does no TPM work (an idle read), node only.
    request_us: float | None = None

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


def node_route(kernel: str) -> Route:
    def setup(rig: Rig) -> tuple[str, str]:
        return "device", rig.node(f"node-{kernel}", kernel)

    def count(rig: Rig) -> tuple[str, str, CountingRelay]:
        relay = rig.relay(rig.swtpm(f"node-{kernel}-count", startup=False))
        node = rig.node(f"node-{kernel}-count", kernel, tcti=f"swtpm:host=127.0.0.1,port={relay.port}")
        return "device", node, relay

    return Route(f"node({kernel})", setup, count, tctis=("swtpm", "device"))


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


def open_clients(name: str, conf: str, stack: contextlib.ExitStack) -> dict[str, Client]:
    """Two connections of one path: "plain" (empty) and "keyed" (the signing key loaded)."""
    clients = {}
    for kind in ("plain", "keyed"):
        c = Client(name, conf, with_key=kind == "keyed")
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


def request_floor(node: str, n: int = 2000) -> float:
    """µs per idle read() of the node: one FUSE round trip through the daemon, no TPM work."""
    fd = os.open(node, os.O_RDWR)
    try:
        for _ in range(50):
            os.read(fd, 4096)
        t = time.perf_counter()
        for _ in range(n):
            os.read(fd, 4096)
        return (time.perf_counter() - t) / n * 1e6
    finally:
        os.close(fd)


def measure(paths: list[Route], rig: Rig, rounds: int, sizes: dict[str, int], warmup: int) -> None:
    clients: dict[str, dict[str, Client]] = {}
    nodes: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        for p in paths:
            if p.error:
                continue
            try:
                name, conf = p.setup(rig)
                if name == "device":
                    nodes[p.label] = conf
                cs = open_clients(name, conf, stack)
                for _, kind, meth in OPS:
                    for _ in range(warmup):
                        getattr(cs[kind], meth)()
                clients[p.label] = cs
            except Exception as exc:  # report, measure the others
                p.error = f"{type(exc).__name__}: {exc}"
        for _ in range(rounds):
            for op, kind, meth in OPS:
                for p in paths:
                    cs = clients.get(p.label)
                    if cs is None or p.error:
                        continue
                    try:
                        p.batches.setdefault(op, []).append(time_batch(getattr(cs[kind], meth), sizes[meth]))
                    except Exception as exc:
                        p.error = f"{type(exc).__name__}: {exc}"
        for p in paths:
            if p.label in nodes and not p.error:
                p.request_us = request_floor(nodes[p.label])


def count_commands(paths: list[Route], rig: Rig, k: int) -> None:
    for p in paths:
        if p.error:
            continue
        try:
            with contextlib.ExitStack() as stack:
                name, conf, relay = p.count_setup(rig)
                cs = open_clients(name, conf, stack)
                for op, kind, meth in OPS:
                    fn = getattr(cs[kind], meth)
                    fn()  # settle (e.g. the key's first context save)
                    before = relay.commands
                    for _ in range(k):
                        fn()
                    p.cmds[op] = (relay.commands - before) / k
        except Exception as exc:
            p.count_error = f"{type(exc).__name__}: {exc}"


# --- report ------------------------------------------------------------------------------


def cell_us(v: float | None, base: float | None, direct: bool) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0f}" if direct or not base else f"{v:.0f} {v / base:.2f}x"


def table(paths: list[Route], title: str, cell: Callable[[Route, str], str]) -> list[str]:
    w0 = max(len(title), *(len(op) for op, _, _ in OPS)) + 2
    cols = [[p.label] + [cell(p, op) for op, _, _ in OPS] for p in paths]
    widths = [max(len(x) for x in col) + 3 for col in cols]
    out = [f"{title:<{w0}}" + "".join(f"{col[0]:>{w}}" for col, w in zip(cols, widths))]
    for i, (op, _, _) in enumerate(OPS, 1):
        out.append(f"{op:<{w0}}" + "".join(f"{col[i]:>{w}}" for col, w in zip(cols, widths)))
    return out


def report(paths: list[Route], args: argparse.Namespace, elapsed: float, load: tuple[float, float]) -> None:
    direct = paths[0]

    def us(p: Route, op: str) -> str:
        return cell_us(p.median(op), direct.median(op), p is direct)

    def cmds(p: Route, op: str) -> str:
        return f"{p.cmds[op]:.2f}" if op in p.cmds else "n/a"

    print("\n".join(table(paths, "µs per command (x direct)", us)))
    print()
    print("\n".join(table(paths, "backend cmds per user cmd", cmds)))
    print()
    for p in paths:
        if p.batches:
            spread = ", ".join(f"{min(b):.0f}-{max(b):.0f}" for op, _, _ in OPS if (b := p.batches.get(op)))
            print(f"  batch means {p.label}: {spread} µs")
        if p.error:
            print(f"  {p.label}: FAILED: {p.error}")
        if p.count_error:
            print(f"  {p.label}: command count FAILED: {p.count_error}")
    how = (
        "How measured: the same client for every path, tpm2-pytss ESAPI over a tpm2-tss TCTI (swtpm, "
        "device, tabrmd), in this one process (the swtpm TCTI, so direct too, connects anew per command).  "
        "Each path has its own fresh swtpm (cusetpm's managed arguments).  node = `cusetpm serve --fuse` "
        "with its managed swtpm (as `make run`), one daemon per kernel profile; abrmd = tpm2-abrmd on a "
        "private D-Bus session bus.  Per path two connections: one with nothing loaded (GetRandom) and one "
        "holding an ECC P-256 signing primary (Sign: sha256 digest, null scheme = the key's ECDSA-SHA256).  "
        f"All paths set up and warmed up ({args.warmup} calls per row), then {args.rounds} interleaved "
        f"rounds, each one batch per row and path ({args.random} GetRandom, {args.sign} Sign), one path at "
        "a time; a figure is the median over rounds of the batch's mean wall-clock µs per command.  "
        "Backend commands: a separate pass, each path set up again with a counting TCP relay in front of "
        "its swtpm (the node then uses --tcti swtpm:port=RELAY), over "
        f"{args.count} user commands per row; direct must read 1.00.  {elapsed:.0f} s in all."
    )
    print()
    print(textwrap.fill(how, width=96, break_on_hyphens=False))
    busy = max(load) > 0.5 * (os.cpu_count() or 1)
    print(
        f"Load average {load[0]:.2f} before, {load[1]:.2f} after, on {os.cpu_count()} CPUs"
        + (":\nthe machine was busy, expect noisy numbers (the ratios suffer least)." if busy else ".")
    )
    for p in paths[1:]:
        if not p.label.startswith("node"):
            continue
        ratios = [(op, p.median(op), direct.median(op)) for op in GOAL_OPS]
        if any(v is None or not base for _, v, base in ratios):
            print(f"Goal (node <= {GOAL}x direct): {p.label}: not measured")
            continue
        met = all(v / base <= GOAL for _, v, base in ratios)
        if p.request_us is not None:
            floor = 5 * p.request_us
            print(
                f"  {p.label}: one request to the node file costs {p.request_us:.0f} µs with no TPM work (an idle"
                f" read); the device TCTI makes 5 per command (write, poll, read, poll, read): {floor:.0f} µs,"
                f" {floor / ratios[0][2]:.2f}x direct GetRandom before any TPM work"
            )
        detail = ", ".join(f"{op.split()[0]} {v / base:.2f}x" for op, v, base in ratios)
        print(f"Goal (node <= {GOAL}x direct, GetRandom and Sign): {p.label}: {'MET' if met else 'NOT MET'} ({detail})")


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
    paths = [direct_route()] + [node_route(k) for k in kernels] + ([] if args.no_abrmd else [abrmd_route()])
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
