# SPDX-License-Identifier: GPL-2.0-only
"""The backing TPM goes away: the same TPM back, or a restarted one (daemon/recovery.py).

Against real swtpms: the managed one killed, an external one restarted on its state, and a
relay that drops the connection in the middle of a response.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import HR_LOADED_SESSION, HR_TRANSIENT, get_cap_handles
from cusetpm.daemon.recovery import CLOCK_SLACK_MS, TpmIdentity, flush_leftovers
from cusetpm.testing.fake_tpm import FakeTpm
from cusetpm.testing.relay import FlakyRelay
from cusetpm.testing.swtpm import Swtpm
from helpers import create_primary, get_random, rc, read_public
from helpers import transact as cmd

VIRTUAL = 0x80FFFFFF  # the first virtual handle of a space (tpm2_map_response_header)


def wait_for_log(d, text: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while text not in d.log():
        assert time.monotonic() < deadline, f"no {text!r} in the daemon's log:\n{d.log()}"
        time.sleep(0.02)


def retry_until_served(fd: int, data: bytes, timeout: float = 20.0) -> bytes:
    """A command from a file of the current epoch: EPIPE while the TPM is away, then served."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return cmd(fd, data)
        except OSError as exc:
            assert exc.errno == errno.EPIPE and time.monotonic() < deadline, exc
            time.sleep(0.05)


# --- the identity rule, without a TPM ------------------------------------------------------


