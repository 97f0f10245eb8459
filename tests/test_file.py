# SPDX-License-Identifier: GPL-2.0-only
"""The trio adapter for files (cusetpm.daemon.file): locks, the async (O_NONBLOCK) path, poll
wake-ups, the timer, close."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from cusetpm.backends import managed_swtpm
from cusetpm.daemon import Node, TpmChip
from cusetpm.kernel import tpm_dev_common
from cusetpm.kernel.profiles import PROFILES
from cusetpm.kernel.tpm_dev_common import POLL_IN, POLL_OUT
from cusetpm.kernel.wire import be32
from helpers import create_primary, get_cap_handles, get_random, handles_of, rc, start_auth_session


def with_device(profile: str = "6.12"):
    """Run an async test body with a node on a registered chip on a fresh managed swtpm."""

    def deco(fn):
        def wrapper(tmp_path):
            async def main():
                async with managed_swtpm(tmp_path / "state") as backend:
                    chip = TpmChip(backend)
                    await chip.register()
                    dev = Node(chip, PROFILES[profile])
                    async with trio.open_nursery() as nursery:
                        await nursery.start(chip.serve)
                        await fn(dev)
                        nursery.cancel_scope.cancel()

            trio.run(main)

        wrapper.__name__ = fn.__name__
        wrapper.__doc__ = fn.__doc__
        return wrapper

    return deco


async def cmd(f, data: bytes) -> bytes:
    assert await f.write(data, False) == len(data)
    return await f.read(4096)


@with_device()
async def test_nonblocking_write_returns_at_once_and_poll_waits(dev):
    f = dev.open()
    woken = []
    assert await f.poll(lambda: woken.append(1)) == POLL_OUT
    data = get_random(8)
    assert await f.write(data, True) == len(data)
    with pytest.raises(OSError) as exc:
        await f.write(data, True)  # queued, not started or running: EBUSY
    assert exc.value.errno == errno.EBUSY
    assert await f.poll(None) == POLL_IN  # blocks on the file lock until the command ran
    assert woken == [1]  # async completion wakes poll waiters
    out = await f.read(4096)
    assert rc(out) == 0 and len(out) == 20
    assert await f.poll(None) == POLL_OUT
    await f.release()


@with_device()
async def test_a_poll_and_a_read_waiting_for_the_command_are_answered_as_it_ends(dev):
    """After an O_NONBLOCK write, a poll and a read that wait only for the command are queued
    on the file (no task), run in order under the lock as it ends, and their replies come
    before the wake-up: the kernel's mutex hands the lock over, then wakes pollers."""
    f = dev.open()
    events: list[object] = []
    assert f.try_poll(lambda: events.append("woken")) == POLL_OUT
    assert f.poll_after_work(None, events.append) is False  # nothing holds the lock
    data = get_random(8)
    async with dev.chip.lock:  # the command cannot end meanwhile
        assert f.try_write(data, True) == len(data)
        f.after_reply()  # the chip is busy: the worker runs it
        assert f.try_poll(None) is None  # the command holds the lock
        assert f.poll_after_work(lambda: events.append("woken"), events.append) is True
        assert f.read_after_work(4096, events.append) is True
        assert f.poll_after_work(None, events.append) is True
        await trio.sleep(0.05)
        assert events == []
    with trio.fail_after(10):
        await f._work_done.wait()
    mask, response, after = events[:3]
    assert mask == POLL_IN and after == POLL_OUT  # the read between them took the response
    assert isinstance(response, bytes) and rc(response) == 0 and len(response) == 20
    assert events[3:] == ["woken"]
    assert f.try_read(4096) == b""
    # A call that comes while a task already waits for the lock queues behind that task.
    async with trio.open_nursery() as n:
        async with dev.chip.lock:  # the command waits for the chip meanwhile
            assert f.try_write(data, True) == len(data)
            f.after_reply()
            n.start_soon(f.read, 4096)
            with trio.fail_after(10):
                while f.lock.statistics().tasks_waiting == 0:
                    await trio.sleep(0)
            assert f.poll_after_work(None, events.append) is False
            assert f.read_after_work(4096, events.append) is False
    assert f.try_read(4096) == b"" and events[4:] == []  # the task read it
    await f.release()


