# SPDX-License-Identifier: GPL-2.0-only
"""Kernel profiles: every observable difference between the kernels we emulate, as data.

The rest of the code never asks "is this 6.1?"; it reads a field of the profile. Each field
names the difference it carries (docs/kernel-rules.md, "Where 6.1 and 6.12 differ", D1..D6) and the kernel code it
comes from, so adding a kernel is adding one entry to ``PROFILES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .wire import CC_INDEX_MASK, CC_VENDOR, RC_P


@dataclass(frozen=True)
class KernelProfile:
    """What one kernel version does where versions differ."""

    name: str
    #: D1. include/linux/tpm.h tpm2_rc_value(): mask applied to format-1 codes (bit 7 set).
    #: 6.1 keeps the parameter bit (0xFF), 6.12 clears it (0xBF).
    rc_value_mask: int
    #: D3. tpm2-space.c tpm2_load_context(): a ContextLoad answered TPM_RC_INTEGRITY is
    #: EINVAL (6.12) instead of the generic EFAULT (6.1).
    load_integrity_is_einval: bool
    #: D5. tpm2-cmd.c tpm2_find_cc(): the bits of a TPMA_CC compared with the command code.
    #: 6.1 compares commandIndex only; 6.12 adds the V (vendor) bit.
    find_cc_mask: int
    #: D6. tpm-dev-common.c tpm_common_read(): 6.12 returns 0 for a zero-length read before
    #: taking the lock; 6.1 processes it (and so discards a pending response).
    read_zero_returns_early: bool


PROFILES: dict[str, KernelProfile] = {
    "6.1": KernelProfile(
        name="6.1",
        rc_value_mask=0xFF,  # the whole low byte
        load_integrity_is_einval=False,
        find_cc_mask=CC_INDEX_MASK,
        read_zero_returns_early=False,
    ),
    "6.12": KernelProfile(
        name="6.12",
        rc_value_mask=0xFF & ~RC_P,  # 0xBF
        load_integrity_is_einval=True,
        find_cc_mask=CC_VENDOR | CC_INDEX_MASK,  # 0x2000FFFF
        read_zero_returns_early=True,
    ),
}

DEFAULT_PROFILE = "6.12"


def get_profile(name: str) -> KernelProfile:
    """Look a profile up by its kernel version, with a message that lists the choices."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown kernel profile {name!r}; choose from {', '.join(PROFILES)}") from None
