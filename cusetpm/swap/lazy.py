# SPDX-License-Identifier: GPL-2.0-only
"""``--swap lazy``: keep the last files' objects and sessions loaded until another file needs
the TPM.

The kernel loads a file's contexts before each of its commands and saves and flushes them
after (tpm2_prepare_space / tpm2_commit_space): four backend commands for one GetRandom of a
file holding one key.  This seam keeps the last file's work space *resident* instead: its
next command needs no load, its commit no save.  Before a command of any other file (of any
node on the chip) the resident file is saved and flushed exactly as the kernel's commit
would have done after its last command (:func:`~cusetpm.kernel.tpm2_space.save_space`), so
every other file finds the TPM as the kernel leaves it, and then that file becomes resident.
By default at most one file is resident, so the TPM never holds more than the kernel holds
during a command: a client alone costs one backend command per command, and no client can
tell.  With ``residents`` > 1 (``--swap-residents``) that many files stay loaded side by side,
the least recently used put away first; a command the TPM refuses for want of memory
(OBJECT_MEMORY, SESSION_MEMORY, MEMORY) is sent again after another resident file is put
away, so what a client is answered stays the kernel's.  A command that could see or touch
what another file has loaded (GetCapability, ContextLoad, ContextSave, FlushContext, a session
the file does not hold, Clear and the like) runs with every other file put away first.

A command that can end a handle (FlushContext, a sequence's completion, an authorization
without continueSession, a user's ContextSave, a hierarchy change) is committed the kernel's
way, save and all, so that what the TPM flushed is noticed exactly as the kernel notices it.
What stays visible, and why this is opt-in, is in README.md ("Lazy context swapping").
"""

from __future__ import annotations

from typing import Callable

from tpm2_pytss.constants import TPM2_CC, TPM2_RC, TPMA_SESSION

from ..kernel import wire
from ..kernel.request import Io, Send
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
from ..kernel.tpm_interface import transmit
from ..kernel.wire import be32
from ..sessions.parse import Command, has_rhandle, parse_command

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
#: Commands that may see or touch what another file has loaded: every other resident file is
#: put away first, so they find the TPM as the kernel leaves it.
TPM_WIDE = ENDS_HANDLES | {int(TPM2_CC.GetCapability)}
#: The TPM is out of room: another resident file is put away and the command sent again.
OUT_OF_MEMORY = frozenset(int(rc) for rc in (TPM2_RC.OBJECT_MEMORY, TPM2_RC.SESSION_MEMORY, TPM2_RC.MEMORY))
_CONTINUE = int(TPMA_SESSION.CONTINUESESSION)
_HT_SESSIONS = (0x02, 0x03)


def ends_handles(chip: Chip, buf: bytearray, length: int) -> bool:
    """Whether the TPM may end one of the file's handles while running this command."""
    return _ends_handles(parse_command(chip, buf, length))


def _ends_handles(cmd: Command | None) -> bool:
    if cmd is None or cmd.cc in ENDS_HANDLES:
        return True
    return any(h >> 24 in _HT_SESSIONS and not attrs & _CONTINUE for h, attrs in cmd.sessions)


def _reaches_others(cmd: Command | None, space: Space) -> bool:
    """Whether the command may see or touch another file's handles: a TPM-wide command, or a
    session handle the file does not hold (the kernel leaves sessions unchecked, and another
    file's would be saved, not loaded, as the command ran)."""
    if cmd is None or cmd.cc in TPM_WIDE:
        return True
    own = space.session_tbl
    named = [h for h, _ in cmd.sessions] + cmd.handles
    return any(h >> 24 in _HT_SESSIONS and h not in own for h in named)


def out_of_memory(reply: object) -> bool:
    """An answer saying the TPM has no room for another object or session."""
    return isinstance(reply, (bytes, bytearray)) and len(reply) >= 10 and be32(reply, 6) in OUT_OF_MEMORY


def _forget(space: Space) -> None:
    """The file's handles are gone from the TPM (flushed, or never saved): its tables empty."""
    space.context_tbl[:] = [0] * NR_SLOTS
    space.session_tbl[:] = [0] * NR_SLOTS


def _to_work_space(chip: Chip, space: Space) -> None:
    """A resident file's loaded handles as the work space's, as prepare_space leaves them."""
    chip.work_space.context_tbl[:] = space.context_tbl
    chip.work_space.session_tbl[:] = space.session_tbl