@with_device()
async def test_a_read_waiting_for_the_command_gets_its_error(dev):
    f = dev.open()
    got: list[object] = []
    await f.write(b"\x80\x01\x00\x00\x00\x0e\x00\x00\x01\x73\x80\xff\xff\xff", True)  # ReadPublic(empty vh)
    assert f.read_after_work(4096, got.append) is True
    with trio.fail_after(10):
        await f._work_done.wait()
    (err,) = got
    assert isinstance(err, OSError) and err.errno == errno.EINVAL
    assert await f.read(4096) == b""
    await f.release()


@with_device()
async def test_a_blocking_write_run_by_the_worker_is_answered_as_its_command_ends(dev):
    """write_after_work(): a blocking write with the lock free is run by the worker and answered
    through its reply (no task), as write() would answer it: the size, the response kept for
    read(), no poll wake-up; a poll that comes meanwhile waits for it, as on the kernel's lock;
    errors (EPIPE with the chip gone, the kernel's EBUSY and EINVAL) are replies too."""
    f = dev.open()
    got: list[object] = []
    woken: list[str] = []
    assert f.try_poll(lambda: woken.append("woken")) == POLL_OUT
    data = get_random(8)
    async with dev.chip.lock:  # the command cannot end meanwhile
        assert f.write_after_work(data, got.append) is True
        assert f.try_write(data, True) is None and f.write_after_work(data, got.append) is False
        assert f.poll_after_work(None, got.append) is True
        await trio.sleep(0.05)
        assert got == []
    with trio.fail_after(10):
        await f._work_done.wait()
    assert got == [len(data), POLL_IN] and woken == []
    response = f.try_read(4096)
    assert response is not None and rc(response) == 0 and len(response) == 20
    # EBUSY: a response not read yet; EINVAL: a size below the header's (raised, nothing queued).
    assert f.write_after_work(data, got.append) is True
    with trio.fail_after(10):
        await f._work_done.wait()
    with pytest.raises(OSError) as exc:
        f.write_after_work(data, got.append)
    assert exc.value.errno == errno.EBUSY and f.lock.value == 1
    assert f.try_read(4096) is not None
    with pytest.raises(OSError) as exc:
        f.write_after_work(data[:8], got.append)
    assert exc.value.errno == errno.EINVAL and f.lock.value == 1
    dev.chip.available = False
    assert f.write_after_work(data, got.append) is True
    with trio.fail_after(10):
        await f._work_done.wait()
    dev.chip.available = True
    err = got[-1]
    assert isinstance(err, OSError) and err.errno == errno.EPIPE and f.lock.value == 1
    await f.release()


@with_device()
async def test_sync_completion_does_not_wake_pollers(dev):
    f = dev.open()
    woken = []
    await f.poll(lambda: woken.append(1))
    await cmd(f, get_random())
    assert woken == []


@with_device()
async def test_async_error_is_reported_by_read_once(dev):
    f = dev.open()
    await f.write(b"\x80\x01\x00\x00\x00\x0e\x00\x00\x01\x73\x80\xff\xff\xff", True)  # ReadPublic(empty vh)
    assert await f.poll(None) == POLL_IN
    with pytest.raises(OSError) as exc:
        await f.read(4096)
    assert exc.value.errno == errno.EINVAL
    assert await f.read(4096) == b""


@with_device()
async def test_a_busy_file_does_not_hold_up_another(dev):
    a, b = dev.open(), dev.open()
    order = []

    async def slow():
        for _ in range(3):
            await cmd(a, create_primary())
        order.append("a")

    async with trio.open_nursery() as n:
        n.start_soon(slow)
        await trio.sleep(0)
        assert await b.read(4096) == b""  # b's lock is free: answers while a works
        assert await b.poll(None) == POLL_OUT
        order.append("b")
    assert order == ["b", "a"]


