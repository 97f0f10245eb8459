# SPDX-License-Identifier: GPL-2.0-only
"""The ``cusetpm serve`` command line, run as a real subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE

from conftest import (
    REPO,
    BackendHandles,
    StartDaemon,
    esapi,
    get_cap_handles,
    processes_mentioning,
    swtpm_backend_handles,
    tpm2,
)
from cusetpm.testing.daemon import mounted
from cusetpm.testing.relay import recv_tpm_message
from cusetpm.testing.swtpm import Swtpm


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m cusetpm serve ARGS`` to completion (for runs that must fail)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSS2_")}
    return subprocess.run(
        [sys.executable, "-m", "cusetpm", "serve", *args], cwd=REPO, env=env, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=timeout,
    )  # fmt: skip


def _assert_one_line_error(result: subprocess.CompletedProcess[str], mount: Path) -> None:
    shown = f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 1, shown
    assert "Traceback" not in result.stderr, shown
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, shown
    assert re.fullmatch(r"cusetpm: error: .*\b1\b.*", lines[0]), shown  # names the port it tried
    assert not mounted(mount)


@pytest.mark.parametrize("tcti", ["swtpm:port=1", "swtpm:host=127.0.0.1,port=1"])
def test_unreachable_tcti_is_a_one_line_error_and_status_1(tmp_path: Path, tcti: str) -> None:
    mount = tmp_path / "mnt"
    _assert_one_line_error(serve("--fuse", str(mount), "--tcti", tcti), mount)


def test_unreachable_mssim_tcti_is_a_one_line_error_and_status_1(tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    _assert_one_line_error(serve("--fuse", str(mount), "--tcti", "mssim:port=1"), mount)


def test_unknown_kernel_is_rejected_by_argparse(tmp_path: Path) -> None:
    mount, state = tmp_path / "mnt", tmp_path / "state"
    result = serve("--fuse", str(mount), "--state-dir", str(state), "--kernel", "5.0")
    assert result.returncode == 2, result
    assert "argument --kernel: invalid choice: '5.0'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # Rejected before anything started.
    assert not state.exists() and not mounted(mount)
    assert processes_mentioning(str(state)) == []


def test_sigint_stops_with_status_0_and_unmounts(daemon: StartDaemon, tmp_path: Path) -> None:
    d = daemon()
    assert mounted(d.mount)
    assert d.swtpm_pid is not None
    assert d.swtpm_pid in [pid for pid, _ in processes_mentioning(str(d.state_dir))]
    tpm2(d.node, "tpm2_getrandom", "8", cwd=tmp_path)
    assert d.stop(signal.SIGINT) == 0, d.log()
    assert not mounted(d.mount)
    assert not d.node.exists()
    assert processes_mentioning(str(d.state_dir)) == [], "the daemon's swtpm is still running"
    assert "Traceback" not in d.log()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_with_a_client_still_open_flushes_its_sessions(daemon: StartDaemon, sig: int) -> None:
    d = daemon(inspectable=True)  # its swtpm belongs to the test and outlives the daemon
    with esapi(d.node) as ectx:
        ectx.create_primary(None, "ecc256")
        ectx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.HMAC, None, TPM2_ALG.SHA256)
        ectx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None, TPM2_ALG.SHA256)
        assert len(swtpm_backend_handles(d).saved_sessions) == 2
        assert d.stop(sig) == 0, d.log()
        assert not mounted(d.mount)
        # The daemon flushed the open file's sessions on its way out.
        assert swtpm_backend_handles(d) == BackendHandles([], [], [])
        # The file the client still holds is dead, not hanging.
        with pytest.raises(Exception):  # noqa: B017 - tpm2-pytss raises its own TSS2_Exception or OSError
            ectx.get_random(8)
    assert "Traceback" not in d.log()


def test_sigterm_with_50_busy_files_flushes_every_session_and_exits_0(daemon: StartDaemon) -> None:
    """50 clients each holding a session and looping commands when SIGTERM comes."""
    import contextlib
    import threading

    from helpers import get_random, start_auth_session

    d = daemon(inspectable=True)
    ready, stop = threading.Barrier(51), threading.Event()
    errors: list[BaseException] = []

    def client() -> None:
        fd = os.open(d.node, os.O_RDWR)
        try:
            os.write(fd, start_auth_session())
            assert os.read(fd, 4096)[6:10] == bytes(4)
            ready.wait()
            while not stop.is_set():
                os.write(fd, get_random())
                os.read(fd, 4096)
        except OSError:
            pass  # the node went away under it: the point of the test
        except BaseException as exc:
            errors.append(exc)
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: the mount is gone
                os.close(fd)

    threads = [threading.Thread(target=client) for _ in range(50)]
    for t in threads:
        t.start()
    ready.wait(timeout=60)
    for _ in range(100):  # loaded and saved are two queries: a command in flight may move one between
        busy = swtpm_backend_handles(d)
        if len(busy.saved_sessions) + len(busy.loaded_sessions) == 50:
            break
    else:
        raise AssertionError(f"not 50 sessions in the TPM: {busy}")
    try:
        assert d.stop(signal.SIGTERM) == 0, d.log()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert not mounted(d.mount) and not d.node.exists()
    assert swtpm_backend_handles(d) == BackendHandles([], [], [])
    assert "Traceback" not in d.log()


def test_tcti_against_a_swtpm_started_by_the_test(daemon: StartDaemon, tmp_path: Path) -> None:
    swtpm = Swtpm.start(tmp_path / "own-swtpm")
    try:
        d = daemon(extra_args=["--tcti", f"swtpm:port={swtpm.port}"])
        assert d.swtpm_pid is None, "cusetpm must not start a swtpm of its own when given --tcti"
        assert f"serving {d.node} " in d.log()
        tpm2(d.node, "tpm2_createprimary", "-C", "o", "-c", "primary.ctx", cwd=tmp_path)
        tpm2(d.node, "tpm2_create", "-C", "primary.ctx", "-u", "key.pub", "-r", "key.priv", cwd=tmp_path)
        tpm2(d.node, "tpm2_load", "-C", "primary.ctx", "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx", cwd=tmp_path)
        random = tpm2(d.node, "tpm2_getrandom", "--hex", "16", cwd=tmp_path).stdout
        assert len(random.strip()) == 32
        tpm2(d.node, "tpm2_evictcontrol", "-C", "o", "-c", "primary.ctx", "0x81000001", cwd=tmp_path)
        assert d.stop() == 0, d.log()
        # The TPM it was given is not its to stop ...
        assert swtpm.proc.poll() is None, "cusetpm stopped a swtpm it did not start"
        # ... and it was that TPM which served the node: it holds the key persisted above.
        with socket.create_connection(("127.0.0.1", swtpm.port), timeout=30) as raw:

            def transact(command: bytes) -> bytes:
                raw.sendall(command)
                return recv_tpm_message(raw)

            assert get_cap_handles(transact, 0x81000000) == [0x81000001]
    finally:
        swtpm.stop()


@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_both_kernel_profiles_serve(daemon: StartDaemon, tmp_path: Path, kernel: str) -> None:
    d = daemon(kernel=kernel)
    assert f"cusetpm: serving {d.node} (FUSE, kernel {kernel})" in d.log()
    tpm2(d.node, "tpm2_createprimary", "-C", "o", "-c", "primary.ctx", cwd=tmp_path)
    tpm2(d.node, "tpm2_startauthsession", "-S", "session.ctx", cwd=tmp_path)
    tpm2(d.node, "tpm2_flushcontext", "session.ctx", cwd=tmp_path)
    assert len(tpm2(d.node, "tpm2_getrandom", "8", cwd=tmp_path).stdout) == 8


def test_cpu_runs_the_daemon_and_its_swtpm_on_that_cpu_only(daemon: StartDaemon, tmp_path: Path) -> None:
    """--cpu N: every thread of the daemon, and the swtpm it starts, may run on CPU N only, and
    the node serves (a key made, loaded again for each command, as the kernel does)."""
    cpu = max(os.sched_getaffinity(0))
    d = daemon(extra_args=("--cpu", str(cpu)))
    assert d.swtpm_pid is not None
    pid = d.served.proc.pid
    for task in os.listdir(f"/proc/{pid}/task"):
        assert os.sched_getaffinity(int(task)) == {cpu}, task
    assert os.sched_getaffinity(d.swtpm_pid) == {cpu}
    tpm2(d.node, "tpm2_createprimary", "-C", "o", "-c", "primary.ctx", cwd=tmp_path)
    assert b"name:" in tpm2(d.node, "tpm2_readpublic", "-c", "primary.ctx", cwd=tmp_path).stdout
    assert len(tpm2(d.node, "tpm2_getrandom", "8", cwd=tmp_path).stdout) == 8


def test_a_cpu_this_process_may_not_run_on_is_a_one_line_error(tmp_path: Path) -> None:
    mount, state = tmp_path / "mnt", tmp_path / "state"
    result = serve("--fuse", str(mount), "--state-dir", str(state), "--cpu", "4096")
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--cpu: CPU 4096 is not one this process may run on" in lines[0], result.stderr
    assert not state.exists() and not mounted(mount)
