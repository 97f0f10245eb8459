# SPDX-License-Identifier: GPL-2.0-only
"""Backends against real swtpm processes."""

from __future__ import annotations

import errno
import socket

import pytest
import trio

from cusetpm.backends import BackendError, SocketBackend, TctiBackend, managed_swtpm, unframeable
from cusetpm.kernel import wire as tpm
from cusetpm.kernel.wire import be32
from helpers import RawTpm, get_random


def test_managed_swtpm_starts_answers_and_stops(tmp_path):
    async def main():
        async with managed_swtpm(tmp_path) as backend:
            rsp = await backend.transmit(tpm.command(tpm.CC_STARTUP, b"\x00\x00"), 1.0)
            assert be32(rsp, 6) == 0
            rsp = await backend.transmit(get_random(8), 2.0)
            assert be32(rsp, 6) == 0 and len(rsp) == 20
            port = backend.port
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

    trio.run(main)


def test_unreachable_socket_is_a_backend_error():
    async def main():
        with pytest.raises(BackendError):
            await SocketBackend("127.0.0.1", 1).connect()

    trio.run(main)


def test_timeout_is_etime_and_the_stream_recovers():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    async def main():
        backend = SocketBackend("127.0.0.1", listener.getsockname()[1])
        assert await backend.transmit(get_random(), 0.2) == -errno.ETIME  # nobody answers
        conn, _ = listener.accept()
        conn.close()
        assert await backend.transmit(get_random(), 0.5) in (-errno.EPIPE, -errno.ETIME)

    trio.run(main)
    listener.close()


def test_short_frames_are_answered_command_size():
    assert be32(unframeable(b"\x80\x01\x00\x00\x00\x07\x00"), 6) == 0x142
    assert unframeable(get_random()) is None


def test_tcti_backend_talks_to_swtpm():
    raw = RawTpm.start()
    port = raw.port
    raw.sock.close()  # swtpm serves one client at a time

    async def main():
        backend = TctiBackend(f"swtpm:host=127.0.0.1,port={port}")
        rsp = await backend.transmit(get_random(8), 2.0)
        assert be32(rsp, 6) == 0 and len(rsp) == 20
        assert backend.commands_sent == 1
        await backend.aclose()

    try:
        trio.run(main)
    finally:
        raw.proc.terminate()
        raw.proc.wait()


def test_tcti_backend_bad_conf_is_a_backend_error():
    with pytest.raises(BackendError):
        TctiBackend("nosuchtcti:x")
