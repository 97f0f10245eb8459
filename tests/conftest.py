# SPDX-License-Identifier: GPL-2.0-only
"""Shared fixtures for the integration tests: a real ``cusetpm serve`` daemon per test.

* ``daemon``: a factory fixture.  ``start = daemon; d = start(kernel="6.12", extra_args=())``
  runs ``python -m cusetpm serve --fuse DIR --state-dir DIR -v`` as a subprocess (so the
  daemon starts and owns its swtpm), waits until it writes its node's path to
  ``--ready-fd`` (cusetpm.testing.daemon) and returns a
  :class:`Daemon` (``.node``, ``.mount``, ``.proc``, ``.log()``, ``.stop()``).  At teardown
  every daemon still running gets SIGTERM, and for every daemon the fixture asserts exit
  status 0, that the FUSE mount is gone and that no swtpm process of it is left.
* ``node``: one default daemon, yields the path of its ``tpmrm0``.
* ``swtpm_backend_handles(d)``: GetCapability(HANDLES) asked of the *backing* swtpm itself
  (not through the resource manager), for transient objects and loaded/saved sessions;
  ``settled_backend_handles(d)`` the same once the releases of files just closed are done
  (FUSE delivers RELEASE after close() has returned).

  swtpm serves one TCP client at a time and the daemon keeps its connection open for its
  whole life, so a second client (tpm2-tools ``-T swtpm:...`` or a raw socket on the port
  the daemon logs) is never accepted while the daemon runs.  Daemons that need to be
  inspected are therefore started with ``start(..., inspectable=True)``: the test starts its
  own swtpm behind a small in-process multiplexer (:class:`cusetpm.testing.relay.SwtpmMux`)
  and the daemon is run
  with ``--tcti swtpm:host=127.0.0.1,port=P`` against it; the multiplexer forwards whole
  commands one at a time, and the helper slips its own raw GetCapability in between.  Ask
  only while the daemon is idle (no command in flight), or the answer is a snapshot of
  the resource manager's work in progress.  (Such a daemon is given its TPM with
  ``--tcti`` instead of starting one; the rest of cusetpm is the same.)
* ``esapi(node)``: a tpm2-pytss ESAPI context on its own open file of the node (one
  space), closed with the file; ``transient_handles(ectx)`` what that space lists.
* ``tpm2(node, "tpm2_xxx", *args, cwd=...)``: runs an unmodified tpm2-tools command with
  ``TPM2TOOLS_TCTI=device:NODE``; fails the test with its output unless ``check=False``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import TPM2_CAP, TPM2_HT

from cusetpm.testing.daemon import DaemonError, Served, mounted, start_serve
from cusetpm.testing.relay import FlakyRelay, SwtpmMux

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

HR_TRANSIENT = 0x80000000
HR_LOADED_SESSION = 0x02000000
HR_SAVED_SESSION = 0x03000000  # TPM_HT_ACTIVE_SESSION: sessions whose context is saved

_SWTPM_LINE = re.compile(r"started swtpm \(pid (\d+)\) on @")


# --- small process helpers ------------------------------------------------------------------


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and text in cmdline:
            found.append((int(entry), cmdline))
    return found


# --- the daemon -----------------------------------------------------------------------------


def _kill_swtpms(state_dir: Path) -> None:
    """Last resort for a daemon that hung (and was killed): the swtpm it started, found by
    the state dir it was given."""
    for pid, _ in processes_mentioning(str(state_dir)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Daemon:
    """One ``python -m cusetpm serve --fuse`` subprocess."""

    served: Served
    mount: Path
    node: Path
    state_dir: Path
    kernel: str
    #: The swtpm the daemon started (None when it was given --tcti).
    swtpm_pid: int | None = None
    #: The test's own swtpm behind a multiplexer (``inspectable=True``), else None.
    mux: SwtpmMux | None = None
    returncode: int | None = field(default=None, init=False)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.served.proc

    @property
    def log_path(self) -> Path:
        return self.served.log_path

    def log(self) -> str:
        return self.served.log()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` (once) and wait for the exit status; kill it if it hangs."""
        if self.returncode is not None:
            return self.returncode
        self.returncode = self.served.stop(sig, timeout)
        if self.served.killed:
            _kill_swtpms(self.state_dir)
            pytest.fail(f"cusetpm did not stop within {timeout} s of signal {sig}; log:\n{self.log()}")
        return self.returncode

    def assert_stopped_cleanly(self) -> None:
        """Exit status 0, mount gone, no swtpm of this daemon left."""
        rc = self.stop()
        assert rc == 0, f"cusetpm exited with status {rc}; log:\n{self.log()}"
        assert not mounted(self.mount), f"{self.mount} is still mounted after cusetpm exited"
        left = processes_mentioning(str(self.state_dir)) if self.mux is None else []
        assert not left, f"swtpm processes of this daemon left running: {left}"
        if self.swtpm_pid is not None:
            assert not any(pid == self.swtpm_pid for pid, _ in processes_mentioning("swtpm")), (
                f"swtpm pid {self.swtpm_pid} is still running"
            )


