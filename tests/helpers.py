# SPDX-License-Identifier: GPL-2.0-only
"""Test helpers: a real swtpm driven synchronously, with fault injection, and command builders.

Unit tests run the sans-I/O core against this (``tpm.run_sync``): the TPM behaviour is
swtpm's own; only the responses a test injects on purpose are made up.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Optional

from tpm2_pytss.types import TPM2B_PUBLIC

from cusetpm.backends import unframeable
from cusetpm.kernel import wire as tpm
from cusetpm.kernel.profiles import PROFILES
from cusetpm.kernel.request import Send, run_sync
from cusetpm.kernel.structs import Chip
from cusetpm.kernel.tpm2_cmd import auto_startup
from cusetpm.kernel.wire import be32, command, u32
from cusetpm.testing.fake_tpm import FakeTpm
from cusetpm.testing.swtpm import STARTED, Swtpm

RH_OWNER = 0x40000001
RH_NULL = 0x40000007
RS_PW = 0x40000009
CC_CREATE_PRIMARY = 0x131
CC_START_AUTH_SESSION = 0x176
CC_READ_PUBLIC = 0x173
CC_POLICY_RESTART = 0x180
CC_EVICT_CONTROL = 0x120

Injector = Callable[[bytes], Optional["bytes | int"]]


@dataclass
class RawTpm:
    """A fresh swtpm (Startup done) and a blocking raw-command socket to it."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    statedir: str
    port: int
    #: (command code, rc or -errno) of every command that reached the transport, in order.
    log: list[tuple[int, int]] = field(default_factory=list)
    #: Called with each command first; a non-None result replaces the TPM's answer.
    injectors: list[Injector] = field(default_factory=list)
    #: The swtpm process behind ``proc`` (cusetpm.testing.swtpm), stopped by :meth:`close`.
    swtpm: Swtpm | None = None

    @classmethod
    def start(cls, flags: str = STARTED) -> RawTpm:
        swtpm = Swtpm.start(flags=flags)  # a fresh temporary state dir, removed on stop
        try:
            sock = swtpm.connect(timeout=None)
        except OSError:
            swtpm.stop()
            raise
        return cls(swtpm.proc, sock, str(swtpm.state_dir), swtpm.port, swtpm=swtpm)

    def send_raw(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        rsp = b""
        while len(rsp) < 10 or len(rsp) < be32(rsp, 2):
            chunk = self.sock.recv(8192)
            assert chunk, "swtpm closed the connection"
            rsp += chunk
        return rsp

    def transport(self, req: Send) -> bytes | int:
        cc = be32(req.data, 6) if len(req.data) >= 10 else -1
        for inject in list(self.injectors):
            out = inject(req.data)
            if out is not None:
                self.log.append((cc, out if isinstance(out, int) else be32(out, 6) if len(out) >= 10 else -1))
                return out
        rsp = unframeable(req.data) or self.send_raw(req.data)
        self.log.append((cc, be32(rsp, 6)))
        return rsp

    def run(self, gen):  # type: ignore[no-untyped-def]
        return run_sync(gen, self.transport)

    def ccs(self) -> list[int]:
        return [cc for cc, _ in self.log]

    def handles(self, first: int) -> list[int]:
        """GetCapability(HANDLES) straight to the TPM, bypassing every RM."""
        rsp = self.send_raw(command(tpm.CC_GET_CAPABILITY, u32(tpm.CAP_HANDLES) + u32(first) + u32(64)))
        assert be32(rsp, 6) == 0
        return [be32(rsp, 19 + 4 * i) for i in range(be32(rsp, 15))]

    def close(self) -> None:
        self.sock.close()
        if self.swtpm is not None:
            self.swtpm.stop()


def make_chip(raw: RawTpm, profile: str = "6.12") -> Chip:
    chip = Chip(PROFILES[profile])
    raw.run(auto_startup(chip))
    raw.log.clear()
    return chip


# --- command builders -----------------------------------------------------------------

PW_AUTH = u32(9) + u32(RS_PW) + b"\x00\x00" + b"\x01" + b"\x00\x00"  # continueSession, empty
_SIGNING_KEY = TPM2B_PUBLIC.parse(
    "ecc256:ecdsa-sha256", objectAttributes="userwithauth|sign|fixedtpm|fixedparent|sensitivedataorigin"
).marshal()


def create_primary(hierarchy: int = RH_OWNER) -> bytes:
    body = u32(hierarchy) + PW_AUTH + b"\x00\x04\x00\x00\x00\x00" + _SIGNING_KEY + b"\x00\x00" + u32(0)
    return command(CC_CREATE_PRIMARY, body, tag=0x8002)


def start_auth_session(policy: bool = False) -> bytes:
    body = u32(RH_NULL) + u32(RH_NULL) + b"\x00\x10" + os.urandom(16) + b"\x00\x00"
    body += bytes([1 if policy else 0]) + b"\x00\x10" + b"\x00\x0b"
    return command(CC_START_AUTH_SESSION, body)


def get_random(n: int = 8) -> bytes:
    return command(tpm.CC_GET_RANDOM, struct.pack(">H", n))


def read_public(handle: int) -> bytes:
    return command(CC_READ_PUBLIC, u32(handle))


def flush_context(handle: int) -> bytes:
    return command(tpm.CC_FLUSH_CONTEXT, u32(handle))


def context_save(handle: int) -> bytes:
    return command(tpm.CC_CONTEXT_SAVE, u32(handle))


def context_load(blob: bytes) -> bytes:
    return command(tpm.CC_CONTEXT_LOAD, blob)


def get_cap_handles(first: int = 0x80000000, count: int = 64) -> bytes:
    return command(tpm.CC_GET_CAPABILITY, u32(tpm.CAP_HANDLES) + u32(first) + u32(count))


def transact(fd: int, data: bytes) -> bytes:
    """One command through an open node file: write it whole, read the response."""
    assert os.write(fd, data) == len(data)
    return os.read(fd, 4096)


def rc(rsp: bytes) -> int:
    return be32(rsp, 6)


def handles_of(getcap_rsp: bytes) -> list[int]:
    return [be32(getcap_rsp, 19 + 4 * i) for i in range(be32(getcap_rsp, 15))]


def response(rc_: int, body: bytes = b"", tag: int = 0x8001) -> bytes:
    """A made-up TPM response, for injection."""
    return struct.pack(">HII", tag, 10 + len(body), rc_) + body


class SyncFile:
    """One open /dev/tpmrm0 file driven synchronously: FileState + tpm_dev_transmit, in the
    order tpm_common_write()/tpm_common_read() use them (no locks needed in one thread).
    Like :class:`cusetpm.daemon.node.DeviceFile` it only calls FileState, which owns the rules."""

    def __init__(self, chip: Chip, raw: RawTpm | FakeTpm) -> None:
        from cusetpm.kernel.tpm_dev_common import FileState

        self.chip = chip
        self.raw = raw
        self.state = FileState(chip.profile)

    def write(self, data: bytes) -> int:
        from cusetpm.kernel.tpm_dev_common import FileState, tpm_dev_transmit

        FileState.check_size(len(data))
        self.state.accept_write(data)
        result = self.raw.run(tpm_dev_transmit(self.chip, self.state.space, self.state.buf))
        return self.state.command_finished(result, len(data), 0.0)

    def read(self, size: int = 4096) -> bytes:
        if not self.state.read_needs_lock(size):
            return b""
        return self.state.read(size)

    def cmd(self, data: bytes) -> bytes:
        assert self.write(data) == len(data)
        return self.read()

    def close(self) -> None:
        from cusetpm.kernel.tpm_dev_common import release_space

        self.raw.run(release_space(self.chip, self.state.space))


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (for --metrics)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """The daemon's Prometheus metrics on ``port``: each sample's name with labels -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
