# SPDX-License-Identifier: GPL-2.0-only
"""The per-chip state the resource manager shares between all open files.

Follows the fields of struct tpm_chip (include/linux/tpm.h) that tpm2-space.c and
tpm-dev-common.c use: the command attribute table, the one work space, and the code of the
command in progress.  Locking lives in the adapter (:mod:`cusetpm.device`): the kernel's
tpm_mutex is held around every use of a Chip.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .profiles import KernelProfile
from .tpm2_space import Space


@dataclass
class Chip:
    profile: KernelProfile
    #: TPMA_CC of every command the TPM implements (tpm2_get_cc_attrs_tbl()).  Set it with
    #: :meth:`set_cc_attrs`, which also indexes it.
    cc_attrs_tbl: list[int] = field(default_factory=list)
    #: ``attrs & profile.find_cc_mask`` -> index of the first entry with it: tpm2_find_cc()'s
    #: linear search, answered in one look-up (it runs three times per command).
    cc_index: dict[int, int] = field(default_factory=dict)
    #: Scratch copy of the space of the file whose command is running (chip->work_space).
    work_space: Space = field(default_factory=Space)
    #: Command code of the command in progress (chip->last_cc).
    last_cc: int = 0

    def __post_init__(self) -> None:
        self.set_cc_attrs(self.cc_attrs_tbl)

    def set_cc_attrs(self, table: list[int]) -> None:
        self.cc_attrs_tbl = list(table)
        self.cc_index = {}
        for i, attrs in enumerate(self.cc_attrs_tbl):
            self.cc_index.setdefault(attrs & self.profile.find_cc_mask, i)