def _start(
    base: Path, kernel: str, extra_args: Sequence[str], inspectable: bool, verbose: bool, started: list[Daemon]
) -> Daemon:
    base.mkdir(parents=True, exist_ok=True)
    mount, state, log_path = base / "mnt", base / "state", base / "daemon.log"
    args = ["--fuse", str(mount), "--kernel", kernel]
    mux = None
    if inspectable:
        mux = SwtpmMux(base / "swtpm")
        args += ["--tcti", f"swtpm:host=127.0.0.1,port={mux.port}"]
    elif "--tcti" not in extra_args:
        args += ["--state-dir", str(state)]
    if verbose:
        args.append("-v")
    try:
        served = start_serve([*args, *extra_args], log_path=log_path, mount=mount, cwd=REPO, timeout=START_TIMEOUT)
    except DaemonError as exc:
        failure = str(exc)  # "cusetpm did not start (why): argv", and its log
    else:
        failure = ""
    if failure:
        _kill_swtpms(state)
        if mux is not None:
            mux.close()
        pytest.fail(failure)
    d = Daemon(served, mount, mount / "tpmrm0", state, kernel, mux=mux)
    started.append(d)  # from here on the fixture's teardown stops it, whatever fails below
    assert served.node == d.node, f"cusetpm serves {served.node}, not {d.node}"
    text = d.log()
    m = _SWTPM_LINE.search(text)
    if m:
        d.swtpm_pid = int(m.group(1))
    elif not inspectable and verbose and "--tcti" not in extra_args:
        pytest.fail(f"no 'started swtpm' line in the log of cusetpm -v:\n{text}")
    assert os.path.exists(d.node), f"{d.node} does not exist although cusetpm says it serves it"
    return d


def _stop_all(started: list[Daemon]) -> None:
    """A factory fixture's teardown: stop every daemon it started, each must have stopped
    cleanly, and the test's own swtpms go too."""
    try:
        for d in started:
            d.stop()
        for d in started:
            d.assert_stopped_cleanly()
    finally:
        for d in started:
            if d.mux is not None:
                d.mux.close()


StartDaemon = Callable[..., Daemon]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """Factory: ``start(kernel="6.12", extra_args=(), inspectable=False, verbose=True)``."""
    started: list[Daemon] = []

    def start(
        kernel: str = "6.12", extra_args: Sequence[str] = (), *, inspectable: bool = False, verbose: bool = True
    ) -> Daemon:
        return _start(tmp_path / f"daemon{len(started)}", kernel, extra_args, inspectable, verbose, started)

    yield start
    _stop_all(started)


@dataclass
class Tenants:
    """One ``cusetpm serve --config`` subprocess with its tenant nodes (FUSE files)."""

    daemon: Daemon
    config: Path
    nodes: dict[str, Path]

    def log(self) -> str:
        return self.daemon.log()

    def rewrite(self, nodes_toml: str) -> None:
        """Replace the config's [[node]] tables (the rest stays), as an operator would."""
        head = self.config.read_text().split("[[node]]", 1)[0]
        self.config.write_text(head + nodes_toml)

    def reload(self, expect: str) -> str:
        """SIGHUP, then wait for the daemon's line that contains ``expect``; the new log part."""
        before = len(self.log())
        self.daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            new = self.log()[before:]
            if expect in new:
                return new
            time.sleep(0.05)
        pytest.fail(f"no {expect!r} within 20 s of SIGHUP; log:\n{self.log()}")


