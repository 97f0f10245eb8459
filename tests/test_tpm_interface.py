# SPDX-License-Identifier: GPL-2.0-only
"""tpm-interface.c: one transmission, the retry loop, durations."""

from __future__ import annotations

import errno

from cusetpm.kernel import wire as tpm
from cusetpm.kernel.request import Send, Sleep
from cusetpm.kernel.tpm_interface import ordinal_duration, transmit, transmit_cmd
from cusetpm.kernel.wire import be32
from helpers import get_random, response


def drive(gen, answers):
    """Run a generator against a list of canned answers; return (result, sends, sleeps)."""
    sends, sleeps, reply = [], [], None
    answers = list(answers)
    while True:
        try:
            req = gen.send(reply)
        except StopIteration as stop:
            return stop.value, sends, sleeps
        if isinstance(req, Send):
            sends.append(req)
            reply = answers.pop(0)
        else:
            assert isinstance(req, Sleep)
            sleeps.append(req.seconds)
            reply = None


def buf_of(cmd: bytes) -> bytearray:
    b = bytearray(4096)
    b[: len(cmd)] = cmd
    return b


def test_retry_then_success():
    ok = response(0, b"\x00\x02ab")
    n, sends, sleeps = drive(transmit(buf_of(get_random(2))), [response(0x922)] * 3 + [ok])
    assert n == len(ok) and len(sends) == 4
    assert sleeps == [0.02, 0.04, 0.08]


def test_retry_gives_up_after_eight_sends_with_the_last_answer():
    for code in (0x922, 0x90A):
        buf = buf_of(get_random(2))
        n, sends, sleeps = drive(transmit(buf), [response(code)] * 8)
        assert len(sends) == 8 and be32(buf, 6) == code and n == 10
        assert abs(sum(sleeps) - 2.54) < 1e-9
        # Every resend is the original command (the saved 22 bytes restored).
        assert all(s.data == get_random(2) for s in sends)


def test_no_retry_for_other_codes_and_selftest_testing():
    for code in (0x908, 0x920, 0x80922, 0x101):
        _, sends, _ = drive(transmit(buf_of(get_random())), [response(code)])
        assert len(sends) == 1
    selftest = tpm.command(tpm.CC_SELF_TEST, b"\x00")
    _, sends, _ = drive(transmit(buf_of(selftest)), [response(0x90A)])
    assert len(sends) == 1


def test_one_transmission_checks():
    buf = buf_of(get_random())
    buf[2:6] = b"\x00\x00\x00\x00"
    assert drive(transmit(buf), [])[0] == -errno.ENODATA
    assert drive(transmit(buf_of(get_random())), [response(0)[:9]])[0] == -errno.EFAULT
    assert drive(transmit(buf_of(get_random())), [response(0) + b"x"])[0] == -errno.EFAULT
    assert drive(transmit(buf_of(get_random())), [-errno.EPIPE])[0] == -errno.EPIPE


def test_durations():
    assert ordinal_duration(tpm.CC_GET_RANDOM) == 2.0
    assert ordinal_duration(0x131) == 300.0
    assert ordinal_duration(tpm.CC_GET_CAPABILITY) == 0.75
    assert ordinal_duration(tpm.CC_CONTEXT_LOAD) == 120.0
    assert ordinal_duration(0x2000017B) == 120.0  # vendor codes: the default
    _, sends, _ = drive(transmit(buf_of(get_random())), [response(0)])
    assert sends[0].timeout == 2.0


def test_transmit_cmd_min_body_and_rc():
    assert drive(transmit_cmd(get_random(), 4), [response(0, b"\x00\x00")])[0] == (-errno.EFAULT, b"")
    assert drive(transmit_cmd(get_random(), 0), [response(0x101)])[0][0] == 0x101
    assert drive(transmit_cmd(get_random(), 2), [response(0, b"\x00\x00")])[0] == (0, response(0, b"\x00\x00"))
