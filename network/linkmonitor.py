"""Links that come, go and change, and addresses added and removed, as they happen:
an rtnetlink socket bound to the link and address multicast groups, read on the event
loop. :mod:`virtnode.network.linkevents` decides what is worth an event.

No thread: the socket is non-blocking and watched with ``loop.add_reader``; each
datagram is decoded by pyroute2's marshal as it arrives. Only opening the socket blocks
(a named namespace is entered by a forked child that hands the socket back), so
:meth:`LinkMonitor.start` does that in a worker thread.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from pyroute2.netlink import (
    NETLINK_ROUTE,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netns import create_socket

from virtnode.network.linkevents import LinkEvent, LinkTracker
from virtnode.network.rtnlmsg import (
    RTEXT_FILTER_SKIP_STATS,
    LinkInfo,
    Message,
    address_text,
    kernel_error,
    link_info,
)

log = logging.getLogger(__name__)

GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
_RECEIVE_BUFFER = 4 * 1024 * 1024
_RECEIVE_SIZE = 256 * 1024
# Datagrams read per wake-up, so a flood cannot hold the loop; the rest wait.
_MAX_PER_WAKEUP = 64
_IFLA_EXT_MASK = 29
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def dump_request(msg_type: int, seq: int) -> bytes:
    """An RTM_GETLINK or RTM_GETADDR dump request for every family."""
    if msg_type == RTM_GETLINK:
        # ifinfomsg, then IFLA_EXT_MASK: statistics are not watched, skip them.
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
        body += struct.pack("=HHI", 8, _IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
    else:
        body = struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0)  # ifaddrmsg
    header = struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + body


def open_socket(netns: str | None) -> socket.socket:
    """A non-blocking rtnetlink socket in ``netns`` bound to :data:`GROUPS`. Blocks."""
    if netns is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    else:
        try:
            # flags=0: enter the namespace, never create it.
            sock = create_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE,
                                 flags=0)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT,
                                    f"no network namespace named {netns!r}") from None
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RECEIVE_BUFFER)
        except OSError:  # needs CAP_NET_ADMIN; the capped size is still better
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
        sock.bind((0, GROUPS))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class LinkMonitor:
    """Reports the links of one namespace (``netns`` as for
    :class:`~virtnode.network.netlink.NetlinkHost`) as :class:`LinkEvent` records::

        monitor = LinkMonitor()
        await monitor.start()
        async for event in monitor:     # ends after stop(); raises OSError if broken
            ...

    ``start()`` reads every link and address first, so the first event of a link that
    already existed is ``changed``, never ``added``. When the kernel drops messages
    because the reader fell behind (ENOBUFS), the monitor dumps links and addresses again
    and reports the differences as events. Events queue without bound until read.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._marshal = MarshalRtnl()
        self._tracker = LinkTracker()
        self._events: asyncio.Queue[LinkEvent | None] = asyncio.Queue()
        self._error: OSError | None = None
        self._stopped = False
        self._ready: asyncio.Future[None] | None = None
        # The dump in progress: its sequence number and phase, what it read so far,
        # and the broadcasts that arrived meanwhile (applied after it).
        self._port = 0
        self._seq = 0
        self._phase = RTM_GETLINK
        self._syncing = False
        self._sync_again = False
        self._dumped_links: list[LinkInfo] = []
        self._dumped_addresses: dict[int, set[str]] = {}
        self._held: list[Message] = []

    async def start(self, timeout: float = 10.0) -> None:
        """Open the socket and read the current state. Raises OSError (FileNotFoundError
        for a missing namespace) or TimeoutError."""
        if self._sock is not None or self._stopped:
            raise RuntimeError("a LinkMonitor starts once")
        self._loop = asyncio.get_running_loop()
        self._sock = await asyncio.to_thread(open_socket, self.netns)
        self._port = self._sock.getsockname()[0]
        self._ready = self._loop.create_future()
        self._loop.add_reader(self._sock.fileno(), self._readable)
        try:
            self._sync()
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._ready)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop reading and close the socket; iteration ends. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        self._events.put_nowait(None)

    async def __aenter__(self) -> LinkMonitor:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.stop()

    def __aiter__(self) -> LinkMonitor:
        return self

    async def __anext__(self) -> LinkEvent:
        event = await self._events.get()
        if event is None:
            self._events.put_nowait(None)  # so that every later call ends too
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        return event

    # --- reading

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(_MAX_PER_WAKEUP):
            try:
                data = self._sock.recv(_RECEIVE_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    log.warning("link monitor: the kernel dropped messages; reading again")
                    self._sync()
                    continue
                self._fail(exc)
                return
            for msg in self._marshal.parse(data):
                self._handle(msg)
                if self._stopped:
                    return

    def _fail(self, exc: OSError) -> None:
        log.error("link monitor: %s", exc)
        self._error = exc
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(exc)
        self.stop()

    def _emit(self, event: LinkEvent | None) -> None:
        if event is not None:
            self._events.put_nowait(event)

    def _handle(self, msg: Message) -> None:
        header = msg["header"]
        # Dump answers are addressed to this socket's port. Notifications carry the port
        # and sequence number of whoever made the change; this socket makes none.
        if header["pid"] == self._port:
            if self._syncing and header["sequence_number"] == self._seq:
                self._dumped(msg, header)
            # Anything else answers a dump that was given up.
        elif self._syncing:
            self._held.append(msg)
        else:
            self._apply(msg)

    def _apply(self, msg: Message) -> None:
        msg_type = msg["header"]["type"]
        if msg_type in (RTM_NEWLINK, RTM_DELLINK):
            # Bridge port messages (AF_BRIDGE) share the group and say nothing new.
            if msg["family"] != socket.AF_UNSPEC:
                return
            if msg_type == RTM_NEWLINK:
                self._emit(self._tracker.link(link_info(msg)))
            else:
                self._emit(self._tracker.link_removed(int(msg["index"])))
        elif msg_type in (RTM_NEWADDR, RTM_DELADDR):
            text = address_text(msg)
            if text is not None:
                self._emit(self._tracker.address(int(msg["index"]), text,
                                                 present=msg_type == RTM_NEWADDR))

    # --- dumps

    def _sync(self) -> None:
        """Dump links, then addresses; a dump already running starts over when done."""
        if self._syncing:
            self._sync_again = True
            return
        self._syncing, self._sync_again, self._phase = True, False, RTM_GETLINK
        self._dumped_links, self._dumped_addresses = [], {}
        self._request(RTM_GETLINK)

    def _request(self, msg_type: int) -> None:
        assert self._sock is not None
        self._seq = self._seq % 0xFFFFFFFF + 1
        try:
            self._sock.send(dump_request(msg_type, self._seq))
        except OSError as exc:
            self._fail(exc)

    def _dumped(self, msg: Message, header: Mapping[str, Any]) -> None:
        if header["flags"] & NLM_F_DUMP_INTR:
            self._sync_again = True  # links changed while they were dumped
        msg_type = header["type"]
        if msg_type == NLMSG_ERROR and header.get("error") is not None:
            self._fail(kernel_error(header["error"]))
        elif msg_type in (NLMSG_DONE, NLMSG_ERROR):
            self._dump_done()
        elif msg_type == RTM_NEWLINK and msg["family"] == socket.AF_UNSPEC:
            self._dumped_links.append(link_info(msg))
        elif msg_type == RTM_NEWADDR and (text := address_text(msg)) is not None:
            self._dumped_addresses.setdefault(int(msg["index"]), set()).add(text)

    def _dump_done(self) -> None:
        if self._phase == RTM_GETLINK:
            self._phase = RTM_GETADDR
            self._request(RTM_GETADDR)
            return
        addresses = {index: frozenset(found) for index, found in self._dumped_addresses.items()}
        for event in self._tracker.reset(self._dumped_links, addresses):
            self._emit(event)
        held, self._held = self._held, []
        self._syncing = False
        for msg in held:
            self._apply(msg)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        if self._sync_again:
            self._sync()
