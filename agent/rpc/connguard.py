"""Who may hold a connection to a listener, and for how long.

Every connection a listener accepts goes through a :class:`GuardedProtocol`, which wraps
aiohttp's request handler:

- a listener holds at most ``max_connections`` connections, and one caller (unix peer uid,
  certificate CN, or peer address) at most ``max_per_caller``; past either, the connection
  is answered 503 and closed at once, so that its descriptor is free again;
- a connection with no request in progress is closed after ``idle_timeout``; once a request
  has begun to arrive, its headers must be complete within ``header_timeout`` (a client
  that sends a header line every few seconds holds a descriptor for no longer);
- a request in progress, a WebSocket included, is the handler's business: the guard is told
  when one starts and ends (:meth:`GuardedProtocol.request_started`, ``request_finished``),
  and knows nothing else of HTTP.

Refused connections and descriptors running out in ``accept()`` are logged through a
:class:`~virtnode.util.burstlog.BurstLog`: one line per period, with a count of what it held back.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtnode import jsonrpc
from virtnode.errors import ResourceExhausted
from virtnode.rpc.identity import certificate_cn, peer_uid
from virtnode.rpc.origins import Site
from virtnode.util.burstlog import BurstLog

log = logging.getLogger(__name__)

#: Descriptors kept for everything but client connections (libvirt, the store, files...).
RESERVED_DESCRIPTORS = 256
#: The fewest connections a listener accepts however few descriptors there are.
MIN_CONNECTIONS = 16


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds one listener's connections live within."""

    max_connections: int
    max_per_caller: int
    header_timeout: float
    idle_timeout: float


def connection_budget(configured: int, listeners: int) -> int:
    """Connections one listener may hold, within the descriptors this process may open.

    Each listener gets an equal share of the soft ``RLIMIT_NOFILE`` less a reserve, and at
    most ``configured``.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    share = (soft - RESERVED_DESCRIPTORS) // max(listeners, 1)
    return min(configured, max(MIN_CONNECTIONS, share))


def raise_descriptor_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit, as servers do; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def caller_key(transport: asyncio.BaseTransport) -> str:
    """The caller a connection counts against: certificate CN, unix uid or peer address."""
    tls = transport.get_extra_info("ssl_object")
    if isinstance(tls, ssl.SSLObject):
        cn = certificate_cn(tls.getpeercert())
        if cn is not None:
            return f"cn:{cn}"
    sockname = transport.get_extra_info("sockname")
    if isinstance(sockname, str | bytes):
        return f"uid:{peer_uid(transport.get_extra_info('socket'))}"
    peer = transport.get_extra_info("peername")
    return f"ip:{peer[0]}" if isinstance(peer, tuple) and peer else "ip:unknown"


class Gate:
    """The connections one listener holds, counted in all and per caller."""

    def __init__(self, name: str, limits: Limits, site: Site) -> None:
        self.name = name
        self.limits = limits
        #: What the listener answers to, for the Host and Origin checks.
        self.site = site
        self.open = 0
        self._by_caller: collections.Counter[str] = collections.Counter()
        self._refusals = BurstLog(log)

    def admit(self, caller: str) -> bool:
        """Count a new connection of ``caller``; False (and logged) if it is one too many."""
        limits = self.limits
        if self.open >= limits.max_connections:
            self._refusals(logging.WARNING, "%s: refusing connections beyond %d",
                           self.name, limits.max_connections)
            return False
        if self._by_caller[caller] >= limits.max_per_caller:
            self._refusals(logging.WARNING, "%s: refusing connections of %s beyond %d",
                           self.name, caller, limits.max_per_caller)
            return False
        self.open += 1
        self._by_caller[caller] += 1
        return True

    def release(self, caller: str) -> None:
        self.open -= 1
        self._by_caller[caller] -= 1
        if not self._by_caller[caller]:
            del self._by_caller[caller]


def _refusal_response() -> bytes:
    error = ResourceExhausted("too many connections; try again later",
                              reason="too_many_connections")
    body = jsonrpc.encode(jsonrpc.error(None, error)).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


_REFUSAL = _refusal_response()

#: The guard of each admitted connection, by the transport aiohttp's requests carry.
Registry = dict[asyncio.BaseTransport, "GuardedProtocol"]


class GuardedProtocol(asyncio.Protocol):
    """Admits a connection through its listener's :class:`Gate` and times it out when idle.

    Everything else is passed to the protocol ``factory`` makes (aiohttp's handler).
    """

    def __init__(self, factory: Callable[[], asyncio.Protocol], gate: Gate,
                 registry: Registry) -> None:
        self._factory = factory
        self._gate = gate
        self._registry = registry
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._caller = ""
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_headers = False
        self._in_request = False
        #: The transport's own flow control: set while its buffer is above its high-water
        #: mark (64 KiB by default), so readers of the buffer's size know when to look.
        self.writing_paused = False
        #: Set once the connection is gone.
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._caller = caller_key(transport)
        if not self._gate.admit(self._caller):
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_REFUSAL)
            transport.close()
            return
        self._registry[transport] = self
        self._inner = self._factory()
        self._inner.connection_made(transport)
        self._arm(self._gate.limits.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self._in_request and not self._waiting_headers:
            self._waiting_headers = True
            self._arm(self._gate.limits.header_timeout)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._disarm()
        inner, self._inner = self._inner, None
        if inner is None:
            return
        self._registry.pop(self._transport, None)  # type: ignore[arg-type]
        self._gate.release(self._caller)
        inner.connection_lost(exc)

    @property
    def gate(self) -> Gate:
        return self._gate

    def request_started(self) -> None:
        """A request's headers are in: no timeout applies until it ends."""
        self._in_request = True
        self._waiting_headers = False
        self._disarm()

    def request_finished(self) -> None:
        """The request ended (its response is written): the connection is idle again."""
        self._in_request = False
        self._waiting_headers = False
        if self._inner is not None:
            self._arm(self._gate.limits.idle_timeout)

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None and not self._in_request:
            self._transport.close()


class AcceptErrors:
    """An event loop exception handler that keeps ``accept()`` failures to a line a minute.

    When descriptors run out, asyncio reports every failed ``accept()`` of a listener,
    many per loop iteration; everything else goes to the handler that was there before.
    """

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]
                 | None = None) -> None:
        self._previous = previous
        self._log = BurstLog(log)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == self.MESSAGE:
            self._log(logging.ERROR, "cannot accept connections: %s", context.get("exception"))
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    @classmethod
    def install(cls, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_exception_handler(cls(loop.get_exception_handler()))
