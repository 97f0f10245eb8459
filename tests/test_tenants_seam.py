# SPDX-License-Identifier: GPL-2.0-only
"""cusetpm.tenants.seam: a tenant's policy in front of the kernel's seam, against a real swtpm,
driven synchronously: a refusal sends nothing and leaves the space as it was; an open policy
is the kernel byte for byte; max_objects counts every file of the node."""

from __future__ import annotations

import pytest

from cusetpm.kernel.structs import Chip, Space
from cusetpm.tenants.policy import OPEN, Policy, make_policy
from cusetpm.tenants.seam import TenantSeam
from helpers import SyncFile, create_primary, get_random, make_chip, rc, read_public


@pytest.fixture
def chip(raw):
    return make_chip(raw)


def install(chip: Chip, policy: Policy, spaces: list[Space]) -> TenantSeam:
    seam = TenantSeam(lambda: policy, lambda: spaces)
    chip.seam = seam
    return seam


def test_an_open_policy_sends_the_kernels_traffic(raw, chip):
    f = SyncFile(chip, raw)
    plain = [f.cmd(create_primary())[:14], f.cmd(read_public(0x80FFFFFF))[:10], f.cmd(get_random(4))[:10]]
    f.close()
    kernel = raw.ccs()
    raw.log.clear()
    install(chip, OPEN, [])
    f = SyncFile(chip, raw)
    assert [f.cmd(create_primary())[:14], f.cmd(read_public(0x80FFFFFF))[:10], f.cmd(get_random(4))[:10]] == plain
    f.close()
    assert raw.ccs() == kernel


def test_a_refused_command_reaches_nothing_and_keeps_the_space(raw, chip):
    seam = install(chip, make_policy(deny=["GetRandom"]), [])
    f = SyncFile(chip, raw)
    assert rc(f.cmd(create_primary())) == 0
    before = list(f.state.space.context_tbl)
    raw.log.clear()
    assert rc(f.cmd(get_random(8))) == 0x000B0143
    assert raw.ccs() == [] and f.state.space.context_tbl == before
    refusal = seam.take_refusal(f.state.space)
    assert refusal is not None and refusal.rule == "deny"
    assert seam.take_refusal(f.state.space) is None  # taken once
    assert rc(f.cmd(read_public(0x80FFFFFF))) == 0  # the object is still the file's
    f.close()


def test_max_objects_counts_over_all_the_nodes_files(raw, chip):
    spaces: list[Space] = []
    install(chip, make_policy(deny=[], max_objects=2), spaces)
    a, b = SyncFile(chip, raw), SyncFile(chip, raw)
    spaces += [a.state.space, b.state.space]
    assert rc(a.cmd(create_primary())) == 0
    assert rc(b.cmd(create_primary())) == 0
    assert rc(b.cmd(create_primary())) == 0x000B0902  # two held by the node's files together
    assert rc(a.cmd(get_random(4))) == 0
    a.close()
    spaces.remove(a.state.space)
    assert rc(b.cmd(create_primary())) == 0  # a's object went with its file
    b.close()