StartTenants = Callable[..., Tenants]

#: Two tenants, each with its own NV, persistent and PCR ranges (the README's example).
TWO_TENANTS = """
[[node]]
name = "tenant-a"
nv = ["0x01500000-0x015000ff"]
persistent = ["0x81000100-0x810001ff"]
pcrs = [16]

[[node]]
name = "tenant-b"
nv = ["0x01500100-0x015001ff"]
persistent = ["0x81000200-0x810002ff"]
pcrs = [23]
"""


@pytest.fixture
def tenants(tmp_path: Path) -> Iterator[StartTenants]:
    """Factory: ``start(nodes_toml, extra_toml="", extra_args=(), inspectable=False)``: a daemon
    serving the [[node]] tables given, as FUSE files in one directory, on its own managed swtpm
    (``inspectable``: on the test's own, behind a multiplexer, as ``daemon``'s)."""
    started: list[Daemon] = []

    def start(
        nodes_toml: str, extra_toml: str = "", extra_args: Sequence[str] = (), *, inspectable: bool = False
    ) -> Tenants:
        base = tmp_path / f"tenants{len(started)}"
        base.mkdir(parents=True)
        mount, state = base / "mnt", base / "state"
        config = base / "cusetpm.toml"
        mux = SwtpmMux(base / "swtpm") if inspectable else None  # as daemon(inspectable=True)
        tpm = f'tcti = "swtpm:host=127.0.0.1,port={mux.port}"' if mux is not None else f'state_dir = "{state}"'
        config.write_text(f'[tpm]\n{tpm}\n\n[front]\nnode = "fuse"\nfuse_dir = "{mount}"\n\n{extra_toml}\n{nodes_toml}')
        try:
            served = start_serve(["--config", str(config), "-v", *extra_args], log_path=base / "daemon.log",
                                 mount=mount, cwd=REPO, timeout=START_TIMEOUT)  # fmt: skip
        except DaemonError as exc:
            _kill_swtpms(state)
            if mux is not None:
                mux.close()
            pytest.fail(str(exc))
        names = [n["name"] for n in tomllib.loads(config.read_text())["node"]]
        d = Daemon(served, mount, served.node, state, "6.12", mux=mux)
        started.append(d)
        return Tenants(d, config, {name: mount / name for name in names})

    yield start
    _stop_all(started)


@dataclass
class RelayedTpm:
    """A swtpm behind a multiplexer (the test asks it directly) behind a relay that fails on
    purpose (cut, rewrite, retarget, drop): what ``daemon(extra_args=tpm.args)`` uses."""

    mux: SwtpmMux
    relay: FlakyRelay

    @property
    def args(self) -> list[str]:
        return ["--tcti", f"swtpm:host=127.0.0.1,port={self.relay.port}"]


@pytest.fixture
def relayed_tpm(tmp_path: Path) -> Iterator[RelayedTpm]:
    mux = SwtpmMux(tmp_path / "relayed-swtpm")
    relay = FlakyRelay(mux.port)
    try:
        yield RelayedTpm(mux, relay)
    finally:
        relay.close()
        mux.close()


@pytest.fixture
def node(daemon: StartDaemon) -> Path:
    """The tpmrm0 node of a fresh default daemon."""
    return daemon().node


# --- asking the backing TPM directly --------------------------------------------------------


@dataclass(frozen=True)
class BackendHandles:
    transient: list[int]
    loaded_sessions: list[int]
    saved_sessions: list[int]


def get_cap_handles(transact: Callable[[bytes], bytes], first: int) -> list[int]:
    """GetCapability(TPM_CAP_HANDLES, first) as one raw command.

    The TPM answers with the handles of ``first``'s type only; saved sessions are listed
    under their session handles (0x02......).  Few enough for one answer here.
    """
    cmd = struct.pack(">HIIIII", 0x8001, 22, 0x17A, 1, first, 254)
    rsp = transact(cmd)
    _tag, _size, rc = struct.unpack(">HII", rsp[:10])
    assert rc == 0, f"GetCapability(HANDLES, {first:#x}) failed on the backend: rc {rc:#x}"
    more, cap, count = struct.unpack(">BII", rsp[10:19])
    assert cap == 1 and not more, f"unexpected GetCapability answer {rsp.hex()}"
    return list(struct.unpack(f">{count}I", rsp[19 : 19 + 4 * count]))


