# SPDX-License-Identifier: GPL-2.0-only
"""tpm2-cmd.c: chip start-up, the command attribute table, find_cc, rc_value."""

from __future__ import annotations

import pytest

from cusetpm.kernel import wire as tpm
from cusetpm.kernel.profiles import PROFILES
from cusetpm.kernel.structs import Chip
from cusetpm.kernel.tpm2_cmd import ChipInitError, auto_startup, find_cc, rc_value
from helpers import RawTpm, response


def test_auto_startup_reads_the_table_and_forces_one_handle(raw):
    chip = Chip(PROFILES["6.12"])
    raw.run(auto_startup(chip))
    assert len(chip.cc_attrs_tbl) > 50
    by_cc = {a & 0xFFFF: a for a in chip.cc_attrs_tbl}
    chandles = lambda a: (a >> tpm.CC_ATTR_CHANDLES) & 7  # noqa: E731
    assert chandles(by_cc[tpm.CC_CONTEXT_SAVE]) == 1
    assert chandles(by_cc[tpm.CC_FLUSH_CONTEXT]) == 1  # the TPM says 0: a parameter
    assert chandles(by_cc[0x131]) == 1 and (by_cc[0x131] >> tpm.CC_ATTR_RHANDLE) & 1  # CreatePrimary
    assert chandles(by_cc[tpm.CC_GET_RANDOM]) == 0


def test_startup_is_sent_when_the_tpm_needs_it():
    raw = RawTpm.start(flags="not-need-init")
    try:
        chip = Chip(PROFILES["6.1"])
        raw.run(auto_startup(chip))
        assert raw.ccs()[:3] == [tpm.CC_SELF_TEST, tpm.CC_STARTUP, tpm.CC_SELF_TEST]
        assert raw.log[0][1] == tpm.RC_INITIALIZE
        assert chip.cc_attrs_tbl
    finally:
        raw.close()


def test_a_tpm_in_failure_mode_is_not_registered(raw):
    raw.injectors.append(lambda c: response(tpm.RC_FAILURE))
    with pytest.raises(ChipInitError):
        raw.run(auto_startup(Chip(PROFILES["6.12"])))


def test_find_cc_masks():
    vendor = (1 << 29) | 0x0001
    for name, plain_hit, vendor_hit in (("6.1", 1, -1), ("6.12", -1, 1)):
        chip = Chip(PROFILES[name], cc_attrs_tbl=[0x017B, vendor])
        assert find_cc(chip, 0x017B) == 0
        assert find_cc(chip, 0x0001) == plain_hit
        assert find_cc(chip, 0x20000001) == vendor_hit
        assert find_cc(chip, 0x0001017B) == -1


def test_rc_value_differs_in_the_parameter_bit():
    assert rc_value(PROFILES["6.1"], 0x1CB) == 0x0CB  # not TPM_RC_HANDLE
    assert rc_value(PROFILES["6.12"], 0x1CB) == 0x08B  # TPM_RC_HANDLE
    for p in PROFILES.values():
        assert rc_value(p, 0x18B) == 0x08B and rc_value(p, 0x910) == 0x910
