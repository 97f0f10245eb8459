# SPDX-License-Identifier: GPL-2.0-only
"""Unmodified tpm2-tools (Debian's 5.4) through a cusetpm node, TCTI ``device:NODE``.

Every tool run is a new process and so a new open() of the node: a new, empty space, as on
/dev/tpmrm0.  Objects cross from one run to the next only as context files (ContextSave /
ContextLoad), and sessions only because a session the user saved is forgotten by the resource
manager (not flushed when the file is closed).  Each test gets a fresh daemon and swtpm.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from conftest import (
    BackendHandles,
    Daemon,
    StartDaemon,
    esapi,
    settled_backend_handles,
    swtpm_backend_handles,
    tpm2,
    transient_handles,
)

NV_INDEX = "0x1500016"
PERSISTENT = "0x81000001"


MODES = {"kernel": [], "global": ["--sessions", "global"], "lazy": ["--swap", "lazy"]}


@pytest.fixture(params=list(MODES), ids=["sessions-kernel", "sessions-global", "swap-lazy"])
def node(daemon: StartDaemon, request: pytest.FixtureRequest) -> Path:
    """Every tool sequence runs on a kernel-mode node, on one with global session accounting
    and on one with lazy context swapping: unmodified tpm2-tools must see no difference."""
    extra = MODES[request.param]
    return daemon(extra_args=extra).node


def _yaml_value(text: bytes, key: str) -> str:
    m = re.search(rf"^{re.escape(key)}: *(\S+)", text.decode(), re.M)
    assert m, f"no {key!r} in:\n{text.decode()}"
    return m.group(1)


def _yaml_type(text: bytes) -> str:
    m = re.search(r"^type:\n +value: *(\S+)", text.decode(), re.M)
    assert m, f"no type in:\n{text.decode()}"
    return m.group(1)


def _name(node: Path, context: str, cwd: Path) -> str:
    return _yaml_value(tpm2(node, "tpm2_readpublic", "-c", context, cwd=cwd).stdout, "name")


def _handles(text: bytes) -> list[int]:
    """Handles listed by ``tpm2_getcap handles-*`` ("- 0x80000000" lines)."""
    return [int(h, 16) for h in re.findall(r"^- (0x[0-9a-fA-F]+)$", text.decode(), re.M)]


def _primary(node: Path, cwd: Path) -> bytes:
    return tpm2(
        node, "tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "rsa2048", "-c", "primary.ctx", cwd=cwd
    ).stdout


def _signing_key(node: Path, cwd: Path) -> None:
    _primary(node, cwd)
    tpm2(
        node,
        "tpm2_create",
        "-C",
        "primary.ctx",
        "-G",
        "rsa2048:rsassa-sha256",
        "-u",
        "key.pub",
        "-r",
        "key.priv",
        cwd=cwd,
    )
    tpm2(node, "tpm2_load", "-C", "primary.ctx", "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx", cwd=cwd)


def test_createprimary(daemon: StartDaemon, tmp_path: Path) -> None:
    d = daemon(inspectable=True)
    out = _primary(d.node, tmp_path)
    assert (tmp_path / "primary.ctx").stat().st_size > 0
    assert _yaml_type(out) == "rsa"
    # A primary key is derived from the owner seed: the same template gives the same key,
    # in any later open of the node.
    again = tpm2(
        d.node, "tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "rsa2048", "-c", "again.ctx", cwd=tmp_path
    )
    assert _yaml_value(again.stdout, "rsa") == _yaml_value(out, "rsa")
    # Each saved context loads in a new run; both name the same key.
    assert _name(d.node, "primary.ctx", tmp_path) == _name(d.node, "again.ctx", tmp_path)
    # Closing the node left nothing loaded in the TPM itself.
    backend = settled_backend_handles(d)
    assert backend.transient == [] and backend.loaded_sessions == [] and backend.saved_sessions == []


def test_create(node: Path, tmp_path: Path) -> None:
    _primary(node, tmp_path)
    out = tpm2(
        node,
        "tpm2_create",
        "-C",
        "primary.ctx",
        "-G",
        "ecc256:ecdsa-sha256",
        "-u",
        "key.pub",
        "-r",
        "key.priv",
        cwd=tmp_path,
    ).stdout
    assert _yaml_type(out) == "ecc"
    assert (tmp_path / "key.pub").stat().st_size > 0 and (tmp_path / "key.priv").stat().st_size > 0
    # The private blob is the TPM's, bound to this parent: a different parent cannot load it.
    tpm2(node, "tpm2_createprimary", "-C", "o", "-G", "ecc256", "-c", "other.ctx", cwd=tmp_path)
    wrong = tpm2(
        node,
        "tpm2_load",
        "-C",
        "other.ctx",
        "-u",
        "key.pub",
        "-r",
        "key.priv",
        "-c",
        "x.ctx",
        cwd=tmp_path,
        check=False,
    )
    assert wrong.returncode != 0


def test_load(node: Path, tmp_path: Path) -> None:
    _primary(node, tmp_path)
    tpm2(node, "tpm2_create", "-C", "primary.ctx", "-G", "rsa2048", "-u", "key.pub", "-r", "key.priv", cwd=tmp_path)
    out = tpm2(
        node, "tpm2_load", "-C", "primary.ctx", "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx", cwd=tmp_path
    ).stdout
    name = _yaml_value(out, "name")
    assert (tmp_path / "key.ctx").stat().st_size > 0
    assert _name(node, "key.ctx", tmp_path) == name


def _rsa_pkcs1_sha256_valid(modulus: int, exponent: int, message: bytes, signature: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 verification, done here, without the TPM."""
    k = (modulus.bit_length() + 7) // 8
    em = pow(int.from_bytes(signature, "big"), exponent, modulus).to_bytes(k, "big")
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(message).digest()
    return em == b"\x00\x01" + b"\xff" * (k - 3 - len(digest_info)) + b"\x00" + digest_info


