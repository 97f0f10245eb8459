# SPDX-License-Identifier: GPL-2.0-only
"""scripts/bench.py's limits: what the backend itself costs per command, over one raw socket.

Issue 9 puts each row's limit at the backend's own cost plus five floor requests (the device
TCTI's five FUSE requests per command).  The backend's own cost is measured here, in the same
run and the same interleaved rounds as the paths: one more fresh swtpm, one persistent blocking
connection to its data channel from the bench process, raw TPM command bytes in, the
response out, every response code checked.  No TCTI, no ESAPI, no resource manager: what is
left is swtpm's work and one round trip per backend command, over a Unix socket as the node's
managed swtpm serves (an exchange over loopback TCP costs 10 to 20 µs more).

Each row is timed two ways:

* **alone**: just the command (what ``--swap lazy`` sends for a client alone on the node: the
  key stays loaded);
* **kernel cycle**: what the kernel's resource manager sends for it.  A file with a transient
  object in its space costs ContextLoad (its last saved context), the command, ContextSave and
  FlushContext: four backend commands (``tpm2_prepare_space``/``tpm2_commit_space``).  A file
  with nothing loaded costs the command alone, so GetRandom with nothing loaded has the same
  figure both ways.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..kernel import wire
from .bench_commands import (
    GET_RANDOM,
    RETRIES,
    TpmError,
    check,
    context_load,
    context_save,
    create_primary,
    flush_context,
    name,
    retry,
    sign,
)
from .bench_paths import OPS, time_batch
from .bench_rig import Rig

# --- the connection ----------------------------------------------------------------------


class RawTpm:
    """One persistent blocking connection to swtpm's data channel: command bytes in, response out."""

    def __init__(self, address: int | str, host: str = "127.0.0.1", timeout: int = 30) -> None:
        """``address``: a TCP port on ``host``, or a Unix socket's address."""
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection((host, address), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Blocking, with the kernel's timeouts: a Python socket timeout polls before every
        # send and recv, one more system call per exchange than the backend costs.
        self.sock.settimeout(None)
        for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", timeout, 0))
        #: Backend commands sent on this connection, and how many of them were sent again.
        self.sent = 0
        self.retries = 0

    def call(self, cmd: bytes) -> bytes:
        """The whole response; TpmError unless its response code is 0 (RETRY and TESTING
        are sent again: bench_commands.retry)."""
        for _ in range(RETRIES):
            rsp = self._exchange(cmd)
            if not retry(rsp):
                break
            self.retries += 1
        return check(cmd, rsp)

    def _exchange(self, cmd: bytes) -> bytes:
        sock = self.sock
        sock.sendall(cmd)
        self.sent += 1
        rsp = sock.recv(65536)
        while len(rsp) < wire.TPM_HEADER_SIZE or len(rsp) < wire.be32(rsp, 2):
            more = sock.recv(65536)
            if not more:
                raise TpmError(f"{name(cmd)}: the TPM closed the connection")
            rsp += more
        if len(rsp) != wire.be32(rsp, 2):
            raise TpmError(f"{name(cmd)}: {len(rsp)} bytes for a {wire.be32(rsp, 2)}-byte response")
        return rsp

    def close(self) -> None:
        self.sock.close()


# --- the figure --------------------------------------------------------------------------

#: The modes a row is timed in, and the first row's unpinned one.
MODES = ("alone", "cycle")
UNPINNED = "unpinned"


def kind_of(op: str) -> str:
    """The row's connection: "plain" (nothing loaded) or "keyed" (the key in its space)."""
    return next(k for o, k, _ in OPS if o == op)


def cycle_commands(op: str) -> int:
    """Backend commands the kernel's resource manager sends for one user command of the row:
    four around a command of a file with the key in its space, else the command alone."""
    return 4 if kind_of(op) == "keyed" else 1


@dataclass
class BackendCost:
    """The backend's own µs per command, per mode and row (batch means), or why not measured."""

    rounds: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    #: The CPU the client and its swtpm were pinned to (None: not pinned, see ``pin_error``).
    cpu: int | None = None
    pin_error: str | None = None
    #: mode -> row -> per-batch mean µs per user command.  "alone" and "cycle" for every row
    #: (pinned); "unpinned": the first row alone, where the scheduler puts the two processes.
    batches: dict[str, dict[str, list[float]]] = field(default_factory=lambda: {m: {} for m in (*MODES, UNPINNED)})
    error: str | None = None

    def median(self, mode: str, op: str) -> float | None:
        """The row's figure; a row whose cycle is the command alone reads the same both ways."""
        if mode == "cycle" and cycle_commands(op) == 1:
            mode = "alone"
        got = self.batches.get(mode, {}).get(op)
        return statistics.median(got) if got and self.error is None else None


class BackendBench:
    """The raw-socket measurement on one swtpm, one round at a time, so that its rounds
    interleave with the paths' (:func:`cusetpm.testing.bench_paths.measure`'s ``each_round``).

    Between rounds the key is saved and flushed (the kernel's state for a file between
    commands); a round times each row with nothing loaded (a keyed row inside the kernel's
    cycle), loads the key, times the keyed rows alone with it loaded, and saves and flushes it.

    The bench's thread and the swtpm (``pid``) are pinned to one CPU while a round runs:
    a wake-up on another CPU costs more than the exchange itself on a small VM (a GetRandom
    takes 100-160 µs on our 2-core one when the two land on different CPUs, 20 µs on one), and
    the limit is the least the backend costs.  The first row alone is timed unpinned as well
    (the scheduler's choice), for the record.
    """

    def __init__(
        self,
        address: int | str,
        sizes: dict[str, int],
        warmup: int = 10,
        pid: int | None = None,
        cpu: int | None = None,
    ) -> None:
        self.address = address
        self.sizes = sizes
        self.warmup = warmup
        self.pid = pid
        self.cost = BackendCost(sizes=dict(sizes), cpu=cpu if pid is not None else None)
        if pid is None:
            self.cost.pin_error = "no swtpm process to pin"
        self.tpm: RawTpm | None = None
        self.context = b""  # the key's last saved TPMS_CONTEXT
        self.handle: int | None = None  # the key's handle while loaded
        self._signs: dict[int, bytes] = {}

    def start(self) -> None:
        """Connect, make the key, save and flush it, warm up; a failure is kept in cost.error."""
        try:
            self.tpm = RawTpm(self.address)
            self.handle = wire.be32(self.tpm.call(create_primary()), wire.TPM_HEADER_SIZE)
            self.unload_key()
            self._round(lambda _op, _n: self.warmup, record=False)
        except Exception as exc:
            self.cost.error = f"{type(exc).__name__}: {exc}"

    def step(self, op: str, mode: str) -> Callable[[], None]:
        """One user command of row ``op`` as the backend sees it in ``mode``, ready to call
        (built first, so a batch times the exchanges).  The key must be loaded for a keyed row
        alone, and saved and flushed otherwise."""
        tpm = self.tpm
        assert tpm is not None
        call = tpm.call
        meth = next(m for o, _, m in OPS if o == op)
        command: Callable[[int], bytes] = self._sign if meth == "sign" else lambda _handle: GET_RANDOM

        def alone() -> None:
            call(command(self.handle or 0))

        def cycle() -> None:
            handle = wire.be32(call(context_load(self.context)), wire.TPM_HEADER_SIZE)
            call(command(handle))
            self.context = call(context_save(handle))[wire.TPM_HEADER_SIZE :]
            call(flush_context(handle))

        return cycle if mode == "cycle" and cycle_commands(op) > 1 else alone

    def run(self, op: str, mode: str) -> None:
        """One user command of row ``op`` in ``mode`` (see :meth:`step`)."""
        self.step(op, mode)()

    def round(self) -> None:
        """One batch per row and mode (a row whose cycle is the command alone: one batch); a
        failure is kept in cost.error and ends the measurement."""
        if self.cost.error is not None or self.tpm is None:
            return
        try:
            self._round(lambda _op, meth: self.sizes[meth], record=True)
            self.cost.rounds += 1
        except Exception as exc:
            self.cost.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        if self.tpm is not None:
            self.tpm.close()
            self.tpm = None

    def _round(self, size: Callable[[str, str], int], record: bool) -> None:
        first, _, meth0 = OPS[0]
        self._batch(first, UNPINNED, size(first, meth0), record)
        with self._pinned():
            for op, _, meth in OPS:  # nothing loaded
                self._batch(op, "cycle" if cycle_commands(op) > 1 else "alone", size(op, meth), record)
            self.load_key()
            for op, _, meth in OPS:
                if cycle_commands(op) > 1:
                    self._batch(op, "alone", size(op, meth), record)
            self.unload_key()

    @contextlib.contextmanager
    def _pinned(self) -> Iterator[None]:
        """This thread and the swtpm on cost.cpu, for the block (both masks restored after)."""
        cpu, pid = self.cost.cpu, self.pid
        if cpu is None or pid is None:
            yield
            return
        masks = {0: os.sched_getaffinity(0)}
        try:
            masks[pid] = os.sched_getaffinity(pid)
            for who in masks:
                os.sched_setaffinity(who, {cpu})
        except OSError as exc:
            self.cost.cpu, self.cost.pin_error = None, f"sched_setaffinity: {exc.strerror or exc}"
        try:
            yield
        finally:
            for who, mask in masks.items():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(who, mask)

    def _batch(self, op: str, mode: str, n: int, record: bool) -> None:
        us = time_batch(self.step(op, mode), n)
        if record:
            self.cost.batches[mode].setdefault(op, []).append(us)

    def _sign(self, handle: int) -> bytes:
        cmd = self._signs.get(handle)
        if cmd is None:
            cmd = self._signs[handle] = sign(handle)
        return cmd

    def load_key(self) -> None:
        """ContextLoad the key's last saved context: loaded, as ``--swap lazy`` keeps it."""
        assert self.tpm is not None
        self.handle = wire.be32(self.tpm.call(context_load(self.context)), wire.TPM_HEADER_SIZE)

    def unload_key(self) -> None:
        """ContextSave and FlushContext the key: the kernel's state for a file between commands."""
        assert self.tpm is not None and self.handle is not None
        self.context = self.tpm.call(context_save(self.handle))[wire.TPM_HEADER_SIZE :]
        self.tpm.call(flush_context(self.handle))
        self.handle = None


def pick_cpu() -> int:
    """The CPU to pin the measurement to: the last this process may run on."""
    return max(os.sched_getaffinity(0))


def start_backend(rig: Rig, sizes: dict[str, int], warmup: int) -> BackendBench:
    """A BackendBench on a fresh swtpm of the rig's (started as the paths' are: swtpm does
    Startup itself), connected and warmed up; closed with the rig's current phase.  A failure
    is kept in its cost.error."""
    try:
        swtpm = rig.start_swtpm("backend", unix=True)
    except Exception as exc:
        bench = BackendBench(0, sizes, warmup)
        bench.cost.error = f"{type(exc).__name__}: {exc}"
        return bench
    assert swtpm.unix is not None
    bench = BackendBench(swtpm.unix, sizes, warmup, pid=swtpm.proc.pid, cpu=pick_cpu())
    rig.stack.callback(bench.close)
    bench.start()
    return bench