def swtpm_backend_handles(d: Daemon) -> BackendHandles:
    """The handles the backing swtpm itself holds, bypassing the resource manager.

    Needs a daemon started with ``inspectable=True`` (see the module docstring for why a
    daemon's own swtpm cannot be reached while the daemon runs).  Call it only while no
    command is in flight through the node.
    """
    if d.mux is None:
        raise AssertionError(
            "swtpm_backend_handles() needs a daemon started with inspectable=True: swtpm "
            "accepts one client at a time and the daemon holds that connection"
        )
    return BackendHandles(
        transient=get_cap_handles(d.mux.transact, HR_TRANSIENT),
        loaded_sessions=get_cap_handles(d.mux.transact, HR_LOADED_SESSION),
        saved_sessions=get_cap_handles(d.mux.transact, HR_SAVED_SESSION),
    )


def settled_backend_handles(d: Daemon, quiet: float = 0.25, timeout: float = 10.0) -> BackendHandles:
    """:func:`swtpm_backend_handles` once the daemon has caught up with closed files.

    close() of a FUSE file returns before the daemon gets the file's RELEASE (FUSE sends it
    asynchronously; /dev/tpmrm0's release runs before close() returns), so the sessions of a
    file just closed are flushed a moment later.  This polls until the answer has stayed the
    same for ``quiet`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = swtpm_backend_handles(d)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.01)
        now = swtpm_backend_handles(d)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


@pytest.fixture
def backend_handles() -> Callable[[Daemon], BackendHandles]:
    """The :func:`swtpm_backend_handles` helper, as a fixture."""
    return swtpm_backend_handles


# --- tpm2-pytss ---------------------------------------------------------------------------------


class Space(ESAPI):
    """An ESAPI context on its own open file of the node (one space); ``close()`` closes
    the file too, once."""

    def __init__(self, node: Path) -> None:
        self._device_tcti: TCTILdr | None = TCTILdr("device", str(node))
        super().__init__(self._device_tcti)

    def close(self) -> None:
        super().close()
        if self._device_tcti is not None:
            self._device_tcti.close()
            self._device_tcti = None


@contextlib.contextmanager
def esapi(node: Path) -> Iterator[Space]:
    """``ESAPI(TCTILdr("device", node))``, finalized and its file closed on exit."""
    ectx = Space(node)
    try:
        yield ectx
    finally:
        ectx.close()


def transient_handles(ectx: ESAPI) -> list[int]:
    """The transient handles this space lists (GetCapability through the node), sorted."""
    more, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
    assert not more
    return sorted(int(h) for h in data.data.handles)


# --- tpm2-tools --------------------------------------------------------------------------------


def tpm2(
    node: str | os.PathLike[str],
    *args: str,
    cwd: str | os.PathLike[str],
    input: bytes | None = None,
    check: bool = True,
    timeout: float = 60,
) -> subprocess.CompletedProcess[bytes]:
    """Run an unmodified tpm2-tools command against ``node`` (TCTI ``device:NODE``)."""
    env = dict(os.environ, TPM2TOOLS_TCTI=f"device:{node}")
    env.pop("TPM2TOOLS_ENABLE_ERRATA", None)
    tool = shutil.which(args[0])
    assert tool is not None, f"{args[0]} is not installed (Debian package tpm2-tools)"
    proc = subprocess.run(
        [tool, *args[1:]],
        cwd=cwd,
        env=env,
        input=input,
        capture_output=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited with {proc.returncode}\nstdout:\n{proc.stdout.decode(errors='replace')}"
            f"\nstderr:\n{proc.stderr.decode(errors='replace')}"
        )
    return proc


# --- a real swtpm for the core's unit tests -------------------------------------------------


@pytest.fixture
def raw():  # type: ignore[no-untyped-def]
    """A fresh swtpm driven synchronously (see helpers.RawTpm), stopped after the test."""
    from helpers import RawTpm

    r = RawTpm.start()
    yield r
    r.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``soak`` tests take minutes: they run only when ``-m`` names them (``-m soak``)."""
    if "soak" in (config.getoption("-m") or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak") is not None]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if item.get_closest_marker("soak") is None]