def test_sign(node: Path, tmp_path: Path) -> None:
    _signing_key(node, tmp_path)
    message = b"signed through the resource manager\n"
    (tmp_path / "msg").write_bytes(message)
    tpm2(node, "tpm2_sign", "-c", "key.ctx", "-g", "sha256", "-f", "plain", "-o", "sig.raw", "msg", cwd=tmp_path)
    signature = (tmp_path / "sig.raw").read_bytes()
    assert len(signature) == 256
    public = tpm2(node, "tpm2_readpublic", "-c", "key.ctx", cwd=tmp_path).stdout
    modulus = int(_yaml_value(public, "rsa"), 16)
    exponent = int(_yaml_value(public, "exponent"))
    assert _rsa_pkcs1_sha256_valid(modulus, exponent, message, signature)
    assert not _rsa_pkcs1_sha256_valid(modulus, exponent, message + b"x", signature)


def test_verifysignature(node: Path, tmp_path: Path) -> None:
    _signing_key(node, tmp_path)
    (tmp_path / "msg").write_bytes(b"verify me\n")
    tpm2(node, "tpm2_sign", "-c", "key.ctx", "-g", "sha256", "-o", "sig", "msg", cwd=tmp_path)
    verify = ["tpm2_verifysignature", "-c", "key.ctx", "-g", "sha256", "-m", "msg", "-s", "sig"]
    tpm2(node, *verify, "-t", "ticket", cwd=tmp_path)
    assert (tmp_path / "ticket").stat().st_size > 0
    (tmp_path / "msg").write_bytes(b"verify me, changed\n")
    bad = tpm2(node, *verify, cwd=tmp_path, check=False)
    assert bad.returncode != 0
    assert b"0x2DB" in bad.stderr or b"signature is not valid" in bad.stderr, bad.stderr.decode()


def test_seal_with_pcr_policy_and_unseal_with_policy_session(node: Path, tmp_path: Path) -> None:
    secret = b"sealed to PCRs 0,1,2\n"
    pcrs = "sha256:0,1,2"
    _primary(node, tmp_path)
    tpm2(node, "tpm2_pcrread", pcrs, "-o", "pcr.bin", cwd=tmp_path)
    tpm2(node, "tpm2_createpolicy", "--policy-pcr", "-l", pcrs, "-f", "pcr.bin", "-L", "pcr.policy", cwd=tmp_path)
    tpm2(node, "tpm2_create", "-C", "primary.ctx", "-L", "pcr.policy", "-i", "-", "-u", "seal.pub", "-r", "seal.priv",
         cwd=tmp_path, input=secret)  # fmt: skip
    tpm2(node, "tpm2_load", "-C", "primary.ctx", "-u", "seal.pub", "-r", "seal.priv", "-c", "seal.ctx", cwd=tmp_path)

    tpm2(node, "tpm2_startauthsession", "--policy-session", "-S", "session.ctx", cwd=tmp_path)
    tpm2(node, "tpm2_policypcr", "-S", "session.ctx", "-l", pcrs, cwd=tmp_path)
    out = tpm2(node, "tpm2_unseal", "-p", "session:session.ctx", "-c", "seal.ctx", cwd=tmp_path).stdout
    tpm2(node, "tpm2_flushcontext", "session.ctx", cwd=tmp_path)
    assert out == secret

    # Change a PCR of the policy: the same steps must now be refused by the TPM.
    tpm2(node, "tpm2_pcrextend", "1:sha256=" + "ab" * 32, cwd=tmp_path)
    tpm2(node, "tpm2_startauthsession", "--policy-session", "-S", "session2.ctx", cwd=tmp_path)
    tpm2(node, "tpm2_policypcr", "-S", "session2.ctx", "-l", pcrs, cwd=tmp_path)
    bad = tpm2(node, "tpm2_unseal", "-p", "session:session2.ctx", "-c", "seal.ctx", cwd=tmp_path, check=False)
    assert bad.returncode != 0
    assert secret not in bad.stdout
    assert b"0x99D" in bad.stderr.upper() or b"policy" in bad.stderr.lower(), bad.stderr.decode()