@with_device()
async def test_unread_response_timer(dev):
    f = dev.open()
    tpm_dev_common.USER_READ_TIMEOUT, saved = 0.3, tpm_dev_common.USER_READ_TIMEOUT
    try:
        woken = []
        await f.write(get_random(8), False)
        await f.poll(lambda: woken.append(1))
        assert len(await f.read(3)) == 3  # partial: does not restart the timer
        await trio.sleep(0.6)
        assert woken == [1]
        assert await f.poll(None) == POLL_OUT
        assert await f.read(4096) == b""
        assert rc(await cmd(f, get_random())) == 0
    finally:
        tpm_dev_common.USER_READ_TIMEOUT = saved


@with_device()
async def test_release_waits_for_async_work_and_flushes_sessions(dev):
    f = dev.open()
    s = be32(await cmd(f, start_auth_session()), 10)
    await f.write(create_primary(), True)
    await f.release()  # waits for the queued command, then flushes the session
    g = dev.open()
    loaded = handles_of(await cmd(g, get_cap_handles(0x02000000)))
    saved = handles_of(await cmd(g, get_cap_handles(0x03000000)))
    assert s not in loaded and not [h for h in saved if h & 0xFFFFFF == s & 0xFFFFFF]
    assert handles_of(await cmd(g, get_cap_handles())) == []


@with_device()
async def test_unavailable_chip_epipe_sync_eio_async(dev):
    f = dev.open()
    dev.chip.available = False
    with pytest.raises(OSError) as exc:
        await f.write(get_random(), False)
    assert exc.value.errno == errno.EPIPE
    await f.write(get_random(), True)
    assert await f.poll(None) == POLL_IN
    with pytest.raises(OSError) as exc:
        await f.read(4096)
    assert exc.value.errno == errno.EIO
    dev.chip.available = True


@with_device("6.12")
async def test_zero_read_keeps_the_response_on_612(dev):
    f = dev.open()
    await f.write(get_random(), False)
    assert await f.read(0) == b""
    assert rc(await f.read(4096)) == 0


@with_device("6.1")
async def test_zero_read_discards_the_response_on_61(dev):
    f = dev.open()
    await f.write(get_random(), False)
    assert await f.read(0) == b""
    assert await f.read(4096) == b""


def test_shutdown_flushes_every_open_files_sessions(tmp_path):
    async def main():
        async with managed_swtpm(tmp_path / "state") as backend:
            dev = Node(TpmChip(backend), PROFILES["6.12"])
            await dev.chip.register()
            async with trio.open_nursery() as nursery:
                await nursery.start(dev.chip.serve)
                files = [dev.open() for _ in range(2)]
                for f in files:
                    assert rc(await cmd(f, start_auth_session())) == 0
                nursery.cancel_scope.cancel()
            assert dev.files == set()
            sent = backend.commands_sent
            probe = Node(TpmChip(backend), PROFILES["6.12"])
            await probe.chip.register()
            async with trio.open_nursery() as nursery:
                await nursery.start(probe.chip.serve)
                g = probe.open()
                assert handles_of(await cmd(g, get_cap_handles(0x02000000))) == []
                assert handles_of(await cmd(g, get_cap_handles(0x03000000))) == []
                nursery.cancel_scope.cancel()
            assert backend.commands_sent > sent

    trio.run(main)


def test_shutdown_runs_queued_async_commands_then_closes(tmp_path):
    async def main():
        async with managed_swtpm(tmp_path / "state") as backend:
            dev = Node(TpmChip(backend), PROFILES["6.12"])
            await dev.chip.register()
            files = []
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    await nursery.start(dev.chip.serve)
                    for _ in range(3):
                        f = dev.open()
                        await cmd(f, start_auth_session())
                        await f.write(create_primary(), True)  # queued, maybe not started
                        files.append(f)
                    nursery.cancel_scope.cancel()
            assert dev.files == set() and all(f.closed for f in files)
            assert all(f.state.response_length > 0 for f in files)  # each queued command ran

    trio.run(main)


@with_device()
async def test_expired_timer_behind_a_busy_lock_queues_one_timeout(dev):
    """The timer fires while the file lock is held: one timeout is queued, not one per loop."""
    f = dev.open()
    tpm_dev_common.USER_READ_TIMEOUT, saved = 0.2, tpm_dev_common.USER_READ_TIMEOUT
    spawned = []
    real_spawn = dev.chip.spawn
    dev.chip.spawn = lambda fn: (spawned.append(fn), real_spawn(fn))  # type: ignore[method-assign]
    try:
        await f.write(get_random(8), False)
        await f.lock.acquire()  # as a long command of this file would
        await trio.sleep(0.6)
        f.lock.release()
        await trio.sleep(0.1)
        assert len(spawned) == 1
        assert await f.read(4096) == b""  # discarded once the lock was free
        assert rc(await cmd(f, get_random())) == 0
    finally:
        tpm_dev_common.USER_READ_TIMEOUT = saved


