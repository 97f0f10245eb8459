# SPDX-License-Identifier: GPL-2.0-only
"""The recorder turns what a node sees into scenario lines the harness parses."""

from __future__ import annotations

import os

from cusetpm.conformance.scenario import parse_text
from cusetpm.daemon.recorder import POLL_WAIT_MS, Recorder


class F:
    """Stands for a DeviceFile: the recorder only needs its identity."""


def test_calls_become_scenario_lines_in_order():
    r = Recorder()
    a, b = F(), F()
    r.opened(a, os.O_RDWR | os.O_NONBLOCK)
    r.opened(b, os.O_WRONLY)
    r.wrote(a, bytes.fromhex("80010000000c0000017b0008"), True)
    r.polled(a, True)
    r.read(a, 4096)
    r.wrote(a, b"", False)  # CUSE passes O_NONBLOCK per call: a change is an fcntl
    r.polled(b, False)
    r.closed(a)
    r.closed(b)
    text = r.scenario("t", header="a header\nline two")
    assert text.splitlines() == [
        "# a header",
        "# line two",
        "scenario t",
        "open a nonblock",
        "open b wronly",
        "write a 80010000000c0000017b0008",
        f"poll a in {POLL_WAIT_MS}",
        "read a 4096",
        "setfl a block",
        "write a",
        "poll b",
        "close a",
        "close b",
    ]
    (sc,) = parse_text(text)
    assert [s.text for s in sc.steps][:2] == ["open a nonblock", "open b wronly"]


def test_files_past_z_get_two_letters():
    r = Recorder()
    for _ in range(28):
        r.opened(F(), os.O_RDWR)
    assert r.lines[25:] == ["open z", "open aa", "open ab"]
