# SPDX-License-Identifier: GPL-2.0-only
"""The kernel's structs the resource manager shares: struct tpm_chip and struct tpm_space.

Follows the fields of struct tpm_chip (include/linux/tpm.h) that tpm2-space.c and
tpm-dev-common.c use, and struct tpm_space (drivers/char/tpm/tpm.h).  They live apart from
the functions so that every module of the port can import them and none imports another in
a circle.  Locking lives in the adapter (:mod:`cusetpm.daemon.chip`): the kernel's tpm_mutex
is held around every use of a Chip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import wire
from .profiles import KernelProfile

if TYPE_CHECKING:
    from .seam import Seam

#: Slots per space (struct tpm_space: context_tbl[3], session_tbl[3]).
NR_SLOTS = 3


#: Bytes before a saved context's blob: sequence (8), savedHandle, hierarchy (4 each), size (2).
_CONTEXT_HEADER = 18


def _used(buf: bytearray, blobs: int) -> int:
    """Where the last of ``blobs`` saved contexts packed at the start of ``buf`` ends (the
    whole buffer if the sizes do not add up: then nothing is trimmed)."""
    offset = 0
    for _ in range(blobs):
        if offset + _CONTEXT_HEADER > len(buf):
            return len(buf)
        offset += _CONTEXT_HEADER + int.from_bytes(buf[offset + 16 : offset + 18], "big")
    return min(offset, len(buf))


@dataclass
class Space:
    """struct tpm_space: three object slots, three session slots and their context blobs.

    The kernel allocates both 16 KiB buffers at open.  Here a file's space holds only the
    bytes its saved contexts use (none for an idle file), so a thousand open files cost next
    to nothing; the chip's work space (``full``) keeps both buffers whole, so every bound the
    kernel checks against TPM2_SPACE_BUFFER_SIZE is the same.  Bytes past the last saved
    context are never read, by the kernel or here.
    """

    context_tbl: list[int] = field(default_factory=lambda: [0] * NR_SLOTS)
    context_buf: bytearray = field(default_factory=bytearray)
    session_tbl: list[int] = field(default_factory=lambda: [0] * NR_SLOTS)
    session_buf: bytearray = field(default_factory=bytearray)
    #: Who opened the file (not in the kernel's struct): what a seam may key its decisions on.
    owner: object = None
    #: The work space: both buffers TPM2_SPACE_BUFFER_SIZE bytes, always.
    full: bool = False

    def __post_init__(self) -> None:
        if self.full:
            self.context_buf = bytearray(wire.TPM2_SPACE_BUFFER_SIZE)
            self.session_buf = bytearray(wire.TPM2_SPACE_BUFFER_SIZE)

    def copy_from(self, other: Space) -> None:
        """The memcpy()s of prepare/commit: tables and the buffers' contexts."""
        self.context_tbl[:] = other.context_tbl
        self.session_tbl[:] = other.session_tbl
        if self.full:  # file -> work space: the saved contexts, the rest as it was
            self.context_buf[: len(other.context_buf)] = other.context_buf
            self.session_buf[: len(other.session_buf)] = other.session_buf
        else:  # work space -> file: only what the saved contexts use
            objects = sum(1 for h in other.context_tbl if h)
            sessions = sum(1 for h in other.session_tbl if h)
            self.context_buf = bytearray(other.context_buf[: _used(other.context_buf, objects)])
            self.session_buf = bytearray(other.session_buf[: _used(other.session_buf, sessions)])


@dataclass
class Chip:
    """struct tpm_chip, as one kernel profile sees it."""

    profile: KernelProfile
    #: TPMA_CC of every command the TPM implements (tpm2_get_cc_attrs_tbl()).  Set it with
    #: :meth:`set_cc_attrs`, which also indexes it.
    cc_attrs_tbl: list[int] = field(default_factory=list)
    #: ``attrs & profile.find_cc_mask`` -> index of the first entry with it: tpm2_find_cc()'s
    #: linear search, answered in one look-up (it runs three times per command).
    cc_index: dict[int, int] = field(default_factory=dict)
    #: Scratch copy of the space of the file whose command is running (chip->work_space).
    work_space: Space = field(default_factory=lambda: Space(full=True))
    #: Command code of the command in progress (chip->last_cc).
    last_cc: int = 0
    #: The opt-in feature that sees every command (None: the kernel's own behaviour).
    seam: Seam | None = None
    #: Events signalled during a command, for the driver to wake their waiters (see
    #: :class:`cusetpm.kernel.request.Wait`).
    signals: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.set_cc_attrs(self.cc_attrs_tbl)

    def set_cc_attrs(self, table: list[int]) -> None:
        self.cc_attrs_tbl = list(table)
        self.cc_index = {}
        for i, attrs in enumerate(self.cc_attrs_tbl):
            self.cc_index.setdefault(attrs & self.profile.find_cc_mask, i)

    def signal(self, event: str) -> None:
        """Wake whoever waits for ``event`` once the current command lets go of the chip."""
        self.signals.append(event)