def test_a_tpm_powered_all_along_is_the_same():
    before = TpmIdentity(3, 1, 10_000, seen_at=100.0)
    assert TpmIdentity(3, 1, 15_000, seen_at=105.0).same_as(before)
    assert TpmIdentity(3, 1, 10_000 + 5_000 - CLOCK_SLACK_MS // 2, seen_at=105.0).same_as(before)


@pytest.mark.parametrize(
    "after",
    [
        TpmIdentity(4, 1, 15_000, 105.0),  # Reset: a Startup(CLEAR) after power-up
        TpmIdentity(3, 2, 15_000, 105.0),  # Restart: Startup(STATE) after Shutdown(STATE)
        TpmIdentity(3, 1, 200, 105.0),  # its clock fell behind: it was off meanwhile
    ],
)
def test_a_reset_restarted_or_powered_off_tpm_is_another(after):
    assert not after.same_as(TpmIdentity(3, 1, 10_000, 100.0))


def test_flush_leftovers_flushes_loaded_objects_and_sessions_but_not_saved_sessions():
    from helpers import context_save, start_auth_session

    fake = FakeTpm(started=True)
    fake.execute(create_primary())
    fake.execute(start_auth_session())  # 0x02000000, saved below
    fake.execute(context_save(0x02000000))
    fake.execute(start_auth_session(policy=True))  # 0x03000001, loaded: a leftover
    assert fake.run(flush_leftovers()) == 2
    assert fake.saved_sessions() == [0x02000000] and fake.loaded_sessions() == [] and fake.objects == {}


# --- real swtpms -------------------------------------------------------------------------------


def test_a_killed_managed_swtpm_is_restarted_and_only_new_files_work(daemon):
    d = daemon()
    old = os.open(d.node, os.O_RDWR)
    old_nb = os.open(d.node, os.O_RDWR | os.O_NONBLOCK)
    finder = os.open(d.node, os.O_RDWR)  # an empty space: nothing to load first
    assert rc(cmd(old, create_primary())) == 0
    os.kill(d.swtpm_pid, signal.SIGKILL)
    with pytest.raises(OSError) as exc:  # the command that finds the TPM gone: the transport's EPIPE
        cmd(finder, get_random())
    assert exc.value.errno == errno.EPIPE
    wait_for_log(d, "the TPM was restarted")
    assert "starting it again" in d.log()
    # Every file opened before the restart: EPIPE on write, EIO on an O_NONBLOCK read.
    for _ in range(3):
        with pytest.raises(OSError) as exc:
            cmd(old, read_public(VIRTUAL))
        assert exc.value.errno == errno.EPIPE
    os.write(old_nb, get_random())
    with pytest.raises(OSError) as exc:
        os.read(old_nb, 4096)
    assert exc.value.errno == errno.EIO
    new = os.open(d.node, os.O_RDWR)
    assert rc(cmd(new, get_random())) == 0
    assert rc(cmd(new, create_primary())) == 0 and rc(cmd(new, read_public(VIRTUAL))) == 0
    for fd in (old, old_nb, new, finder):
        os.close(fd)


def test_an_external_tpm_restarted_on_its_state_is_a_new_epoch(daemon, tmp_path: Path):
    state = tmp_path / "external"
    sw = Swtpm.start(state, keep_state=True)  # started by swtpm itself (startup-clear)
    relay = FlakyRelay(sw.port)
    try:
        d = daemon(extra_args=["--tcti", f"swtpm:host=127.0.0.1,port={relay.port}"])
        old = os.open(d.node, os.O_RDWR)
        assert rc(cmd(old, create_primary())) == 0
        sw.stop()
        sw = Swtpm.start(state, keep_state=True)  # the same state: a TPM Reset, not a new TPM
        relay.target = sw.port
        with pytest.raises(OSError) as exc:  # its saved key cannot be loaded: the kernel's EFAULT
            cmd(old, read_public(VIRTUAL))
        assert exc.value.errno == errno.EFAULT
        wait_for_log(d, "the TPM was restarted")
        with pytest.raises(OSError) as exc:
            cmd(old, read_public(VIRTUAL))
        assert exc.value.errno == errno.EPIPE
        new = os.open(d.node, os.O_RDWR)
        with pytest.raises(OSError) as exc:  # a new file's space is empty: an unknown handle
            cmd(new, read_public(VIRTUAL))
        assert exc.value.errno == errno.EINVAL
        assert rc(cmd(new, create_primary())) == 0
        os.close(old)
        os.close(new)
    finally:
        relay.close()
        sw.stop()


def test_a_connection_cut_mid_response_keeps_the_tpm_and_what_other_files_hold(daemon, relayed_tpm):
    mux, relay = relayed_tpm.mux, relayed_tpm.relay
    d = daemon(extra_args=relayed_tpm.args)
    bystander, victim = os.open(d.node, os.O_RDWR), os.open(d.node, os.O_RDWR)
    assert rc(cmd(bystander, create_primary())) == 0
    relay.cut_next_response(after=4)
    with pytest.raises(OSError) as exc:  # CreatePrimary ran in the TPM; its answer was lost
        cmd(victim, create_primary())
    assert exc.value.errno == errno.EPIPE
    # The same TPM: the bystander's key loads again, the victim's file still works.
    assert rc(retry_until_served(bystander, read_public(VIRTUAL))) == 0
    wait_for_log(d, "the TPM is back, the same TPM (1 handles")
    assert rc(cmd(victim, get_random())) == 0
    # The object the cut-short CreatePrimary made was flushed; nothing else is loaded.
    assert get_cap_handles(mux.transact, HR_TRANSIENT) == []
    assert get_cap_handles(mux.transact, HR_LOADED_SESSION) == []
    os.close(bystander)
    os.close(victim)


def test_while_the_tpm_is_unreachable_writes_fail_and_files_opened_meanwhile_work_after(daemon, relayed_tpm):
    mux, relay = relayed_tpm.mux, relayed_tpm.relay
    d = daemon(extra_args=relayed_tpm.args)
    holder = os.open(d.node, os.O_RDWR)
    assert rc(cmd(holder, create_primary())) == 0
    relay.target = 1  # nothing listens there: every reconnection fails
    relay.drop()
    with pytest.raises(OSError) as exc:
        cmd(holder, get_random())
    assert exc.value.errno in (errno.EFAULT, errno.EPIPE)  # the key's load, or the command, failed
    meanwhile = os.open(d.node, os.O_RDWR)
    for fd in (holder, meanwhile):
        with pytest.raises(OSError) as exc:
            cmd(fd, get_random())
        assert exc.value.errno == errno.EPIPE
    time.sleep(0.5)  # several failed reconnections
    assert d.served.proc.poll() is None
    relay.target = mux.port
    assert rc(retry_until_served(meanwhile, get_random())) == 0
    assert rc(cmd(holder, read_public(VIRTUAL))) == 0  # the same TPM: the key is still there
    os.close(holder)
    os.close(meanwhile)


def test_global_session_accounting_forgets_every_session_of_a_restarted_tpm(daemon, tmp_path: Path):
    """--sessions global: the registry is emptied when the TPM restarts (its sessions are gone),
    so the new TPM's sessions are counted from zero; `cusetpm status` shows it."""
    import json
    import subprocess
    import sys

    from helpers import start_auth_session

    control = tmp_path / "control.sock"
    d = daemon(extra_args=["--sessions", "global", "--control", str(control)])

    def status() -> dict:  # type: ignore[type-arg]
        out = subprocess.run([sys.executable, "-m", "cusetpm", "status", "--json", "--control", str(control)],
                             capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
        return json.loads(out)  # type: ignore[no-any-return]

    old = os.open(d.node, os.O_RDWR)
    assert rc(cmd(old, start_auth_session())) == 0
    assert status()["features"]["GlobalSessions"]["known"] == 1
    os.kill(d.swtpm_pid, signal.SIGKILL)
    probe = os.open(d.node, os.O_RDWR)
    with pytest.raises(OSError):
        cmd(probe, get_random())
    wait_for_log(d, "the TPM was restarted")
    new = os.open(d.node, os.O_RDWR)
    assert rc(cmd(new, start_auth_session())) == 0
    snap = status()
    assert snap["tpm"]["restarts"] == 1
    assert (
        snap["features"]["GlobalSessions"]["known"] == 1
        and snap["features"]["GlobalSessions"]["counters"]["resets"] == 1
    )
    for fd in (old, probe, new):
        os.close(fd)
