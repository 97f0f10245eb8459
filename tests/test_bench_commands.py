# SPDX-License-Identifier: GPL-2.0-only
"""The bench's commands as bytes and the check of their responses, and the paths' client
(bench_paths.Client) sending them through a real TCTI to a real swtpm, both stacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cusetpm.kernel import wire
from cusetpm.testing import bench_commands as bc
from cusetpm.testing.bench_paths import Client

needs_swtpm = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm not installed")


def test_the_commands_are_framed_as_their_sizes_say() -> None:
    for cmd in (bc.GET_RANDOM, bc.create_primary(), bc.sign(0x80000000), bc.context_save(0x80000000),
                bc.flush_context(0x80000000), bc.context_load(b"\x00" * 20)):  # fmt: skip
        assert wire.be32(cmd, 2) == len(cmd)
    assert bc.sign(0x80000001)[10:14] == b"\x80\x00\x00\x01"
    assert bc.name(bc.sign(1)) == "Sign" and bc.name(wire.command(0x17A)) == "command 0x17a"


def response(rc: int, body: bytes = b"") -> bytes:
    return wire.command(rc, body, tag=0x8001)


def test_a_response_passes_only_whole_and_with_response_code_zero() -> None:
    ok = response(0, b"\x00\x02ab")
    assert bc.check(bc.GET_RANDOM, ok) is ok
    with pytest.raises(bc.TpmError, match=r"^GetRandom: response code 0x18b$"):
        bc.check(bc.GET_RANDOM, response(0x18B))
    with pytest.raises(bc.TpmError, match="broken response of 12 bytes"):
        bc.check(bc.GET_RANDOM, ok[:12])
    with pytest.raises(bc.TpmError, match="broken response of 4 bytes"):
        bc.check(bc.GET_RANDOM, ok[:4])
    assert bc.retry(response(wire.RC_RETRY)) and bc.retry(response(wire.RC_TESTING))
    assert not bc.retry(ok) and not bc.retry(response(0x18B)) and not bc.retry(b"\x80")


def test_the_client_refuses_an_unknown_stack() -> None:
    with pytest.raises(ValueError, match="api: one of tcti, esapi"):
        Client("swtpm", "port=1", api="fapi")


@needs_swtpm
@pytest.mark.parametrize("api", ["tcti", "esapi"])
def test_the_client_sends_one_backend_command_per_call_and_checks_the_answer(tmp_path: Path, api: str) -> None:
    """Through a counting relay: each get_random() and sign() is one TPM command on either
    stack, and a failing command raises (a Sign with the key flushed behind the client's back)."""
    from cusetpm.testing.relay import CountingRelay
    from cusetpm.testing.swtpm import STARTED, Swtpm

    swtpm = Swtpm.start(tmp_path / "swtpm", flags=STARTED)
    relay = CountingRelay(swtpm.port)
    try:
        client = Client("swtpm", f"host=127.0.0.1,port={relay.port}", with_key=True, api=api)
        try:
            for call in (client.get_random, client.sign):
                call()  # settle (swtpm answers a first Sign with RETRY while it tests ECDSA)
                before = relay.commands
                for _ in range(3):
                    call()
                assert relay.commands - before == 3, call.__name__
            assert client.key is not None
            handle = client.esapi.tr_get_tpm_handle(client.key)
            assert client.sign_command == bc.sign(handle)
            client.call(bc.flush_context(handle))
            # TPM_RC_REFERENCE_H0: the raw code from the TCTI loop, ESAPI's words for it.
            with pytest.raises(Exception, match="^Sign: response code 0x910$" if api == "tcti" else "is not loaded"):
                client.sign()
            client.key = None  # gone already
        finally:
            client.close()
    finally:
        relay.close()
        swtpm.stop()