def test_nv_define_write_read_undefine(node: Path, tmp_path: Path) -> None:
    data = bytes(range(32))
    (tmp_path / "data").write_bytes(data)
    tpm2(node, "tpm2_nvdefine", NV_INDEX, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite", cwd=tmp_path)
    assert int(NV_INDEX, 16) in _handles(tpm2(node, "tpm2_getcap", "handles-nv-index", cwd=tmp_path).stdout)
    tpm2(node, "tpm2_nvwrite", NV_INDEX, "-C", "o", "-i", "data", cwd=tmp_path)
    tpm2(node, "tpm2_nvread", NV_INDEX, "-C", "o", "-s", "32", "-o", "back", cwd=tmp_path)
    assert (tmp_path / "back").read_bytes() == data
    tpm2(node, "tpm2_nvundefine", NV_INDEX, "-C", "o", cwd=tmp_path)
    assert int(NV_INDEX, 16) not in _handles(tpm2(node, "tpm2_getcap", "handles-nv-index", cwd=tmp_path).stdout)
    gone = tpm2(node, "tpm2_nvread", NV_INDEX, "-C", "o", "-s", "32", cwd=tmp_path, check=False)
    assert gone.returncode != 0


def test_evictcontrol_persist_then_remove(node: Path, tmp_path: Path) -> None:
    _primary(node, tmp_path)
    name = _name(node, "primary.ctx", tmp_path)
    out = tpm2(node, "tpm2_evictcontrol", "-C", "o", "-c", "primary.ctx", PERSISTENT, cwd=tmp_path).stdout
    assert _yaml_value(out, "action") == "persisted"
    assert int(PERSISTENT, 16) in _handles(tpm2(node, "tpm2_getcap", "handles-persistent", cwd=tmp_path).stdout)
    # Persistent handles are not virtualized: a new run reaches the key by its handle.
    assert _name(node, PERSISTENT, tmp_path) == name
    out = tpm2(node, "tpm2_evictcontrol", "-C", "o", "-c", PERSISTENT, cwd=tmp_path).stdout
    assert _yaml_value(out, "action") == "evicted"
    assert int(PERSISTENT, 16) not in _handles(tpm2(node, "tpm2_getcap", "handles-persistent", cwd=tmp_path).stdout)
    assert tpm2(node, "tpm2_readpublic", "-c", PERSISTENT, cwd=tmp_path, check=False).returncode != 0


def test_flushcontext(daemon: StartDaemon, tmp_path: Path) -> None:
    d = daemon(inspectable=True)
    with esapi(d.node) as ectx:
        key, *_ = ectx.create_primary(None, "ecc256")
        vhandle = int(ectx.tr_get_tpm_handle(key))
        assert vhandle == 0x80FFFFFF
        # Another open of the node flushes "all transient objects": those of its own space.
        tpm2(d.node, "tpm2_flushcontext", "-t", cwd=tmp_path)
        tpm2(d.node, "tpm2_flushcontext", "-l", cwd=tmp_path)
        # It cannot name (nor so flush) the object of this space by its virtual handle.
        other = tpm2(d.node, "tpm2_flushcontext", hex(vhandle), cwd=tmp_path, check=False)
        assert other.returncode != 0
        assert transient_handles(ectx) == [vhandle]
        ectx.read_public(key)
        # The owner can flush it.
        ectx.flush_context(key)
        assert transient_handles(ectx) == []

    # A saved session, flushed by a later run through its context file.
    tpm2(d.node, "tpm2_startauthsession", "--policy-session", "-S", "s.ctx", cwd=tmp_path)
    saved = _handles(tpm2(d.node, "tpm2_getcap", "handles-saved-session", cwd=tmp_path).stdout)
    assert len(saved) == 1
    assert settled_backend_handles(d).saved_sessions == saved
    tpm2(d.node, "tpm2_flushcontext", "s.ctx", cwd=tmp_path)
    assert _handles(tpm2(d.node, "tpm2_getcap", "handles-saved-session", cwd=tmp_path).stdout) == []
    backend = swtpm_backend_handles(d)
    assert backend.transient == [] and backend.loaded_sessions == [] and backend.saved_sessions == []


def test_getcap_handles_transient_lists_only_the_callers_handles(daemon: StartDaemon, tmp_path: Path) -> None:
    d = daemon(inspectable=True)
    with esapi(d.node) as ectx:
        ectx.create_primary(None, "ecc256")
        ectx.create_primary(None, "rsa2048")
        # This open file sees its two objects, by their virtual handles ...
        assert sorted(transient_handles(ectx)) == [0x80FFFFFE, 0x80FFFFFF]
        # ... another open (a tool run) sees none of them ...
        out = tpm2(d.node, "tpm2_getcap", "handles-transient", cwd=tmp_path).stdout
        assert _handles(out) == [], out.decode()
        # ... and the TPM itself holds them only as saved contexts between commands.
        assert swtpm_backend_handles(d).transient == []
        # A tool run with an object of its own does not disturb this space either.
        _primary(d.node, tmp_path)
        assert sorted(transient_handles(ectx)) == [0x80FFFFFE, 0x80FFFFFF]
    assert _handles(tpm2(d.node, "tpm2_getcap", "handles-transient", cwd=tmp_path).stdout) == []
    assert settled_backend_handles(d) == BackendHandles([], [], [])


def test_session_saved_by_one_run_is_used_by_the_next(daemon: StartDaemon, tmp_path: Path) -> None:
    """The kernel's session-escape rule.

    tpm2_startauthsession saves its session with ContextSave before it exits; the resource
    manager then forgets the session instead of flushing it at close, so later runs can
    ContextLoad it, use it and save it again.
    """
    d: Daemon = daemon(inspectable=True)
    tpm2(d.node, "tpm2_startauthsession", "--policy-session", "-S", "s.ctx", cwd=tmp_path)
    saved = settled_backend_handles(d).saved_sessions
    assert len(saved) == 1, "the saved session must survive the close of the first run"
    assert _handles(tpm2(d.node, "tpm2_getcap", "handles-saved-session", cwd=tmp_path).stdout) == saved

    digest = tpm2(d.node, "tpm2_policypcr", "-S", "s.ctx", "-l", "sha256:0", "-L", "run2.policy", cwd=tmp_path).stdout
    assert settled_backend_handles(d).saved_sessions == saved, "the second run must not flush the session either"
    # The policy session did what a trial session does in a single run.
    tpm2(d.node, "tpm2_createpolicy", "--policy-pcr", "-l", "sha256:0", "-L", "trial.policy", cwd=tmp_path)
    assert (tmp_path / "run2.policy").read_bytes() == (tmp_path / "trial.policy").read_bytes()
    assert digest.strip() == (tmp_path / "trial.policy").read_bytes().hex().encode()

    # A third run uses it again (the policy digest goes on from the second run's).
    tpm2(d.node, "tpm2_policypcr", "-S", "s.ctx", "-l", "sha256:0", "-L", "run3.policy", cwd=tmp_path)
    run2 = (tmp_path / "run2.policy").read_bytes()
    expected = hashlib.sha256(run2 + bytes.fromhex("0000017f") + _pcr_selection_sha256_0()
                              + hashlib.sha256(bytes(32)).digest()).digest()  # fmt: skip
    assert (tmp_path / "run3.policy").read_bytes() == expected

    tpm2(d.node, "tpm2_flushcontext", "s.ctx", cwd=tmp_path)
    backend = swtpm_backend_handles(d)
    assert backend.saved_sessions == [] and backend.loaded_sessions == [] and backend.transient == []
    gone = tpm2(d.node, "tpm2_policypcr", "-S", "s.ctx", "-l", "sha256:0", cwd=tmp_path, check=False)
    assert gone.returncode != 0


def _pcr_selection_sha256_0() -> bytes:
    """TPML_PCR_SELECTION {count 1, {SHA256, sizeofSelect 3, PCR 0}}, marshalled."""
    return bytes.fromhex("00000001000b03010000")
