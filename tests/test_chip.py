# SPDX-License-Identifier: GPL-2.0-only
"""The chip adapter (cusetpm.daemon.chip): several nodes on one TPM, and the Wait request
that gives the chip up while a command waits."""

from __future__ import annotations

import trio
from tpm2_pytss.constants import TPM2_CC

from cusetpm.backends import managed_swtpm
from cusetpm.daemon import Node, Opener, TpmChip
from cusetpm.kernel import wire
from cusetpm.kernel.profiles import PROFILES
from cusetpm.kernel.request import Io, Sleep, Wait
from cusetpm.kernel.seam import Seam
from cusetpm.kernel.structs import Chip, Space
from helpers import create_primary, get_cap_handles, get_random, handles_of, rc


async def cmd(f, data: bytes) -> bytes:
    assert await f.write(data, False) == len(data)
    return await f.read(4096)


def run_with_chip(tmp_path, body) -> None:
    async def main() -> None:
        async with managed_swtpm(tmp_path / "state") as backend:
            chip = TpmChip(backend)
            await chip.register()
            async with trio.open_nursery() as nursery:
                await nursery.start(chip.serve)
                with trio.fail_after(30):
                    await body(chip)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_two_nodes_with_their_own_profiles_share_one_chip(tmp_path):
    async def body(chip: TpmChip) -> None:
        a = Node(chip, PROFILES["6.1"], "tpmrm-a")
        b = Node(chip, PROFILES["6.12"], "tpmrm-b")
        assert a.core.cc_attrs_tbl == b.core.cc_attrs_tbl != []
        fa, fb = a.open(opener=Opener(1000, 1000, 1)), b.open(opener=Opener(2000, 2000, 2))
        assert fa.state.space.owner == Opener(1000, 1000, 1)
        assert wire.be32(await cmd(fa, create_primary()), 10) == 0x80FFFFFF
        assert wire.be32(await cmd(fb, create_primary()), 10) == 0x80FFFFFF
        # Each node's file sees its own object only.
        assert handles_of(await cmd(fa, get_cap_handles())) == [0x80FFFFFF]
        assert handles_of(await cmd(fb, get_cap_handles())) == [0x80FFFFFF]
        assert a.files == {fa} and b.files == {fb} and chip.files == {fa, fb}
        await a.close_all()
        assert chip.files == {fb} and not a.files

    run_with_chip(tmp_path, body)


class Gate(Seam):
    """GetRandom waits (giving the chip up) until another command signals "open"."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def before_command(self, chip: Chip, space: Space, buf: bytearray, bufsiz: int) -> Io[int]:
        if wire.be32(buf, 6) == wire.CC_GET_RANDOM:
            self.log.append("wait")
            woken = yield Wait("open", 10)
            self.log.append(f"woken={woken!r}")
        else:
            self.log.append("signal")
            chip.signal("open")
        return 0


def test_wait_gives_the_chip_up_until_signalled(tmp_path):
    async def body(chip: TpmChip) -> None:
        gate = Gate()
        node = Node(chip, PROFILES["6.12"], seam=gate)
        f, g = node.open(), node.open()
        results: list[bytes] = []

        async def waiter() -> None:
            results.append(await cmd(f, get_random(8)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(0.2)
            assert gate.log == ["wait"] and not chip.busy()  # the chip is free meanwhile
            assert rc(await cmd(g, create_primary())) == 0  # runs while f waits, and signals
        assert gate.log == ["wait", "signal", "woken=True"]
        assert rc(results[0]) == 0 and len(results[0]) == 20

    run_with_chip(tmp_path, body)


def test_wait_times_out_without_a_signal(tmp_path):
    class Short(Seam):
        def before_command(self, chip: Chip, space: Space, buf: bytearray, bufsiz: int) -> Io[int]:
            woken = yield Wait("never", 0.05)
            return 0 if woken is False else -1

    async def body(chip: TpmChip) -> None:
        f = Node(chip, PROFILES["6.12"], seam=Short()).open()
        assert rc(await cmd(f, get_random())) == 0

    run_with_chip(tmp_path, body)


class Slow(Seam):
    """Every command sleeps 0.2 s holding the chip, then notes its command code."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def before_command(self, chip: Chip, space: Space, buf: bytearray, bufsiz: int) -> Io[int]:
        yield Sleep(0.2)
        self.log.append(f"{wire.be32(buf, 6):#x} slept")
        return 0


def test_shutdown_lets_every_queued_o_nonblock_command_run_to_its_end(tmp_path):
    """The worker runs shielded: cancelling serve() while it runs one command, with another
    queued, still runs both to their end (and close flushes what they made)."""

    async def main() -> None:
        slow = Slow()
        async with managed_swtpm(tmp_path / "state") as backend:
            chip = TpmChip(backend)
            await chip.register()
            node = Node(chip, PROFILES["6.12"], seam=slow)
            f, g = node.open(), node.open()
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                await nursery.start(chip.serve)
                assert await f.write(create_primary(), True) == len(create_primary())
                assert await g.write(get_random(8), True) == len(get_random(8))
                await trio.sleep(0.05)
                nursery.cancel_scope.cancel()  # while f's command sleeps, g's queued
            assert trio.current_time() - start >= 0.4
            assert slow.log == [f"{int(TPM2_CC.CreatePrimary):#x} slept", f"{wire.CC_GET_RANDOM:#x} slept"]
            assert not chip.files  # serve() closed both files
            rsp = await backend.transmit(get_cap_handles(), 5)
            assert isinstance(rsp, bytes) and handles_of(rsp) == []  # nothing left in the TPM

    trio.run(main)