class LazySwap(Seam):
    """One per TPM: every node on the chip shares it, since the TPM's slots are shared.

    ``residents``: how many files may stay loaded at once (1: the TPM never holds more than
    during one of the kernel's commands)."""

    def __init__(self, residents: int = 1) -> None:
        if residents < 1:
            raise ValueError("residents must be at least 1")
        self.max_residents = residents
        #: The resident files and the core (node) each belongs to, least recently used first.
        #: While resident, a space's tables hold its loaded (physical) handles.
        self.residents: list[tuple[Space, Chip]] = []
        #: The command being run needs the kernel's full commit.
        self._full_commit = False
        #: The command as sent (handles mapped), kept while other files are resident: it is
        #: sent again if the TPM had no room for it.
        self._command = b""
        #: The file whose command is running.
        self._current: Space | None = None
        #: A work space to put a file away in while another file's command holds the chip's.
        self._spare: Space | None = None
        #: What the statistics say: commands run without load, evictions, full commits, and
        #: commands sent again once another file made room.
        self.counters = {"resident_commands": 0, "evictions": 0, "full_commits": 0, "room_made": 0}
        #: Told of every file put away, and whether its contexts were saved (False: the save
        #: failed and the TPM flushed them): a feature on top keeps its books by it.
        self.on_put_away: Callable[[Space, bool], None] | None = None

    def is_resident(self, space: Space) -> bool:
        """Whether the file's contexts are loaded in the TPM now (its tables hold the loaded
        handles, its buffers are stale)."""
        return self._index(space) >= 0

    def _index(self, space: Space) -> int:
        for i, (s, _) in enumerate(self.residents):
            if s is space:
                return i
        return -1

    def _evict_at(self, i: int) -> Io[None]:
        """Save and flush resident file ``i`` the kernel's way; its space then holds the blobs.
        Done in a work space of its own: the command running may hold the chip's."""
        space, chip = self.residents.pop(i)
        self.counters["evictions"] += 1
        if self._spare is None:
            self._spare = Space(full=True)
        work, chip.work_space = chip.work_space, self._spare
        try:
            _to_work_space(chip, space)
            saved = not (yield from save_space(chip))
            if saved:
                space.copy_from(chip.work_space)
            else:
                # The kernel's commit error path: what was loaded is flushed; the file keeps
                # nothing (its commit would have failed the command that loaded them).
                yield from flush_space(chip)
        finally:
            chip.work_space = work
        if self.on_put_away is not None:
            self.on_put_away(space, saved)  # before _forget: a failed one's owner is told
        if not saved:
            _forget(space)

    def put_all_away(self) -> Io[None]:
        """Save and flush every resident file: the TPM then holds what the kernel leaves
        between commands.  Only between a command's steps (never inside :meth:`load`)."""
        while self.residents:
            yield from self._evict_at(0)

    def _evict_others(self, space: Space) -> Io[None]:
        """Put every resident file but ``space`` away, least recently used first."""
        i = 0
        while i < len(self.residents):
            if self.residents[i][0] is space:
                i += 1
            else:
                yield from self._evict_at(i)

    def _make_room(self, space: Space) -> Io[bool]:
        """Put away the least recently used resident file other than ``space``; False if
        there is none (the TPM's refusal is then the file's own, as under the kernel)."""
        for i, (s, _) in enumerate(self.residents):
            if s is not space:
                yield from self._evict_at(i)
                self.counters["room_made"] += 1
                return True
        return False

    def _with_room(self, gen: Io[int], space: Space) -> Io[int]:
        """Run ``gen`` (a prepare_space); a command it sends that the TPM refuses for want of
        memory is sent again once another resident file made room."""
        reply: object = None
        while True:
            try:
                req = gen.send(reply)  # type: ignore[arg-type]
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            reply = yield req
            while isinstance(req, Send) and out_of_memory(reply) and (yield from self._make_room(space)):
                reply = yield req

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
        cmd = parse_command(chip, buf, length)
        self._full_commit = _ends_handles(cmd)
        self._command = b""
        self._current = space
        residents = self.residents
        mine = len(residents) - 1 if residents and residents[-1][0] is space else self._index(space)
        if len(residents) > (mine >= 0) and _reaches_others(cmd, space):
            yield from self._evict_others(space)
            mine = len(self.residents) - 1 if mine >= 0 else -1
        if mine < 0 or self._full_commit or self._needs_its_blobs(chip, space, cc, buf, length):
            if mine >= 0:
                yield from self._evict_at(mine)
            while len(self.residents) >= self.max_residents:
                yield from self._evict_at(0)
            rc = yield from self._with_room(prepare_space(chip, space, buf, bufsiz), space)
            if not rc and self.residents:
                self._command = bytes(buf[:length])
            return rc
        if mine != len(residents) - 1:
            residents.append(residents.pop(mine))  # the most recently used
        _to_work_space(chip, space)
        rc = map_command(chip, cc, buf)
        if rc:
            # The kernel has loaded everything when the mapping fails, and flushes it all:
            # the file keeps its objects' blobs and loses its sessions.  Saving first and
            # then flushing leaves the TPM and the file the same.
            residents.pop()
            failed = yield from save_space(chip)
            yield from flush_space(chip)
            if failed:
                _forget(space)
            else:
                space.copy_from(chip.work_space)
            return rc
        chip.last_cc = cc
        self.counters["resident_commands"] += 1
        if len(residents) > 1:
            self._command = bytes(buf[:length])
        return 0

    def unload(self, chip: Chip) -> Io[None]:
        """The command's answer was lost: flush what the work space holds (tpm2_flush_space).
        A resident file's objects go with it (they were never saved).  Other resident files
        keep theirs unless the daemon flushes what is left loaded (:meth:`loaded_flushed`)."""
        mine = self._index(self._current) if self._current is not None else -1
        if mine >= 0:
            _forget(self.residents.pop(mine)[0])
        yield from flush_space(chip)

    def loaded_flushed(self) -> None:
        """Everything loaded in the TPM was flushed (the daemon does so after a command whose
        answer was lost): the resident files lose what they held, which was never saved."""
        for space, _ in self.residents:
            _forget(space)
        self.residents.clear()

    def save(self, chip: Chip, space: Space, buf: bytearray, length: int) -> Io[int]:
        while self._command and length >= 10 and be32(buf, 6) in OUT_OF_MEMORY and (yield from self._make_room(space)):
            command = self._command
            buf[: len(command)] = command
            length = yield from transmit(buf, min(len(buf), wire.TPM_BUFSIZE))
            if length < 0:
                yield from self.unload(chip)
                return length
        self._command = b""
        mine = self._index(space)
        if self._full_commit:
            self.counters["full_commits"] += 1
            return (yield from commit_space(chip, space, buf, length))
        rc = yield from map_response_header(chip, chip.last_cc, buf, length)
        if not rc:
            rc = map_response_body(chip, chip.last_cc, buf, length)
        if rc:
            # The kernel's commit error path.  The file was loaded from its blobs for this
            # command (a resident file is saved first when this can happen): they stay.
            yield from flush_space(chip)
            if mine >= 0:
                del self.residents[mine]
                _forget(space)
            return rc
        # The kernel's commit would save and flush here; the file stays loaded instead.
        space.context_tbl[:] = chip.work_space.context_tbl
        space.session_tbl[:] = chip.work_space.session_tbl
        if mine < 0:
            self.residents.append((space, chip))
        return be32(buf, 2)

    def release(self, chip: Chip, space: Space) -> Io[None]:
        """Close: tpm2_del_space() flushes the sessions; a resident file's objects, loaded
        rather than saved, are flushed too, which leaves the TPM as the kernel's close does."""
        yield from self.release_objects(space)
        yield from flush_sessions(space)

    def release_objects(self, space: Space) -> Io[None]:
        """A closing resident file's objects, loaded rather than saved: flushed, and the file
        is no longer resident.  Its sessions are the caller's to flush."""
        mine = self._index(space)
        if mine >= 0:
            del self.residents[mine]
            for handle in space.context_tbl:
                if handle and handle != SAVED:
                    yield from flush_context(handle)
            space.context_tbl[:] = [0] * NR_SLOTS

    def tpm_restarted(self) -> None:
        """A restarted TPM holds nothing: no file is resident."""
        self.loaded_flushed()

    def snapshot(self) -> dict[str, object]:
        return {"resident": bool(self.residents), "residents": len(self.residents), **self.counters}
