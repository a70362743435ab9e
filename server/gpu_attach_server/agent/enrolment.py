"""The agent's own identity: an Ed25519 key kept in its state directory, registered with the broker.

The broker names this key in every grant for this agent; the agent signs each kernel's nonce
with it (:func:`jupyter_gpu_attach.agent_identity.proof_message`), so a kernel knows the data
port it reached is this agent, not a process that took its address.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jupyter_gpu_attach.agent_identity import proof_message


class AgentKey:
    def __init__(self, key: Ed25519PrivateKey):
        self._key = key

    @classmethod
    def load_or_create(cls, state_dir: Path | None) -> "AgentKey":
        """The key in ``state_dir/agent-ed25519.pem`` (created 0600 on first start); a fresh
        in-memory key where the agent has no state directory."""
        if state_dir is None:
            return cls(Ed25519PrivateKey.generate())
        path = Path(state_dir) / "agent-ed25519.pem"
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} is not an Ed25519 private key; remove it to make a new one")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return cls(key)

    def public_pem(self) -> str:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def prove(self, nonce: str, lease_id: str) -> str:
        return base64.b64encode(self._key.sign(proof_message(nonce, lease_id))).decode()