def test_a_blocking_command_runs_to_its_end_when_its_caller_is_cancelled(tmp_path):
    """Outside the worker (a blocking write runs its command in the caller's task), the chip
    lock comes with a shield: a cancelled caller (FUSE_INTERRUPT) still gets its command run
    to its end, and its response."""

    async def body(chip: TpmChip) -> None:
        slow = Slow()
        f = Node(chip, PROFILES["6.12"], seam=slow).open()
        with trio.move_on_after(0.05):
            await f.write(create_primary(), False)
        assert slow.log == [f"{int(TPM2_CC.CreatePrimary):#x} slept"]
        rsp = await f.read(4096)
        assert rc(rsp) == 0 and wire.be32(rsp, 10) == 0x80FFFFFF

    run_with_chip(tmp_path, body)


def test_the_chip_is_alone_while_one_file_has_it_to_itself(tmp_path):
    """What the socket backend's spin asks (cusetpm.backends.spin): the command at the TPM is
    its file's second in a row, and none is queued for the worker or waits for the chip lock."""

    async def main() -> None:
        async with managed_swtpm(tmp_path / "state") as backend:
            chip = TpmChip(backend)
            await chip.register()
            node = Node(chip, PROFILES["6.12"], seam=Slow())
            f, g = node.open(), node.open()
            assert not chip.alone()  # no command yet
            async with trio.open_nursery() as nursery:
                await nursery.start(chip.serve)
                assert await f.write(get_random(8), True) == len(get_random(8))
                await trio.sleep(0.05)
                assert not chip.alone()  # f's first: another file may have had the one before
                await trio.sleep(0.3)
                assert len(await f.read(4096)) == 10 + 2 + 8
                assert await f.write(get_random(8), True) == len(get_random(8))
                await trio.sleep(0.05)
                assert chip.alone()  # f's second in a row, nothing else waits
                assert await g.write(get_random(8), True) == len(get_random(8))
                assert not chip.alone()  # g's is queued behind it
                await trio.sleep(0.3)
                assert not chip.alone()  # g's runs: after f's
                await trio.sleep(0.3)
                waiting = trio.Event()

                async def hold() -> None:
                    async with chip.lock:
                        waiting.set()
                        await trio.sleep(0.05)

                async def wait_for_it() -> None:
                    async with chip.lock:  # a command waiting for the chip
                        pass

                chip._same_file = True
                nursery.start_soon(hold)
                await waiting.wait()
                nursery.start_soon(wait_for_it)
                await trio.sleep(0.01)
                assert not chip.alone()
                await trio.sleep(0.1)
                assert chip.alone()
                await f.release()
                await g.release()
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_command_begun_inline_ends_in_the_worker_when_it_must_wait(tmp_path):
    """start_inline(), the request loop's start of a command while nobody else needs the TPM:
    it sends without awaiting; if the answer is not there within the spin (here: no spin) or
    the core asks to sleep, the rest holds the chip until it runs, and gives the same result.
    It is offered only while the chip is free and no command is queued or running, in the
    worker or (``concurrent_work``) in a task of its own."""
    from cusetpm.backends import SocketBackend
    from cusetpm.backends.spin import SpinWait
    from cusetpm.kernel.tpm_dev_common import tpm_dev_transmit

    async def body(chip: TpmChip) -> None:
        backend = chip.backend
        assert isinstance(backend, SocketBackend)
        await trio.sleep(0.01)  # the backend's watch starts
        for seam, spin in ((None, None), (None, SpinWait(5.0)), (Slow(), SpinWait(5.0))):
            backend.spin_wait = spin
            node = Node(chip, PROFILES["6.12"], seam=seam)
            f = node.open()
            f.state.accept_write(get_random(8), True)
            assert chip.may_start_inline()
            sent = backend.commands_sent
            out = chip.start_inline(tpm_dev_transmit(node.core, f.state.space, f.state.buf), node.core, f)
            if spin is not None and seam is None:  # swtpm answers within 5 s: all done here
                assert out == 20 and not chip.busy() and backend.commands_sent == sent + 1
            else:
                assert callable(out) and chip.busy() and not chip.may_start_inline()
                assert backend.commands_sent == sent + (seam is None)  # Sleep first: nothing sent yet
                assert await out() == 20 and not chip.busy() and backend.commands_sent == sent + 1
            assert rc(bytes(f.state.buf[:20])) == 0
            await f.release()
        go = trio.Event()
        chip.queue_work(go.wait)  # the worker is busy
        await trio.sleep(0.01)
        assert not chip.may_start_inline()
        go.set()
        await trio.sleep(0.01)
        assert chip.may_start_inline()
        chip.concurrent_work = True  # a seam that may wait: every command its own task
        go = trio.Event()
        chip.queue_work(go.wait)
        await trio.sleep(0.01)
        assert not chip.may_start_inline()  # that task runs
        go.set()
        await trio.sleep(0.01)
        assert chip.may_start_inline()

    run_with_chip(tmp_path, body)
