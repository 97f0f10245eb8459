# SPDX-License-Identifier: GPL-2.0-only
"""The seam (cusetpm.kernel.seam): the kernel's behaviour by default, and what a feature can
change through it.  Against a real swtpm, driven synchronously."""

from __future__ import annotations

import errno

import pytest

from cusetpm.kernel import wire
from cusetpm.kernel.request import Io, Send, Sleep, Wait, run_sync
from cusetpm.kernel.seam import KERNEL, Seam
from cusetpm.kernel.structs import Chip, Space
from helpers import SyncFile, create_primary, get_random, make_chip, rc, read_public


@pytest.fixture
def chip(raw):
    return make_chip(raw)


def _traffic(raw, chip: Chip) -> tuple[list[bytes], list[int]]:
    f = SyncFile(chip, raw)
    out = [f.cmd(create_primary())[:14], f.cmd(read_public(0x80FFFFFF))[:10], f.cmd(get_random(4))[:10]]
    f.close()
    return out, raw.ccs()


def test_an_empty_subclass_is_the_kernel_byte_for_byte(raw, chip):
    default = _traffic(raw, chip)
    raw.log.clear()
    chip.seam = Seam()
    assert _traffic(raw, chip) == default
    # ContextSave+FlushContext after CreatePrimary, the 4-command cycle around ReadPublic.
    assert default[1][:3] == [0x131, wire.CC_CONTEXT_SAVE, wire.CC_FLUSH_CONTEXT]


class RefuseGetRandom(Seam):
    """An RM-layer answer from before_command: nothing reaches the TPM."""

    def before_command(self, chip: Chip, space: Space, buf: bytearray, bufsiz: int) -> Io[int]:
        if wire.be32(buf, 6) == wire.CC_GET_RANDOM:
            buf[:10] = wire.command(wire.RC_RESMGR_TPM_LAYER | wire.RC_COMMAND_CODE)
            return 10
        return (yield from super().before_command(chip, space, buf, bufsiz))


def test_before_command_can_answer_without_the_tpm(raw, chip):
    chip.seam = RefuseGetRandom()
    f = SyncFile(chip, raw)
    assert rc(f.cmd(get_random())) == 0x000B0143
    assert raw.ccs() == []
    assert rc(f.cmd(create_primary())) == 0  # other commands go on as the kernel's


class Errno(Seam):
    def before_command(self, chip: Chip, space: Space, buf: bytearray, bufsiz: int) -> Io[int]:
        return -errno.EACCES
        yield


def test_before_command_errno_is_the_writes_errno(raw, chip):
    chip.seam = Errno()
    f = SyncFile(chip, raw)
    with pytest.raises(OSError) as exc:
        f.write(get_random())
    assert exc.value.errno == errno.EACCES and raw.ccs() == []


class Watch(Seam):
    """Sees every result, and which file (owner) it was for."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, int]] = []

    def after_response(self, chip: Chip, space: Space, buf: bytearray, length: int) -> Io[int]:
        self.seen.append((space.owner, wire.be32(buf, 6) if length > 0 else length))
        return length
        yield


def test_after_response_sees_each_result_and_its_owner(raw, chip):
    seam = chip.seam = Watch()
    f = SyncFile(chip, raw)
    f.state.space.owner = "tenant-a"
    f.cmd(get_random())
    with pytest.raises(OSError):  # no such vhandle: the kernel's EINVAL reaches the seam first
        f.write(read_public(0x80FFFFFF))
    assert seam.seen == [("tenant-a", 0), ("tenant-a", -errno.EINVAL)]


def test_release_goes_through_the_seam(raw, chip):
    released: list[Space] = []

    class Count(Seam):
        def release(self, chip: Chip, space: Space) -> Io[None]:
            released.append(space)
            yield from super().release(chip, space)

    chip.seam = Count()
    f = SyncFile(chip, raw)
    f.close()
    assert released == [f.state.space]


def test_kernel_seam_is_the_default():
    assert type(KERNEL) is Seam


def test_run_sync_dispatches_every_kind():
    def gen() -> Io[list[object]]:
        got: list[object] = [(yield Send(b"x" * 10, 1.0)), (yield Sleep(5)), (yield Wait("slot", 5))]
        return got

    assert run_sync(gen(), lambda req: b"r" * 10) == [b"r" * 10, None, False]
