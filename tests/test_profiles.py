# SPDX-License-Identifier: GPL-2.0-only
import pytest

from cusetpm.kernel.profiles import DEFAULT_PROFILE, PROFILES, get_profile


def test_profiles_hold_every_difference():
    a, b = PROFILES["6.1"], PROFILES["6.12"]
    assert (a.rc_value_mask, b.rc_value_mask) == (0xFF, 0xBF)
    assert (a.find_cc_mask, b.find_cc_mask) == (0xFFFF, 0x2000FFFF)
    assert not a.load_integrity_is_einval and b.load_integrity_is_einval
    assert not a.read_zero_returns_early and b.read_zero_returns_early
    assert DEFAULT_PROFILE == "6.12"


def test_unknown_profile_names_the_choices():
    with pytest.raises(ValueError, match="6.1, 6.12"):
        get_profile("5.10")
    assert get_profile("6.1").name == "6.1"
