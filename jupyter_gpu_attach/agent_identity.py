"""The kernel checks that the data port it reached is the agent its grant names.

The broker puts the granted agent's Ed25519 public key in the grant (``lease["agent"]
["public_key"]``), over the kernel's authenticated connection to the broker. The kernel's hello
carries a fresh nonce; the agent answers ``admitted`` with a signature over the nonce and the
lease id. A process that merely listens on the agent's address cannot sign, so the kernel
refuses it before it reads, let alone unpickles, anything else from it.
"""

from __future__ import annotations

import base64
import secrets

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import CellRejected

_CONTEXT = b"gpu-attach agent proof v1\0"
_keys: dict[str, Ed25519PublicKey] = {}


def proof_message(nonce: str, lease_id: str) -> bytes:
    """What the agent signs: a fixed context, the kernel's nonce and the lease (no replay elsewhere)."""
    return _CONTEXT + nonce.encode() + b"\0" + lease_id.encode()


def new_nonce() -> str:
    return secrets.token_hex(16)


def hello_fields(lease: dict) -> dict:
    """Fields to add to the hello frame: a challenge when the grant names the agent's key."""
    return {"nonce": new_nonce()} if lease.get("agent", {}).get("public_key") else {}


def check_admitted(lease: dict, hello: dict, admitted: dict) -> None:
    """Raise :class:`CellRejected` unless ``admitted`` proves the granted agent's key."""
    pem = lease.get("agent", {}).get("public_key")
    if not pem:
        return  # a broker that names no key (older): nothing to check against
    where = f"the process at {lease['agent'].get('address')}"
    key = _keys.get(pem)
    if key is None:
        loaded = serialization.load_pem_public_key(pem.encode())
        if not isinstance(loaded, Ed25519PublicKey):
            raise CellRejected("the grant names an agent key that is not Ed25519; ask the site admin")
        key = _keys[pem] = loaded
    proof = admitted.get("proof")
    if not isinstance(proof, str) or len(proof) > 200:
        raise CellRejected(f"{where} did not prove it is agent {lease['agent'].get('id')!r}: nothing was sent to it. "
                           "Another process may be listening on the agent's address; tell the site admin.")
    try:
        key.verify(base64.b64decode(proof), proof_message(hello["nonce"], lease["id"]))
    except (InvalidSignature, ValueError):
        raise CellRejected(f"{where} failed to prove it is agent {lease['agent'].get('id')!r} (bad signature): "
                           "nothing was sent to it. Tell the site admin.") from None
