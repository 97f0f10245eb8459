# SPDX-License-Identifier: GPL-2.0-only
"""cusetpm.kernel.structs: a file's space holds only the bytes its saved contexts use, the
work space keeps the kernel's whole buffers, and the contexts survive the round trip."""

from __future__ import annotations

from cusetpm.kernel import wire
from cusetpm.kernel.structs import Space
from helpers import SyncFile, create_primary, make_chip, rc, read_public, start_auth_session


def test_an_idle_file_holds_no_buffer_and_the_work_space_both_whole() -> None:
    assert (len(Space().context_buf), len(Space().session_buf)) == (0, 0)
    work = Space(full=True)
    assert len(work.context_buf) == len(work.session_buf) == wire.TPM2_SPACE_BUFFER_SIZE
    work.copy_from(Space())
    assert len(work.context_buf) == wire.TPM2_SPACE_BUFFER_SIZE  # bounds stay the kernel's


def test_a_file_keeps_exactly_its_saved_contexts(raw) -> None:
    chip = make_chip(raw)
    f = SyncFile(chip, raw)
    assert rc(f.cmd(create_primary())) == 0
    assert rc(f.cmd(start_auth_session())) == 0
    space = f.state.space
    blob = wire.be16(space.context_buf, 16) + 18
    assert len(space.context_buf) == blob and 0 < blob < 4096
    assert len(space.session_buf) == wire.be16(space.session_buf, 16) + 18
    assert rc(f.cmd(read_public(0x80FFFFFF))) == 0  # loaded back from those bytes
    f.close()
    assert raw.handles(0x80000000) == [] and raw.handles(0x02000000) == [] and raw.handles(0x03000000) == []


def test_sizes_that_do_not_add_up_keep_the_whole_buffer() -> None:
    work = Space(full=True)
    work.context_tbl[0] = 0xFFFFFFFF
    work.context_buf[16:18] = (0xFFFF).to_bytes(2, "big")  # a blob said to run past the end
    f = Space()
    f.copy_from(work)
    assert len(f.context_buf) == wire.TPM2_SPACE_BUFFER_SIZE
