# SPDX-License-Identifier: GPL-2.0-only
"""Hostile FUSE/CUSE requests (issue 10): the sans-I/O parser answers every byte string with a
request or ProtocolError, and the CUSE and FUSE request loops answer every request they can
address with a well-formed reply and keep serving.

``make fuzz`` runs scripts/fuzz.py, the same mutators with 10^6 seeded inputs.
"""

from __future__ import annotations

import errno
import logging
import os
import random

import pytest
import trio
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from cusetpm.frontends import cuse_proto as p
from cusetpm.testing.hostile_cuse import (
    OPCODES,
    LoopRig,
    check_parse,
    check_reply,
    hostile_request,
    mutate_request,
    run_loop,
    valid_request,
)

EXAMPLES = int(os.environ.get("CUSETPM_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)  # fmt: skip


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


def answer_offline(buf: bytes) -> None:
    """What the loop does with a request it needs no device for, byte for byte."""
    req = check_parse(buf)
    if req is None:
        return
    out = p.default_reply(req)
    if out is not None:
        assert check_reply(out) is None


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_protocol_error(buf):
    answer_offline(buf)


@FUZZ
@given(st.sampled_from(OPCODES), st.binary(max_size=120), st.integers(0, 2**64 - 1))
def test_any_body_under_a_right_header(opcode, body, unique):
    answer_offline(p.build_request(opcode, unique, body))


@FUZZ
@given(st.randoms(use_true_random=False))
def test_mutated_valid_requests(rng):
    for _ in range(20):
        answer_offline(mutate_request(rng, valid_request(rng, rng.getrandbits(64), [1, 2])))


# --- through the request loop ------------------------------------------------------------------


def test_a_malformed_request_is_answered_eio_and_the_loop_goes_on():
    """Regression: request_loop() let ProtocolError out, which ended the loop (and with it
    the daemon's CUSE node) on one bad request.  The input: a FUSE_WRITE whose size field says
    12 bytes and that carries none, then a frame shorter than a header, a FUSE_INTERRUPT with
    no body and a FUSE_OPEN numbered 0."""
    bad = p.build_request(p.Opcode.WRITE, 7, p.WRITE_IN.pack(1, 0, 12, 0, 0, os.O_RDWR, 0))
    others = [b"\x00" * 10, p.build_request(p.Opcode.INTERRUPT, 9, b""), p.build_request(p.Opcode.OPEN, 0, bytes(8))]

    async def body(rig: LoopRig) -> None:
        await rig.kernel.send(bad)
        with trio.fail_after(3):
            while 7 not in rig.replies:
                await trio.sleep(0.001)
        assert p.OUT_HEADER.unpack_from(rig.replies.pop(7))[1] == -errno.EIO
        await rig.feed(others)
        await rig.still_serves()
        assert not rig.problems and not rig.replies  # nothing for the other three

    run_loop(body)


# No shrinking: a failing example costs a time-out each try; the frames are noted instead.
@settings(max_examples=max(EXAMPLES // 10, 10), deadline=None, database=None, phases=[Phase.generate])
@given(st.randoms(use_true_random=False))
def test_hostile_requests_through_the_request_loop(rng):
    async def body(rig: LoopRig) -> None:
        frames = [hostile_request(rng, 0, sorted(rig.server.files)) for _ in range(30)]
        note("frames: " + " ".join(f.hex() for f in frames))
        await rig.feed(frames)
        await rig.still_serves()
        assert not rig.problems, rig.problems

    run_loop(body)


def test_a_fuse_request_whose_body_the_directory_cannot_parse_is_answered_eio():
    """Regression: a FUSE node's LOOKUP whose name has no NUL, or a READDIR shorter than its
    fuse_read_in, raised ProtocolError out of the request loop, which ended the FUSE node."""
    from cusetpm.frontends import fuse_proto as fsp

    bad = [
        p.build_request(fsp.FsOpcode.LOOKUP, 7, b"tpmrm0", nodeid=fsp.ROOT_INODE),
        p.build_request(fsp.FsOpcode.READDIR, 9, bytes(8), nodeid=fsp.ROOT_INODE),
    ]

    async def body(rig: LoopRig) -> None:
        for frame in bad:
            await rig.kernel.send(frame)
        with trio.fail_after(3):
            while not (7 in rig.replies and 9 in rig.replies):
                await trio.sleep(0.001)
        assert [p.OUT_HEADER.unpack_from(rig.replies.pop(u))[1] for u in (7, 9)] == [-errno.EIO] * 2
        error, out = await rig.call(fsp.FsOpcode.READDIR, p.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0), fsp.ROOT_INODE)
        assert error == 0 and b"tpmrm0" in out  # the listing: the directory serves
        await rig.still_serves()
        assert not rig.problems and not rig.replies

    run_loop(body, fuse=True)


@settings(max_examples=max(EXAMPLES // 10, 10), deadline=None, database=None, phases=[Phase.generate])
@given(st.randoms(use_true_random=False))
def test_hostile_requests_through_a_fuse_nodes_request_loop(rng):
    async def body(rig: LoopRig) -> None:
        frames = [hostile_request(rng, 0, sorted(rig.server.files), fuse=True) for _ in range(30)]
        note("frames: " + " ".join(f.hex() for f in frames))
        await rig.feed(frames)
        await rig.still_serves()
        assert not rig.problems, rig.problems

    run_loop(body, fuse=True)


def test_a_seeded_run_of_the_long_fuzzer_passes():
    rng = random.Random(10)
    for i in range(5000):
        answer_offline(hostile_request(rng, 2 * i + 2, [1, 2]))


def test_a_seeded_run_through_the_fuse_loop_passes():
    """make fuzz's fuse-loop target, short: 2000 seeded frames (the first batch of 250 held
    the malformed LOOKUP that ended the FUSE node before the fix)."""
    rng = random.Random(10)

    async def body(rig: LoopRig) -> None:
        fed = 0
        for _ in range(8):
            fhs = sorted(rig.server.files)[-8:]
            frames = [hostile_request(rng, 0, fhs, fuse=True) for _ in range(250)]
            fed += sum(1 for f in frames if f)  # an empty frame is no request: not sent
            await rig.feed(frames)
            await rig.still_serves()
            assert not rig.problems, rig.problems
        assert rig.sent == fed > 1900

    run_loop(body, fuse=True)
