"""Grant tokens: short-lived, Ed25519-signed statements of a lease that an agent verifies alone.

The broker signs with its private key; an agent holds only the public key, so an agent host that
is compromised cannot mint grants. Format: ``base64url(claims JSON) "." base64url(signature)``.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class GrantTokenError(Exception):
    """A grant token that is malformed, forged, expired or for another agent."""


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GrantSigner:
    def __init__(self, key: Ed25519PrivateKey):
        self._key = key

    @classmethod
    def generate(cls) -> "GrantSigner":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_file(cls, path: str | Path, create: bool = True) -> "GrantSigner":
        """Load the signing key, creating it (mode 0600) on first use so restarts keep grants valid."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise FileNotFoundError(f"broker signing key {path} does not exist")
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            return cls(key)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def public_key_pem(self) -> str:
        return (
            self._key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def sign(self, claims: dict[str, Any]) -> str:
        body = _b64e(orjson.dumps(claims, option=orjson.OPT_SORT_KEYS))
        return body + "." + _b64e(self._key.sign(body.encode()))


class GrantVerifier:
    def __init__(self, public_key_pem: str, leeway_s: float = 2.0):
        key = serialization.load_pem_public_key(public_key_pem.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the broker's public key is not an Ed25519 key")
        self._key = key
        self._leeway = leeway_s

    def verify(self, token: str, *, agent_id: str, now: float | None = None) -> dict[str, Any]:
        """Return the token's claims if it is genuine, unexpired and addressed to ``agent_id``."""
        if not isinstance(token, str) or len(token) > 8192 or token.count(".") != 1:
            raise GrantTokenError("malformed grant token")
        body, sig = token.split(".")
        try:
            self._key.verify(_b64d(sig), body.encode())
        except (InvalidSignature, ValueError):
            raise GrantTokenError("grant token signature is not the broker's") from None
        try:
            claims = json.loads(_b64d(body))
        except ValueError:
            raise GrantTokenError("malformed grant token claims") from None
        now = time.time() if now is None else now
        if not isinstance(claims, dict) or not isinstance(claims.get("exp"), (int, float)):
            raise GrantTokenError("grant token has no expiry")
        if claims["exp"] + self._leeway < now:
            raise GrantTokenError(f"grant token expired {now - claims['exp']:.1f} s ago (renew the lease)")
        if claims.get("agent") != agent_id:
            raise GrantTokenError("grant token was issued for another agent")
        return claims
