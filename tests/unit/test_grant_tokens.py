"""Unit tests for gpu_attach_server.grant_tokens: Ed25519-signed lease grants."""

import base64
import json
import os
import stat
import time

import pytest

from gpu_attach_server.grant_tokens import GrantSigner, GrantTokenError, GrantVerifier


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture(scope="module")
def signer():
    return GrantSigner.generate()


@pytest.fixture(scope="module")
def verifier(signer):
    return GrantVerifier(signer.public_key_pem())


def claims(**over):
    c = {"lease": "L1", "user": "alice", "session": "nb-1", "agent": "agent-1",
         "gpus": [0], "memory": 1024, "exp": time.time() + 30}
    c.update(over)
    return c


def test_round_trip(signer, verifier):
    c = claims()
    token = signer.sign(c)
    assert isinstance(token, str) and token.count(".") == 1
    assert verifier.verify(token, agent_id="agent-1") == c


def test_token_body_is_readable_claims(signer):
    body, _ = signer.sign(claims(lease="L9")).split(".")
    assert json.loads(b64d(body))["lease"] == "L9"


def test_tampered_body_rejected(signer, verifier):
    token = signer.sign(claims(user="alice"))
    body, sig = token.split(".")
    forged = json.loads(b64d(body))
    forged["user"] = "mallory"
    forged_body = b64e(json.dumps(forged, separators=(",", ":"), sort_keys=True).encode())
    with pytest.raises(GrantTokenError, match="signature"):
        verifier.verify(forged_body + "." + sig, agent_id="agent-1")


def test_tampered_signature_rejected(signer, verifier):
    body, sig = signer.sign(claims()).split(".")
    raw = bytearray(b64d(sig))
    raw[0] ^= 0x01
    with pytest.raises(GrantTokenError, match="signature"):
        verifier.verify(body + "." + b64e(bytes(raw)), agent_id="agent-1")


def test_truncated_signature_rejected(signer, verifier):
    body, sig = signer.sign(claims()).split(".")
    with pytest.raises(GrantTokenError):
        verifier.verify(body + "." + sig[:20], agent_id="agent-1")


@pytest.mark.parametrize("token", ["", "nodot", "a.b.c", "x" * 9000 + ".y", None, 123])
def test_malformed_tokens_rejected(verifier, token):
    with pytest.raises(GrantTokenError):
        verifier.verify(token, agent_id="agent-1")


def test_wrong_agent_rejected(signer, verifier):
    token = signer.sign(claims(agent="agent-1"))
    with pytest.raises(GrantTokenError, match="another agent"):
        verifier.verify(token, agent_id="agent-2")


def test_expired_rejected_with_leeway(signer):
    v = GrantVerifier(signer.public_key_pem(), leeway_s=2.0)
    token = signer.sign(claims(exp=1000.0))
    assert v.verify(token, agent_id="agent-1", now=999.0)["exp"] == 1000.0
    assert v.verify(token, agent_id="agent-1", now=1001.5)  # inside the leeway
    with pytest.raises(GrantTokenError, match="expired"):
        v.verify(token, agent_id="agent-1", now=1002.5)
    with pytest.raises(GrantTokenError, match="renew"):
        v.verify(token, agent_id="agent-1", now=5000.0)


def test_expired_uses_wall_clock_by_default(signer, verifier):
    with pytest.raises(GrantTokenError, match="expired"):
        verifier.verify(signer.sign(claims(exp=time.time() - 60)), agent_id="agent-1")


@pytest.mark.parametrize("exp", [None, "tomorrow", [1]])
def test_missing_or_bad_expiry_rejected(signer, verifier, exp):
    c = claims()
    if exp is None:
        del c["exp"]
    else:
        c["exp"] = exp
    with pytest.raises(GrantTokenError, match="expiry"):
        verifier.verify(signer.sign(c), agent_id="agent-1")


def test_token_from_another_key_rejected(verifier):
    other = GrantSigner.generate()
    with pytest.raises(GrantTokenError, match="signature"):
        verifier.verify(other.sign(claims()), agent_id="agent-1")


def test_verifier_rejects_non_ed25519_key():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(ValueError, match="Ed25519"):
        GrantVerifier(pem)


def test_from_file_creates_private_key_file_and_reloads_same_key(tmp_path):
    path = tmp_path / "keys" / "broker.pem"
    s1 = GrantSigner.from_file(path)
    assert path.exists()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert b"PRIVATE KEY" in path.read_bytes()
    s2 = GrantSigner.from_file(path)
    assert s2.public_key_pem() == s1.public_key_pem()
    # A grant signed before a restart verifies with the key loaded after it.
    token = s1.sign(claims())
    assert GrantVerifier(s2.public_key_pem()).verify(token, agent_id="agent-1")["lease"] == "L1"


def test_from_file_without_create_refuses_missing_key(tmp_path):
    with pytest.raises(FileNotFoundError):
        GrantSigner.from_file(tmp_path / "missing.pem", create=False)
    assert not (tmp_path / "missing.pem").exists()


def test_from_file_rejects_a_non_ed25519_key(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "ec.pem"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ValueError, match="Ed25519"):
        GrantSigner.from_file(path)


def test_generated_signers_differ():
    assert GrantSigner.generate().public_key_pem() != GrantSigner.generate().public_key_pem()
