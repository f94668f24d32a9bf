"""Browsers are hostile neighbours: the ``Host`` and ``Origin`` checks of every listener.

A web page from another site can make the browser of a person on this host send requests
to the agent's loopback listener (cross-site request forgery), or resolve its own name to
the agent's address (DNS rebinding). So:

- ``Host`` must name the listener: ``localhost``, this host's names, the listen address, a
  name from ``server.allowed_hosts``, or any IP literal (rebinding needs a name: a page that
  reaches the agent by IP address has that address as its origin, and fails the next check);
- ``Origin``, when a client sends one (browsers do; curl, scripts, the CLI and other agents
  do not), must be the listener's own: same scheme, an accepted host, the listener's port.
  ``Origin: null`` (sandboxed frames, ``file:`` pages) is never the listener's own.

Unix sockets are out of a browser's reach; their Host header is whatever the client wrote,
so only the Origin check applies there (with any port).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from virtnode.config import Listener


@dataclass(frozen=True, slots=True)
class Site:
    """What one listener answers to."""

    scheme: str  # http or https; "" for a unix socket
    port: int  # 0 for a unix socket
    names: frozenset[str]

    @classmethod
    def of(cls, listener: Listener, extra: tuple[str, ...] = ()) -> Site:
        names = {"localhost", *(name.lower().rstrip(".") for name in extra)}
        names.update(_host_names())
        if listener.kind == "unix":
            return cls("", 0, frozenset(names))
        names.add(listener.host.lower())
        return cls("https" if listener.kind == "tls" else "http", listener.port,
                   frozenset(names))

    def accepts_name(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.names or _is_ip(host)


def _host_names() -> set[str]:
    names = {socket.gethostname().lower()}
    with contextlib.suppress(OSError):  # resolver trouble: the plain host name stays
        names.add(socket.getfqdn().lower())
    return {name for name in names if name}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]").split("%")[0])
    except ValueError:
        return False
    return True


def host_refusal(site: Site, host: str | None) -> str | None:
    """Why a request with this ``Host`` header is refused; None when it is accepted."""
    if not site.scheme:
        return None
    if not host:
        return "a request must name the host it is for (Host header)"
    try:
        hostname = urlsplit(f"//{host}").hostname
    except ValueError:
        hostname = None
    if not hostname or not site.accepts_name(hostname):
        return f"this agent does not answer to the host name {host!r}"
    return None


def origin_refusal(site: Site, origin: str | None) -> str | None:
    """Why a request with this ``Origin`` header is refused; None when it is accepted."""
    if origin is None:
        return None
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return f"the origin {origin!r} is not a URL"
    if origin == "null" or not parts.hostname:
        return f"requests from the origin {origin!r} are not accepted"
    if not site.accepts_name(parts.hostname):
        return f"requests from the origin {origin!r} are not accepted (another site)"
    if site.scheme:
        default = 443 if parts.scheme == "https" else 80
        if parts.scheme != site.scheme or (port or default) != site.port:
            return f"requests from the origin {origin!r} are not accepted (another site)"
    elif parts.scheme not in ("http", "https"):
        return f"requests from the origin {origin!r} are not accepted"
    return None
