"""One-time console tokens: what ``VM.openConsole`` hands out and ``GET /console/{token}``
takes.

A token is 32 random bytes (``secrets``), URL-safe. It grants one connection to one kind of
console of one VM, with the role of the caller who asked for it, and only within its
lifetime. The table keeps a hash of each token, never the token: a dump of the agent's
memory or a log line does not hand out consoles. A token is gone once taken; an expired
one is remembered for one more lifetime so its user learns it expired rather than that it
never was.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from virtnode.config import Role
from virtnode.errors import PermissionDenied, ResourceExhausted

#: What a token looks like: ``secrets.token_urlsafe(32)``. Anything else is refused unread.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True, slots=True)
class ConsoleGrant:
    """What one token allows."""

    vm_id: str
    kind: str  # serial | vnc
    takeover: str  # keep | fail | disconnect
    by: str  # the identity of the caller who asked for it
    role: Role
    expires_at: float  # wall clock, seconds since the epoch

    @property
    def writer(self) -> bool:
        """Whether the session may type (admins) or only watch (readers)."""
        return self.role is Role.ADMIN

    @property
    def mode(self) -> str:
        return "read-write" if self.writer else "read-only"


def _key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """The tokens handed out and not yet used, by hash."""

    def __init__(self, lifetime: float, limit: int = 4096,
                 clock: Callable[[], float] = time.time) -> None:
        self._lifetime = lifetime
        self._limit = limit
        self._clock = clock
        self._grants: dict[bytes, ConsoleGrant] = {}

    def __len__(self) -> int:
        return len(self._grants)

    def issue(self, vm_id: str, kind: str, takeover: str, by: str,
              role: Role) -> tuple[str, ConsoleGrant]:
        """A new token and its grant; raises ResourceExhausted when too many wait."""
        self._purge()
        if len(self._grants) >= self._limit:
            raise ResourceExhausted(f"{self._limit} console tokens wait to be used; try later",
                                    reason="too_many_tokens")
        token = secrets.token_urlsafe(32)
        grant = ConsoleGrant(vm_id, kind, takeover, by, role, self._clock() + self._lifetime)
        self._grants[_key(token)] = grant
        return token, grant

    def peek(self, token: str, vm_id: str | None = None, kind: str | None = None
             ) -> ConsoleGrant:
        """The grant of a token that may be used now, leaving it usable.

        Raises PermissionDenied: ``token_unknown`` (never issued, or used already),
        ``token_expired``, ``token_mismatch`` (the client expected another VM or kind).
        """
        if not TOKEN_PATTERN.fullmatch(token):
            raise PermissionDenied("unknown or used console token", reason="token_unknown")
        grant = self._grants.get(_key(token))
        if grant is None:
            raise PermissionDenied("unknown or used console token", reason="token_unknown")
        if self._clock() >= grant.expires_at:
            raise PermissionDenied("the console token has expired; ask for another",
                                   reason="token_expired")
        if (vm_id is not None and vm_id != grant.vm_id) or (
                kind is not None and kind != grant.kind):
            raise PermissionDenied("the console token is for another VM or console",
                                   reason="token_mismatch")
        return grant

    def take(self, token: str, vm_id: str | None = None, kind: str | None = None
             ) -> ConsoleGrant:
        """Use a token: its grant, the token gone. Raises as :meth:`peek`; a token that
        is refused for naming another VM or kind is gone too (it was shown to the wrong
        place)."""
        try:
            return self.peek(token, vm_id, kind)
        finally:
            if TOKEN_PATTERN.fullmatch(token):
                key = _key(token)
                grant = self._grants.get(key)
                if grant is not None and self._clock() < grant.expires_at:
                    del self._grants[key]

    def drop_vm(self, vm_id: str) -> None:
        """Forget the tokens of a VM (it stopped: they were for the instance that ran)."""
        for key in [k for k, g in self._grants.items() if g.vm_id == vm_id]:
            del self._grants[key]

    def _purge(self) -> None:
        forget = self._clock() - self._lifetime
        for key in [k for k, g in self._grants.items() if g.expires_at <= forget]:
            del self._grants[key]
