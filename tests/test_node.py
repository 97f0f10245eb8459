# SPDX-License-Identifier: GPL-2.0-only
"""The device node (cusetpm.daemon.node): its files on a shared chip, and what a reload that
removes it, or its ``max_open``, refuses."""

from __future__ import annotations

import errno

import pytest
import trio

from cusetpm.backends import managed_swtpm
from cusetpm.daemon import Node, TpmChip
from cusetpm.kernel.profiles import PROFILES
from cusetpm.tenants.policy import Policy
from helpers import get_random, rc


def test_files_of_two_nodes_share_the_chip_and_a_removed_node_empties(tmp_path):
    """Each open() is a file of its node and of the chip; a node a reload removed opens no
    more files (ENOENT) and says it is empty when its last file closes."""

    async def main() -> None:
        async with managed_swtpm(tmp_path / "state") as backend:
            chip = TpmChip(backend)
            await chip.register()
            a, b = Node(chip, PROFILES["6.12"], "a"), Node(chip, PROFILES["6.1"], "b")
            async with trio.open_nursery() as nursery:
                await nursery.start(chip.serve)
                f, g = a.open(), b.open()
                assert a.files == {f} and b.files == {g} and chip.files == {f, g}
                assert await g.write(get_random(8), False) == len(get_random(8))
                assert rc(await g.read(4096)) == 0
                b.accepting = False
                with pytest.raises(OSError) as exc:
                    b.open()
                assert exc.value.errno == errno.ENOENT and not b.emptied.is_set()
                await g.release()
                assert b.emptied.is_set() and chip.files == {f} and not a.emptied.is_set()
                await a.close_all()
                assert not a.files and not chip.files
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_max_open_refuses_the_next_open_with_emfile(tmp_path):
    async def main() -> None:
        async with managed_swtpm(tmp_path / "state") as backend:
            chip = TpmChip(backend)
            await chip.register()
            node = Node(chip, PROFILES["6.12"], "t", policy=Policy(max_open=2))
            f, _ = node.open(), node.open()
            with pytest.raises(OSError) as exc:
                node.open()
            assert exc.value.errno == errno.EMFILE and node.refusals["max_open"] == 1
            await f.release()
            node.open()  # a closed file makes room
            await node.close_all()

    trio.run(main)


def test_turn_now_takes_a_token_of_the_tenants_rate_only_when_one_is_there(tmp_path):
    """A node without a rate always may go now; a tenant's rate (its burst: one second's
    worth) lets that many go at once, then none until a token comes, and throttle() waits
    for it."""

    async def main() -> None:
        async with managed_swtpm(tmp_path / "state") as backend:
            chip = TpmChip(backend)
            await chip.register()
            free = Node(chip, PROFILES["6.12"], "free")
            assert all(free.turn_now() for _ in range(100))
            rated = Node(chip, PROFILES["6.12"], "rated", policy=Policy(commands_per_second=2))
            assert rated.turn_now() and rated.turn_now() and not rated.turn_now()
            with trio.fail_after(5):
                await rated.throttle()  # waits for the next token (half a second)
            assert not rated.turn_now()

    trio.run(main)
