# SPDX-License-Identifier: GPL-2.0-only
"""The bench's C relay (the whole request path in C): built, mounted and used against a real
swtpm with the raw calls and the bench's own client; and how the report sets every node
column against it."""

from __future__ import annotations

import errno
import os
import select
import shutil
import socket
from collections.abc import Iterator

import pytest

from cusetpm.kernel import wire
from cusetpm.testing.bench_commands import GET_RANDOM
from cusetpm.testing.bench_floor import Floor, missing_c
from cusetpm.testing.bench_paths import OPS, Client, Route, abrmd_route, direct_route, node_route
from cusetpm.testing.bench_relay import LABEL, c_relay_route, start_c_relay
from cusetpm.testing.bench_report import report_limits, report_relay
from cusetpm.testing.bench_rig import Rig

GR, KEYED, SIGN = (op for op, _, _ in OPS)

needs_parts = pytest.mark.skipif(
    shutil.which("swtpm") is None or missing_c() is not None or not os.path.exists("/dev/fuse"),
    reason="needs swtpm, gcc, libfuse3-dev and /dev/fuse (make test installs them)",
)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()
    assert not r.tmp.exists()  # the relay unmounted and gone, with its swtpm


def poll_mask(fd: int) -> int:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLOUT)
    return dict(p.poll(1000)).get(fd, 0)


@needs_parts
def test_the_relay_forwards_a_command_in_its_write_and_hands_out_the_response(rig: Rig) -> None:
    path = c_relay_route().setup(rig)[1]
    fd = os.open(path, os.O_RDWR)
    try:
        assert poll_mask(fd) & select.POLLOUT and not poll_mask(fd) & select.POLLIN  # nothing pending
        assert os.read(fd, 4096) == b""
        assert os.write(fd, GET_RANDOM) == len(GET_RANDOM)
        assert poll_mask(fd) & select.POLLIN  # answered within the write
        with pytest.raises(OSError) as busy:
            os.write(fd, GET_RANDOM)  # a response is pending, as the kernel's EBUSY
        assert busy.value.errno == errno.EBUSY
        header = os.read(fd, wire.TPM_HEADER_SIZE)  # in parts, as ESAPI reads
        assert wire.be32(header, 2) == 10 + 2 + 16 and wire.be32(header, 6) == 0
        assert len(os.read(fd, 4096)) == 18
        assert os.read(fd, 4096) == b"" and not poll_mask(fd) & select.POLLIN
        with pytest.raises(OSError) as short:
            os.write(fd, GET_RANDOM[:5])
        assert short.value.errno == errno.EINVAL
    finally:
        os.close(fd)


@needs_parts
def test_the_bench_client_signs_through_it_with_one_backend_command_each(rig: Rig) -> None:
    name, conf, relay = c_relay_route().count_setup(rig)
    client = Client(name, conf, with_key=True)
    try:
        client.sign()  # settled first, as the bench's counting pass does
        before = relay.commands
        for _ in range(3):
            client.sign()
            client.get_random()
        assert relay.commands - before == 6
    finally:
        client.close()


@needs_parts
def test_a_tpm_that_is_gone_is_eio_not_a_hang(rig: Rig) -> None:
    ours, theirs = socket.socketpair()
    path = start_c_relay(rig, theirs)
    theirs.close()
    ours.close()
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as gone:
            os.write(fd, GET_RANDOM)
        assert gone.value.errno == errno.EIO
    finally:
        os.close(fd)


def route(r: Route, gr: float, keyed: float, sign: float) -> Route:
    r.batches = {GR: [gr], KEYED: [keyed], SIGN: [sign]}
    return r


def test_every_node_and_abrmd_are_set_against_the_relay() -> None:
    relay = route(c_relay_route(), 50, 50, 300)
    kernel, lazy = (
        route(node_route("6.12"), 100, 200, 600),
        route(node_route("6.12", extra=("--swap", "lazy")), 75, 75, 450),
    )
    paths = [route(direct_route(), 60, 60, 300), relay, kernel, lazy, route(abrmd_route(), 150, 150, 600)]
    out = report_relay(paths)
    assert out[1].split()[-3:] == ["node(6.12)", "node(6.12,lazy)", "abrmd"]  # not direct, not itself
    assert out[1].startswith(f"µs per command (x {LABEL})")
    assert out[2].split() == ["GetRandom(16)", "100", "2.00x", "75", "1.50x", "150", "3.00x"]
    assert out[4].split() == ["Sign", "ECDSA", "P256", "600", "2.00x", "450", "1.50x", "600", "2.00x"]
    relay.error = "RuntimeError: gcc failed"
    assert report_relay(paths) == ["", f"  x {LABEL}: not measured ({LABEL} failed)"]
    assert report_relay([kernel]) == []  # --no-relay


def test_the_relay_is_set_against_the_lazy_limit_in_the_limits_table() -> None:
    from cusetpm.testing.bench_limits import BackendCost

    cost = BackendCost(rounds=1, cpu=1)
    cost.batches["alone"] = {GR: [20.0], KEYED: [20.0], SIGN: [300.0]}
    cost.batches["cycle"] = {KEYED: [100.0], SIGN: [400.0]}
    relay = route(c_relay_route(), 77, 84, 350)
    out = report_limits([relay, route(node_route("6.12"), 84, 180, 440)], cost, Floor(read_us=10.0, poll_us=9.0))
    table = out[out.index("") + 1 :]
    assert table[0].split()[-3:] == [LABEL.split()[0], LABEL.split()[1], "node(6.12)"]
    # The command alone + 5 x 10 µs: 70, 70, 350.
    assert table[1].split() == ["GetRandom(16)", "77", "1.10x", "84", "1.20x"]
    assert table[3].split() == ["Sign", "ECDSA", "P256", "350", "1.00x", "440", "0.98x"]
    assert f"  {LABEL}: the whole path in C, no resource manager; its limit is --swap lazy's" in out
    assert not any(f": {LABEL}: " in x for x in out)  # no goal judges it