#: A client that holds a session and a key, sends ``LAST`` and waits to be killed.
_KILLED_CLIENT = r"""
import os, sys
sys.path.insert(0, sys.argv[2])
from helpers import create_primary, start_auth_session, command, u32, PW_AUTH
from tpm2_pytss.types import TPM2B_PUBLIC
fd = os.open(sys.argv[1], os.O_RDWR)
for c in (start_auth_session(), create_primary()):
    os.write(fd, c); assert os.read(fd, 4096)[6:10] == bytes(4)
if sys.argv[3] == "rsa3072":
    rsa = TPM2B_PUBLIC.parse("rsa3072", objectAttributes="userwithauth|decrypt|restricted|fixedtpm|fixedparent|sensitivedataorigin").marshal()
    last = command(0x131, u32(0x40000001) + PW_AUTH + b"\x00\x04\x00\x00\x00\x00" + rsa + b"\x00\x00" + u32(0), tag=0x8002)
else:
    last = bytes.fromhex("80010000000c0000017b0008")
print("sending", flush=True)
os.write(fd, last)
print("sent", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("last", ["getrandom", "rsa3072"], ids=["between-write-and-read", "during-rsa3072"])
def test_a_client_killed_mid_command_leaves_nothing_in_the_tpm(daemon, last):
    """SIGKILL after write() (a fast command, or during a slow RSA-3072 CreatePrimary): the
    command completes, then the file's session and objects are flushed."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from conftest import BackendHandles, settled_backend_handles

    d = daemon(inspectable=True)
    here = str(Path(__file__).parent)
    inside = 0
    for _ in range(10 if last == "rsa3072" else 1):
        client = subprocess.Popen(
            [sys.executable, "-c", _KILLED_CLIENT, str(d.node), here, last],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert client.stdout is not None and client.stdout.readline() == "sending\n"
            if last != "rsa3072":
                assert client.stdout.readline() == "sent\n"
            client.send_signal(signal.SIGKILL)
        finally:
            client.wait(30)
        inside += client.stdout.read() == ""  # killed inside write(): the key was still being made
        if inside:
            break
    assert last != "rsa3072" or inside, "RSA-3072 key generation never outlasted the kill"
    assert settled_backend_handles(d, quiet=0.5, timeout=120) == BackendHandles([], [], [])
    fd = os.open(d.node, os.O_RDWR)  # the daemon still serves
    try:
        os.write(fd, get_random())
        assert rc(os.read(fd, 4096)) == 0
    finally:
        os.close(fd)


@with_device()
async def test_an_o_nonblock_command_runs_in_the_request_loop_while_nobody_else_needs_the_tpm(dev):
    """after_reply(): with the chip free and swtpm's answer within the spin, the command ends
    before after_reply returns: no task, no await, and the file is as the worker leaves it
    (lock free, response pending, pollers woken).  With the chip busy it goes to the worker.
    A blocking write the loop takes (write_after_work) runs the same way."""
    from cusetpm.backends.spin import SpinWait

    dev.chip.backend.spin_wait = SpinWait(5.0)  # swtpm answers long before
    await trio.sleep(0.01)  # the backend's watch starts
    f = dev.open()
    woken: list[int] = []
    assert f.try_poll(lambda: woken.append(1)) == POLL_OUT
    data = get_random(8)
    assert f.try_write(data, True) == len(data) and f.lock.value == 0  # the command holds it
    f.after_reply()
    assert f.lock.value == 1 and woken == [1] and f.try_poll(None) == POLL_IN
    response = f.try_read(4096)
    assert response is not None and rc(response) == 0 and len(response) == 20
    f.after_reply()  # nothing taken: nothing to run
    assert f.try_poll(None) == POLL_OUT
    async with dev.chip.lock:
        assert f.try_write(data, True) == len(data)
        f.after_reply()
        await trio.sleep(0.05)
        assert f.lock.value == 0 and f.try_poll(None) is None  # queued for the worker
    with trio.fail_after(10):
        await f._work_done.wait()
    assert f.try_poll(None) == POLL_IN
    assert f.try_read(4096) is not None
    # A blocking write (write_after_work) the same way: answered before the call returns,
    # and, as the kernel's blocking write, it wakes no poller.
    got: list[object] = []
    woken.clear()
    assert f.try_poll(lambda: woken.append(1)) == POLL_OUT
    assert f.write_after_work(data, got.append) is True
    assert got == [len(data)] and f.lock.value == 1 and woken == []
    response = f.try_read(4096)
    assert response is not None and rc(response) == 0 and len(response) == 20
    await f.release()


@with_device()
async def test_a_watched_nodes_commands_run_in_the_request_loop_and_are_counted_once(dev):
    """A node whose commands are watched (metrics here; a tenant or an audit trail alike) takes
    the request loop's path too, and what watches is told of each command once, whichever way
    it ran: in the loop (O_NONBLOCK or blocking), or in the worker while the chip was busy."""
    from cusetpm.backends.spin import SpinWait
    from cusetpm.daemon.metrics import Metrics

    dev.chip.backend.spin_wait = SpinWait(5.0)  # swtpm answers long before
    await trio.sleep(0.01)  # the backend's watch starts
    dev.metrics = Metrics(dev.chip, [dev])
    assert dev.observed

    def counted() -> tuple[float | None, float | None]:
        labels = {"node": dev.name, "command": "GetRandom", "outcome": "success"}
        sample = dev.metrics.registry.get_sample_value
        backend = sample("cusetpm_node_backend_commands_total", {"node": dev.name})
        return sample("cusetpm_commands_total", labels), backend

    f = dev.open()
    data = get_random(8)
    assert f.try_write(data, True) == len(data)
    f.after_reply()
    assert f.lock.value == 1 and f.try_poll(None) == POLL_IN  # ended in the loop
    assert counted() == (1.0, 1.0)
    assert f.try_read(4096) is not None
    got: list[object] = []
    assert f.write_after_work(data, got.append) is True and got == [len(data)]
    assert counted() == (2.0, 2.0)
    assert f.try_read(4096) is not None
    async with dev.chip.lock:  # busy: the command goes to the worker
        assert f.try_write(data, True) == len(data)
        f.after_reply()
        assert counted() == (2.0, 2.0)
    with trio.fail_after(10):
        await f._work_done.wait()
    assert counted() == (3.0, 3.0)
    await f.release()
    dev.metrics.close()


@with_device()
async def test_a_rate_limited_nodes_commands_run_in_the_request_loop_while_within_the_rate(dev):
    """commands_per_second: a command within the rate runs in the request loop and takes its
    token there; one over the rate goes to the worker, which waits its turn (Node.throttle),
    as every command of such a node used to."""
    from cusetpm.backends.spin import SpinWait
    from cusetpm.tenants.rate import TokenBucket

    dev.chip.backend.spin_wait = SpinWait(5.0)  # swtpm answers long before
    await trio.sleep(0.01)  # the backend's watch starts
    dev.bucket = TokenBucket(10, burst=2)
    f = dev.open()
    data = get_random(8)
    assert f.try_write(data, True) == len(data)
    f.after_reply()
    assert f.lock.value == 1 and f.try_poll(None) == POLL_IN  # ended in the loop
    assert f.try_read(4096) is not None
    got: list[object] = []
    assert f.write_after_work(data, got.append) is True and got == [len(data)]  # blocking, the same
    assert f.try_read(4096) is not None
    assert dev.bucket.tokens < 1.0  # the burst is spent
    start = trio.current_time()
    assert f.try_write(data, True) == len(data)
    f.after_reply()
    assert f.lock.value == 0  # the worker holds it, waiting for a token
    with trio.fail_after(10):
        await f._work_done.wait()
    assert trio.current_time() - start >= 0.08  # a token comes every 0.1 s
    assert f.try_poll(None) == POLL_IN and f.try_read(4096) is not None
    await f.release()
