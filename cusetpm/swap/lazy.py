# SPDX-License-Identifier: GPL-2.0-only
"""``--swap lazy``: keep the last file's objects and sessions loaded until another file needs
the TPM.

The kernel loads a file's contexts before each of its commands and saves and flushes them
after (tpm2_prepare_space / tpm2_commit_space): four backend commands for one GetRandom of a
file holding one key.  This seam keeps the last file's work space *resident* instead: its
next command needs no load, its commit no save.  Before a command of any other file (of any
node on the chip) the resident file is saved and flushed exactly as the kernel's commit
would have done after its last command (:func:`~cusetpm.kernel.tpm2_space.save_space`), so
every other file finds the TPM as the kernel leaves it, and then that file becomes resident.
At most one file is resident, so the TPM never holds more than the kernel holds during a
command: a client alone costs one backend command per command, and no client can tell.

A command that can end a handle (FlushContext, a sequence's completion, an authorization
without continueSession, a user's ContextSave, a hierarchy change) is committed the kernel's
way, save and all, so that what the TPM flushed is noticed exactly as the kernel notices it.
What stays visible, and why this is opt-in, is in README.md ("Lazy context swapping").
"""

from __future__ import annotations

from tpm2_pytss.constants import TPM2_CC, TPMA_SESSION

from ..kernel import wire
from ..kernel.request import Io
from ..kernel.seam import Seam
from ..kernel.structs import NR_SLOTS, Chip, Space
from ..kernel.tpm2_cmd import flush_context
from ..kernel.tpm2_space import (
    SAVED,
    commit_space,
    find_and_validate_cc,
    flush_sessions,
    flush_space,
    map_command,
    map_response_body,
    map_response_header,
    prepare_space,
    save_space,
)
from ..kernel.wire import be32
from ..sessions.parse import has_rhandle, parse_command

#: Commands after which the kernel's commit may find a handle gone (ContextSave of a
#: flushed handle answers REFERENCE_H0 and the slot is forgotten): committed the kernel's way.
ENDS_HANDLES = frozenset(
    int(c)
    for c in (
        TPM2_CC.FlushContext, TPM2_CC.SequenceComplete, TPM2_CC.EventSequenceComplete, TPM2_CC.ContextSave,
        TPM2_CC.ContextLoad, TPM2_CC.Clear, TPM2_CC.HierarchyControl, TPM2_CC.ChangePPS, TPM2_CC.ChangeEPS,
        TPM2_CC.Startup, TPM2_CC.Shutdown,
    )
)  # fmt: skip
_CONTINUE = int(TPMA_SESSION.CONTINUESESSION)
_HT_SESSIONS = (0x02, 0x03)


def ends_handles(chip: Chip, buf: bytearray, length: int) -> bool:
    """Whether the TPM may end one of the file's handles while running this command."""
    cmd = parse_command(chip, buf, length)
    if cmd is None or cmd.cc in ENDS_HANDLES:
        return True
    return any(h >> 24 in _HT_SESSIONS and not attrs & _CONTINUE for h, attrs in cmd.sessions)


def _forget(space: Space) -> None:
    """The file's handles are gone from the TPM (flushed, or never saved): its tables empty."""
    space.context_tbl[:] = [0] * NR_SLOTS
    space.session_tbl[:] = [0] * NR_SLOTS


def _to_work_space(chip: Chip, space: Space) -> None:
    """A resident file's loaded handles as the work space's, as prepare_space leaves them."""
    chip.work_space.context_tbl[:] = space.context_tbl
    chip.work_space.session_tbl[:] = space.session_tbl


