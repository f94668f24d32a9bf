"""Who is calling: identities and roles, and the access rule that joins them to methods."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

from virtnode.config import AccessConfig, Role

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Caller:
    """The identity behind a connection and the role it maps to."""

    identity: str
    role: Role
    transport: str

    def may(self, access: str) -> bool:
        """Whether this caller may call a method of the given access level."""
        return self.role is Role.ADMIN or access == "read"


def peer_uid(sock: Any) -> int | None:
    """Return the uid of the process at the other end of a unix socket, if known."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)


def unix_caller(uid: int | None, access: AccessConfig) -> Caller:
    """Map a unix socket peer to a caller; an unknown uid only reads."""
    if uid is None:
        return Caller("unix:unknown", Role.READER, "unix")
    role = Role.ADMIN if uid in access.unix_admin_uids else access.unix_role
    return Caller(f"uid:{uid}", role, "unix")


def _address(peer: Any) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "unknown"


def tcp_caller(peer: Any, access: AccessConfig) -> Caller:
    """Map a plain TCP (loopback) peer to a caller."""
    return Caller(f"tcp:{_address(peer)}", access.tcp_role, "tcp")


def certificate_cn(cert: Any) -> str | None:
    """The subject's common name in a certificate as ``SSLSocket.getpeercert()`` gives it."""
    if not isinstance(cert, dict):
        return None
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def tls_caller(cert: Any, peer: Any, access: AccessConfig) -> Caller:
    """Map a TLS client, whose certificate the handshake has verified, to a caller.

    The identity is the certificate's subject CN; a certificate without one is named by
    the peer's address.
    """
    cn = certificate_cn(cert)
    if cn is None:
        return Caller(f"tls:{_address(peer)}", access.tls_role, "tls")
    role = Role.READER if cn in access.tls_reader_cns else access.tls_role
    return Caller(f"cn:{cn}", role, "tls")
