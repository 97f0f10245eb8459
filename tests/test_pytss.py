# SPDX-License-Identifier: GPL-2.0-only
"""tpm2-pytss ESAPI over tpm2-tss's ``device:`` TCTI, through a cusetpm node.

One ESAPI context = one open file of the node = one space.  Objects and sessions live in
the space for as long as the context is open; between commands the resource manager keeps
them only as saved contexts, and it flushes them when the file is closed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RC, TPM2_RH, TPM2_SE, TPM2_ST, TPMA_OBJECT, TPMA_SESSION
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPMS_SENSITIVE_CREATE,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
)

from conftest import StartDaemon, esapi, settled_backend_handles, swtpm_backend_handles, transient_handles

PCRS = "sha256:0,1,2"


def ecdsa_key() -> TPM2B_PUBLIC:
    return TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256", objectAttributes="fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign"
    )


def null_ticket() -> TPMT_TK_HASHCHECK:
    return TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)


def aes128cfb() -> TPMT_SYM_DEF:
    return TPMT_SYM_DEF.parse("aes128cfb")


def test_key_create_load_sign_verify(node: Path) -> None:
    message = b"signed by a key that lives in a resource-manager space"
    digest = hashlib.sha256(message).digest()
    with esapi(node) as ectx:
        primary, *_ = ectx.create_primary(None, "rsa2048")
        private, public, *_ = ectx.create(primary, None, ecdsa_key())
        key = ectx.load(primary, private, public)
        assert int(ectx.tr_get_tpm_handle(key)) == 0x80FFFFFE  # second slot of this space
        signature = ectx.sign(key, digest, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), null_ticket())
        assert signature.sigAlg == TPM2_ALG.ECDSA

        ticket = ectx.verify_signature(key, digest, signature)
        assert ticket.tag == TPM2_ST.VERIFIED

        with pytest.raises(TSS2_Exception) as bad:
            ectx.verify_signature(key, hashlib.sha256(message + b"!").digest(), signature)
        assert bad.value.error == TPM2_RC.SIGNATURE

    # The signature is a real ECDSA P-256 signature of the message by the key's public part.
    pem = public.to_pem()
    pub = serialization.load_pem_public_key(pem)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    r = int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big")
    s = int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big")
    pub.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))


def _pcr_policy(ectx: ESAPI) -> bytes:
    trial = ectx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, None, TPM2_ALG.SHA256)
    ectx.policy_pcr(trial, None, PCRS)
    digest = bytes(ectx.policy_get_digest(trial))
    ectx.flush_context(trial)
    return digest


def _unseal_with_policy(ectx: ESAPI, sealed: ESYS_TR) -> bytes:
    """Unseal with a new policy session, flushed once it has served (ESAPI starts sessions
    with continueSession)."""
    session = ectx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None, TPM2_ALG.SHA256)
    ectx.policy_pcr(session, None, PCRS)
    data = bytes(ectx.unseal(sealed, session1=session))
    ectx.flush_context(session)
    return data


@pytest.mark.parametrize("sessions", ["kernel", "global"])
def test_policy_session_pcr_policy_unseal(daemon: StartDaemon, sessions: str) -> None:
    d = daemon(extra_args=["--sessions", sessions], inspectable=True)
    secret = b"released only while PCRs 0-2 are unchanged"
    with esapi(d.node) as ectx:
        primary, *_ = ectx.create_primary(None, "rsa2048")
        policy = _pcr_policy(ectx)
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(secret)))
        template = TPM2B_PUBLIC.parse(
            "keyedhash", objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT, authPolicy=policy
        )
        private, public, *_ = ectx.create(primary, sensitive, template)
        sealed = ectx.load(primary, private, public)

        assert _unseal_with_policy(ectx, sealed) == secret

        ectx.pcr_event(ESYS_TR.PCR1, b"changes PCR 1")
        with pytest.raises(TSS2_Exception) as refused:
            _unseal_with_policy(ectx, sealed)
        assert refused.value.error == TPM2_RC.POLICY_FAIL
        # The refused policy session is still in this space (and only saved in the TPM).
        assert swtpm_backend_handles(d).loaded_sessions == []
        assert len(swtpm_backend_handles(d).saved_sessions) == 1
    # Closing the file flushed it.
    backend = settled_backend_handles(d)
    assert backend.saved_sessions == [] and backend.loaded_sessions == [] and backend.transient == []


@pytest.mark.parametrize("sessions", ["kernel", "global"])  # global: continueSession read per command
def test_hmac_session_authorizes_commands(daemon: StartDaemon, sessions: str) -> None:
    d = daemon(extra_args=["--sessions", sessions], inspectable=True)
    with esapi(d.node) as ectx:
        primary, *_ = ectx.create_primary(None, "rsa2048")
        # A salted HMAC session with parameter encryption both ways.
        session = ectx.start_auth_session(primary, ESYS_TR.NONE, TPM2_SE.HMAC, aes128cfb(), TPM2_ALG.SHA256)
        ectx.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT | TPMA_SESSION.ENCRYPT)
        # Encrypted responses, decrypted by ESAPI with the session key.
        one = bytes(ectx.get_random(32, session1=session))
        two = bytes(ectx.get_random(32, session1=session))
        assert len(one) == len(two) == 32 and one != two

        # The session authorizes the use of the parent (Create) and of a key with a password.
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=b"key password"))
        private, public, *_ = ectx.create(primary, sensitive, ecdsa_key(), session1=session)
        key = ectx.load(primary, private, public, session1=session)
        ectx.tr_set_auth(key, b"key password")
        digest = hashlib.sha256(b"message").digest()
        signature = ectx.sign(key, digest, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), null_ticket(), session1=session)
        assert ectx.verify_signature(key, digest, signature).tag == TPM2_ST.VERIFIED

        # A wrong password is refused by the TPM's HMAC check.
        ectx.tr_set_auth(key, b"wrong password")
        with pytest.raises(TSS2_Exception) as refused:
            ectx.sign(key, digest, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), null_ticket(), session1=session)
        assert refused.value.error == TPM2_RC.AUTH_FAIL

        # Between commands the TPM holds this space's session only as a saved context.
        backend = swtpm_backend_handles(d)
        assert backend.loaded_sessions == [] and len(backend.saved_sessions) == 1 and backend.transient == []
    backend = settled_backend_handles(d)
    assert backend.saved_sessions == [] and backend.loaded_sessions == [] and backend.transient == []


def test_several_contexts_each_see_only_their_transient_handles(daemon: StartDaemon) -> None:
    d = daemon(inspectable=True)
    with esapi(d.node) as a, esapi(d.node) as b, esapi(d.node) as c:
        a_key, a_pub, *_ = a.create_primary(None, "ecc256")
        b_key1, b_pub1, *_ = b.create_primary(None, "rsa2048")
        b_key2, b_pub2, *_ = b.create_primary(None, "ecc384")

        assert transient_handles(a) == [0x80FFFFFF]
        assert transient_handles(b) == [0x80FFFFFE, 0x80FFFFFF]
        assert transient_handles(c) == []
        # The same virtual handle names a different object in each space.
        assert int(a.tr_get_tpm_handle(a_key)) == int(b.tr_get_tpm_handle(b_key1)) == 0x80FFFFFF
        assert bytes(a.read_public(a_key)[1]) == bytes(a_pub.get_name())
        assert bytes(b.read_public(b_key1)[1]) == bytes(b_pub1.get_name())
        assert bytes(a_pub.get_name()) != bytes(b_pub1.get_name())
        # A space cannot reach a handle it does not have: the resource manager refuses the
        # command (EINVAL from write(), as the kernel does), and the TPM never sees it.
        with esapi(d.node) as empty, pytest.raises(TSS2_Exception):
            empty.tr_from_tpmpublic(0x80FFFFFF)
        assert swtpm_backend_handles(d).transient == []

        a.close()
        # Closing one space leaves the others alone.
        assert transient_handles(b) == [0x80FFFFFE, 0x80FFFFFF]
        assert bytes(b.read_public(b_key2)[1]) == bytes(b_pub2.get_name())
        c_key, *_ = c.create_primary(None, "ecc256")
        assert transient_handles(c) == [0x80FFFFFF]
        assert bytes(c.read_public(c_key)[1]) == bytes(a_pub.get_name())  # same template, same seed
    backend = settled_backend_handles(d)
    assert backend.transient == [] and backend.saved_sessions == [] and backend.loaded_sessions == []