class LazySwap(Seam):
    """One per TPM: every node on the chip shares it, since the TPM's slots are shared."""

    def __init__(self) -> None:
        #: The file whose contexts are loaded in the TPM, and the core (node) it belongs to.
        #: While resident, its space's tables hold the loaded (physical) handles.
        self.resident: Space | None = None
        self.resident_chip: Chip | None = None
        #: The command being run needs the kernel's full commit.
        self._full_commit = False
        #: What the statistics say: commands run without load, evictions, full commits.
        self.counters = {"resident_commands": 0, "evictions": 0, "full_commits": 0}

    def _evict(self) -> Io[None]:
        """Save and flush the resident file the kernel's way; its space then holds the blobs."""
        space, chip = self.resident, self.resident_chip
        self.resident = self.resident_chip = None
        if space is None or chip is None:
            return
        self.counters["evictions"] += 1
        _to_work_space(chip, space)
        if (yield from save_space(chip)):
            # The kernel's commit error path: what was loaded is flushed; the file keeps
            # nothing (its commit would have failed the command that loaded them).
            yield from flush_space(chip)
            _forget(space)
            return
        space.copy_from(chip.work_space)

    def _needs_its_blobs(self, chip: Chip, space: Space, cc: int, buf: bytearray, length: int) -> bool:
        """Could this command of the resident file fail in its commit?  The kernel then
        flushes the work space and leaves the file as its last commit saved it; a resident
        file has no such save, so it is saved first (these commands are rare)."""
        if has_rhandle(chip, cc) and (all(space.context_tbl) or all(space.session_tbl)):
            return True  # out of slots: map_response_header's ENOMEM
        return cc == wire.CC_GET_CAPABILITY and length >= 14 and be32(buf, 10) == wire.CAP_HANDLES

    def load(self, chip: Chip, space: Space, buf: bytearray, bufsiz: int) -> Io[int]:
        cc = find_and_validate_cc(chip, buf, bufsiz)
        if cc < 0:
            return cc  # nothing is sent for it, by the kernel either
        length = min(be32(buf, 2), bufsiz)
        self._full_commit = ends_handles(chip, buf, length)
        fast = self.resident is space and not self._full_commit
        if not fast or self._needs_its_blobs(chip, space, cc, buf, length):
            yield from self._evict()
            return (yield from prepare_space(chip, space, buf, bufsiz))
        _to_work_space(chip, space)
        rc = map_command(chip, cc, buf)
        if rc:
            # The kernel has loaded everything when the mapping fails, and flushes it all:
            # the file keeps its objects' blobs and loses its sessions.  Saving first and
            # then flushing leaves the TPM and the file the same.
            self.resident = self.resident_chip = None
            failed = yield from save_space(chip)
            yield from flush_space(chip)
            if failed:
                _forget(space)
            else:
                space.copy_from(chip.work_space)
            return rc
        chip.last_cc = cc
        self.counters["resident_commands"] += 1
        return 0

    def unload(self, chip: Chip) -> Io[None]:
        """The TPM could not be reached: flush what the work space holds (tpm2_flush_space);
        a resident file's objects go with it (they were never saved)."""
        if self.resident is not None and self.resident_chip is chip:
            _forget(self.resident)
            self.resident = self.resident_chip = None
        yield from flush_space(chip)

    def save(self, chip: Chip, space: Space, buf: bytearray, length: int) -> Io[int]:
        if self._full_commit:
            self.counters["full_commits"] += 1
            self.resident = self.resident_chip = None
            return (yield from commit_space(chip, space, buf, length))
        rc = yield from map_response_header(chip, chip.last_cc, buf, length)
        if not rc:
            rc = map_response_body(chip, chip.last_cc, buf, length)
        if rc:
            # The kernel's commit error path.  The file was loaded from its blobs for this
            # command (a resident file is saved first when this can happen): they stay.
            yield from flush_space(chip)
            if self.resident is space:
                self.resident = self.resident_chip = None
                _forget(space)
            return rc
        # The kernel's commit would save and flush here; the file stays loaded instead.
        space.context_tbl[:] = chip.work_space.context_tbl
        space.session_tbl[:] = chip.work_space.session_tbl
        self.resident, self.resident_chip = space, chip
        return be32(buf, 2)

    def release(self, chip: Chip, space: Space) -> Io[None]:
        """Close: tpm2_del_space() flushes the sessions; a resident file's objects, loaded
        rather than saved, are flushed too, which leaves the TPM as the kernel's close does."""
        if self.resident is space:
            self.resident = self.resident_chip = None
            for handle in space.context_tbl:
                if handle and handle != SAVED:
                    yield from flush_context(handle)
            space.context_tbl[:] = [0] * NR_SLOTS
        yield from flush_sessions(space)

    def tpm_restarted(self) -> None:
        """A restarted TPM holds nothing: no file is resident."""
        self.resident = self.resident_chip = None

    def snapshot(self) -> dict[str, object]:
        return {"resident": self.resident is not None, **self.counters}
