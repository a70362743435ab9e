"""Who is calling: bearer tokens mapped to users, the admin, or agents.

Tokens are kept only as SHA-256 digests, and looked up by digest, so comparing a presented
token leaks nothing through timing about the stored ones.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable

USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")


#: The name of the shared agent token's principal: it may act as any agent id.
ANY_AGENT = "*"

#: Shorter tokens are refused: they could be guessed.
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Principal:
    name: str
    role: str  # "user" | "admin" | "agent"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_act_as_agent(self, agent_id: str) -> bool:
        """An agent's own token binds it to its id; the shared agent token binds it to none."""
        return self.role == "agent" and self.name in (ANY_AGENT, agent_id)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenBook:
    """The broker's credentials: ``{token: Principal}``, stored by digest."""

    def __init__(self, users: dict[str, str] | None = None, admin_token: str | None = None,
                 agent_token: str | None = None, agents: dict[str, str] | None = None):
        self._by_digest: dict[bytes, Principal] = {}
        # Tokens an admin created through the API (stored hashed in the database): looked up
        # by digest when a token is not one of those configured at start.
        self.fallback: Callable[[bytes], Principal | None] | None = None
        for name, token in (users or {}).items():
            self.add(token, Principal(name, "user"))
        if admin_token:
            self.add(admin_token, Principal("admin", "admin"))
        if agent_token:
            self.add(agent_token, Principal(ANY_AGENT, "agent"))
        for agent_id, token in (agents or {}).items():
            self.add(token, Principal(agent_id, "agent"))

    def add(self, token: str, who: Principal) -> None:
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the token for {who.name!r} is too short: use at least {MIN_TOKEN_LENGTH} random characters")
        if who.name != ANY_AGENT and not USER_NAME.match(who.name):
            raise ValueError(f"user name {who.name!r} must be 1-128 letters, digits or . _ @ -")
        self._by_digest[_digest(token)] = who

    def lookup(self, token: str) -> Principal | None:
        digest = _digest(token)
        who = self._by_digest.get(digest)
        if who is None and self.fallback is not None:
            who = self.fallback(digest)
        return who

    def names(self, role: str) -> set[str]:
        """The names configured at start with ``role`` (environment or tokens file)."""
        return {p.name for p in self._by_digest.values() if p.role == role}


def parse_user_tokens(text: str) -> dict[str, str]:
    """``"alice:TOKEN,bob:TOKEN"`` -> ``{"alice": "TOKEN", "bob": "TOKEN"}`` (also for agent ids)."""
    users = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, token = item.partition(":")
        if not sep or not name or not token:
            raise ValueError(f"user token entry {item.split(':')[0]!r}… must look like NAME:TOKEN")
        users[name] = token
    return users
