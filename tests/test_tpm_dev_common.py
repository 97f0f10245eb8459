# SPDX-License-Identifier: GPL-2.0-only
"""tpm-dev-common.c file semantics on FileState + tpm_dev_transmit, against a real swtpm."""

from __future__ import annotations

import errno

import pytest

from cusetpm.kernel import wire as tpm
from cusetpm.kernel.tpm_dev_common import POLL_IN, POLL_OUT, USER_READ_TIMEOUT, FileState
from cusetpm.kernel.wire import be32
from helpers import SyncFile, get_random, make_chip, rc, read_public, response


@pytest.fixture(params=["6.1", "6.12"])
def f(request, raw):
    return SyncFile(make_chip(raw, request.param), raw)


def errno_of(fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def test_write_returns_size_and_read_returns_response(f):
    cmd = get_random(16)
    assert f.write(cmd) == len(cmd)
    out = f.read(4096)
    assert rc(out) == 0 and len(out) == 10 + 2 + 16
    assert f.read(4096) == b""  # nothing pending: 0, never EAGAIN


def test_write_size_checks(f):
    assert errno_of(f.write, b"\x80\x01" + b"\x00" * 4095) == errno.E2BIG
    assert errno_of(f.write, b"") == errno.EINVAL
    assert errno_of(f.write, b"\x80\x01\x00\x00\x00") == errno.EINVAL  # 5 bytes
    assert errno_of(f.write, get_random()[:11]) == errno.EINVAL  # header 12 > size 11


def test_header_smaller_than_write_sends_only_header_bytes(f, raw):
    cmd = get_random(4) + b"\xde\xad\xbe\xef\x00"
    sent = []
    raw.injectors.append(lambda c: sent.append(c))
    assert f.write(cmd) == len(cmd)
    assert sent == [get_random(4)]
    assert rc(f.read()) == 0


def test_header_size_zero_is_enodata(f):
    cmd = bytearray(get_random())
    cmd[2:6] = b"\x00\x00\x00\x00"
    assert errno_of(f.write, bytes(cmd)) == errno.ENODATA


def test_stale_command_code_from_failed_command(f, raw):
    """A 7-byte write inherits bytes 7..9 (the command code) of the command before it."""
    cmd = bytearray(get_random(8))
    cmd[2:6] = b"\x00\x00\x00\x00"
    assert errno_of(f.write, bytes(cmd)) == errno.ENODATA
    sent = []
    raw.injectors.append(lambda c: sent.append(c))
    assert f.write(b"\x80\x01\x00\x00\x00\x07\x00") == 7
    # Known cc (GetRandom, from the stale bytes): 7 bytes go to the TPM, which rejects them.
    assert sent == [b"\x80\x01\x00\x00\x00\x07\x00"]
    assert rc(f.read()) == 0x142
    # After a fully read response the buffer is zero: cc 0 is unknown, synthesized.
    assert f.write(b"\x80\x01\x00\x00\x00\x07\x00") == 7
    assert f.read() == bytes.fromhex("80010000000a000b0143")


def test_ebusy_until_a_read_then_partial_read_unlocks(f):
    f.write(get_random(16))
    assert errno_of(f.write, get_random()) == errno.EBUSY
    first = f.read(4)
    assert len(first) == 4
    rest1 = f.read(3)
    assert len(rest1) == 3
    f.write(get_random(2))  # the unread rest is thrown away
    out = f.read()
    assert len(out) == 14 and rc(out) == 0


def test_partial_reads_are_consecutive(f):
    f.write(get_random(16))
    whole = f.state.buf[:28]
    parts = f.read(4) + f.read(3) + f.read(4096)
    assert parts == bytes(whole)
    assert f.read() == b""


def test_failed_write_clobbers_a_partly_read_response(f):
    f.write(get_random(34))  # 46-byte response
    assert len(f.read(2)) == 2
    bad = bytes(range(40))  # header size 0x02030405 > 40: EINVAL, but copied first
    assert errno_of(f.write, bad) == errno.EINVAL
    rest = f.read()
    assert rest[:38] == bad[2:40]
    assert len(rest) == 44


def test_read_size_zero(f):
    f.write(get_random())
    assert f.read(0) == b""
    if f.chip.profile.read_zero_returns_early:
        # 6.12 returns 0 before the lock: the response is still there.
        assert not f.state.read_needs_lock(0)
        assert f.state.response_length > 0
        rsp = f.read()
        assert rc(rsp) == 0 and len(rsp) == be32(rsp, 2) > 10
    else:
        # 6.1 processes the read: the response is discarded.
        assert f.state.read_needs_lock(0)
        assert f.state.response_length == 0
        assert f.read() == b""


def test_poll_mask(f):
    assert f.state.poll_mask() == POLL_OUT
    f.write(get_random())
    assert f.state.poll_mask() == POLL_IN
    f.read(3)
    assert f.state.poll_mask() == POLL_IN
    f.read()
    assert f.state.poll_mask() == POLL_OUT


def test_async_error_reported_once_by_read():
    from cusetpm.kernel.profiles import PROFILES

    st = FileState(PROFILES["6.12"])
    st.accept_write(get_random())
    st.command_enqueued = True
    assert errno_of(st.accept_write, get_random()) == errno.EBUSY
    st.async_finished(-errno.EINVAL, now=5.0)
    assert st.poll_mask() == POLL_IN
    assert errno_of(st.accept_write, get_random()) == errno.EBUSY
    assert errno_of(st.read, 4096) == errno.EINVAL
    assert st.read(4096) == b""
    assert st.poll_mask() == POLL_OUT


def test_async_ops_failure_starts_no_timer():
    from cusetpm.kernel.profiles import PROFILES

    st = FileState(PROFILES["6.1"])
    st.accept_write(get_random(), nonblock=True)
    assert st.command_enqueued
    st.async_chip_gone()
    assert not st.command_enqueued
    assert st.deadline is None and st.response_length == -errno.EIO


def test_blocking_write_on_a_gone_chip_is_epipe():
    with pytest.raises(OSError) as exc:
        FileState.check_chip(False)
    assert exc.value.errno == errno.EPIPE
    FileState.check_chip(True)


def test_timer_deadline_and_timeout(f):
    f.write(get_random())
    assert f.state.deadline == USER_READ_TIMEOUT
    f.read(2)
    assert f.state.deadline == USER_READ_TIMEOUT  # a partial read does not restart it
    f.state.timeout()
    assert f.state.poll_mask() == POLL_OUT and f.read() == b""
    assert f.state.buf == bytearray(4096)
    f.write(get_random())  # a new write is accepted
    f.read()
    assert f.state.deadline is None  # a complete read cancels it


def test_transport_errors_flush_and_pass_through(f, raw):
    raw.injectors.append(lambda c: -errno.ETIME if be32(c, 6) == tpm.CC_GET_RANDOM else None)
    assert errno_of(f.write, get_random()) == errno.ETIME
    raw.injectors[:] = [lambda c: response(0, b"\x00" * 4)[:12] if be32(c, 6) == 0x173 else None]
    assert errno_of(f.write, read_public(0x81000001)) == errno.EFAULT  # length != header
    raw.injectors[:] = [lambda c: b"\x80\x01\x00\x00" if be32(c, 6) == 0x173 else None]
    assert errno_of(f.write, read_public(0x81000001)) == errno.EFAULT  # shorter than 10
    raw.injectors.clear()
    assert f.state.response_length == 0  # no response stored, next write not EBUSY
    assert rc(f.cmd(get_random())) == 0
