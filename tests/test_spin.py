# SPDX-License-Identifier: GPL-2.0-only
"""The socket backends' spin for the TPM's answer (cusetpm.backends.spin): it returns as soon as
the answer is there, gives up after its time, ends early for a channel's request (later while
the command is alone), and a socket backend with it answers exactly as without."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from cusetpm.backends.spin import ALONE_GRACE, SpinWait


@pytest.fixture
def tpm() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the backend's end, the TPM's end)."""
    yield from _pair()


@pytest.fixture
def channel() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the channel the spin watches, the kernel's end that sends it requests)."""
    yield from _pair()


def _pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def timed(spin: SpinWait, fd: int) -> tuple[bool, float]:
    start = time.perf_counter()
    got = spin.ready(fd)
    return got, time.perf_counter() - start


def test_off_it_returns_at_once(tpm: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = tpm
    theirs.send(b"answer")
    assert SpinWait(0.0).ready(ours.fileno()) is False  # the caller reads or waits, as without


def test_an_answer_already_there_or_coming_during_the_spin_ends_it(tpm: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = tpm
    spin = SpinWait(2.0)
    theirs.send(b"answer")
    got, took = timed(spin, ours.fileno())
    assert got and took < 0.5
    assert ours.recv(100) == b"answer"  # the spin only looks
    later = threading.Timer(0.01, theirs.send, (b"late",))
    later.start()
    got, took = timed(spin, ours.fileno())
    later.join()
    assert got and 0.005 < took < 1.0


def test_no_answer_gives_up_after_its_time(tpm: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = tpm
    got, took = timed(SpinWait(0.02), ours.fileno())
    assert not got and 0.02 <= took < 0.5


def test_a_request_on_a_channel_ends_the_spin_after_a_grace_and_only_a_client_alone_spins(
    tpm: tuple[socket.socket, socket.socket], channel: tuple[socket.socket, socket.socket]
) -> None:
    ours, theirs = tpm
    watched, kernel = channel
    alone = True
    spin = SpinWait(0.2, alone=lambda: alone)
    spin.watch(watched.fileno())
    kernel.send(b"request")
    got, took = timed(spin, ours.fileno())
    assert not got and ALONE_GRACE <= took < 0.1  # its own poll, most likely: let it wait a little
    theirs.send(b"answer")
    assert spin.ready(ours.fileno())  # the answer wins over a waiting request
    ours.recv(100)
    spin.forget(watched.fileno())
    got, took = timed(spin, ours.fileno())
    assert not got and took >= 0.2  # forgotten: the request there no longer ends the spin
    alone = False
    got, took = timed(spin, ours.fileno())
    assert not got and took < 0.1  # not a client alone: no spin at all


def answer_once(listener: socket.socket, response: bytes) -> None:
    """A TPM in a thread of its own: one command, answered while the backend spins."""
    conn, _ = listener.accept()
    with conn:
        conn.recv(4096)
        time.sleep(0.002)
        conn.sendall(response)


def test_a_socket_backend_with_a_spin_answers_as_without() -> None:
    from cusetpm.backends.socket import SocketBackend
    from cusetpm.kernel import wire

    response = wire.command(0)  # a 10-byte success
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    address = f"\0cusetpm-test-spin-{id(listener)}"
    listener.bind(address)
    listener.listen(1)
    calls: list[int] = []

    class Counting(SpinWait):
        def ready(self, fd: int, seconds: float | None = None) -> bool:
            got = super().ready(fd, seconds)
            calls.append(got)
            return got

    async def main() -> None:
        backend = SocketBackend("", 0, unix=address)
        backend.spin_wait = Counting(1.0)
        await backend.connect()
        assert await backend.transmit(wire.command(0x17B), 5) == response
        await backend.aclose()

    tpm = threading.Thread(target=answer_once, args=(listener, response))
    tpm.start()
    try:
        trio.run(main)
    finally:
        tpm.join()
        listener.close()
    assert calls == [True]


def test_may_wait_only_when_spinning_and_alone() -> None:
    """The device backend asks this before it writes a kernel TPM blocking."""
    alone = [True]
    assert SpinWait(1e-4).may_wait()
    assert SpinWait(1e-4, alone=lambda: alone[0]).may_wait()
    assert not SpinWait(0.0).may_wait()
    alone[0] = False
    assert not SpinWait(1e-4, alone=lambda: alone[0]).may_wait()


def test_the_spin_for_an_answer_lasts_about_as_long_as_its_command_took_last_time(
    tpm: tuple[socket.socket, socket.socket],
) -> None:
    """budget: the spin's own time for a command never seen, or one quicker than that; 1.25
    times its last answer's time and 20 µs for a slower one; none for one slower than the
    cap.  awaiting/spin_until: when the answer a client alone waits for in trio is due, until
    it comes (answered) or while the client is not alone."""
    from cusetpm.backends.spin import SPIN_CAP

    alone = [True]
    spin = SpinWait(100e-6, alone=lambda: alone[0])
    sign, rand, keygen = 0x15D, 0x17B, 0x131
    assert spin.budget(sign) == 100e-6
    spin.answered(rand, 20e-6)
    spin.answered(sign, 300e-6)
    spin.answered(keygen, SPIN_CAP)
    assert spin.budget(rand) == 100e-6
    assert spin.budget(sign) == pytest.approx(395e-6)
    assert spin.budget(keygen) == 0.0
    ours, theirs = tpm
    theirs.send(b"answer")
    assert spin.ready(ours.fileno(), spin.budget(keygen)) is False  # not even a look
    assert spin.ready(ours.fileno(), spin.budget(sign)) is True
    assert spin.spin_until() == 0.0
    spin.awaiting(sign, 10.0)
    assert spin.spin_until() == pytest.approx(10.0 + 395e-6)
    alone[0] = False
    assert spin.spin_until() == 0.0
    alone[0] = True
    spin.awaiting(keygen, 10.0)
    assert spin.spin_until() == 0.0  # not worth spinning for
    spin.awaiting(sign, 10.0)
    spin.answered(sign, 310e-6)
    assert spin.spin_until() == 0.0 and spin.took[sign] == 310e-6
