"""Links that come, go and change, and addresses added and removed, as they happen:
an rtnetlink socket bound to the link and address multicast groups, read on the event
loop. :mod:`virtnode.network.kernel.linkevents` decides what is worth an event.

The multicast socket is non-blocking and watched with ``loop.add_reader``; each
datagram is decoded (:mod:`virtnode.network.kernel.rtnlwire`) as it arrives, so no thread reads
it. Two things block and run in a worker thread instead: opening a socket (a named
namespace is entered by that thread for the moment it takes), and dumping every link and
address, at start and after the kernel dropped messages. A dump waits for the kernel's
RTNL lock, which someone else may hold for seconds (a namespace with many links being
torn down), so it gets a socket of its own, opened, read and closed in that thread.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
from types import TracebackType

from virtnode.network.kernel.linkevents import LinkEvent, LinkTracker
from virtnode.network.kernel.rtnlmsg import LinkInfo
from virtnode.network.kernel.rtnlwire import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    decode_address,
    decode_link,
    open_socket,
    read_addresses,
    read_links,
    split,
)

log = logging.getLogger(__name__)

# RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
GROUPS = 0x1 | 0x10 | 0x100
RECEIVE_BUFFER = 4 * 1024 * 1024
#: How long a dump may wait for the kernel before the monitor gives up.
DUMP_TIMEOUT = 30.0
_RECEIVE_SIZE = 256 * 1024
# Datagrams read per wake-up, so a flood cannot hold the loop; the rest wait.
_MAX_PER_WAKEUP = 64

Snapshot = tuple[list[LinkInfo], dict[int, frozenset[str]]]
Message = tuple[int, bytes]  # type, body


def read_snapshot(netns: str | None) -> Snapshot:
    """Every link and the addresses of each (by ifindex), on a socket of its own.
    Blocks; raises OSError."""
    sequence = itertools.count(1)
    with open_socket(netns) as sock:
        sock.settimeout(DUMP_TIMEOUT)
        links = read_links(sock, sequence.__next__)
        addresses: dict[int, set[str]] = {}
        for info in read_addresses(sock, sequence.__next__):
            addresses.setdefault(info.index, set()).add(info.address)
    return links, {index: frozenset(found) for index, found in addresses.items()}


class LinkMonitor:
    """Reports the links of one namespace (``netns`` as for
    :class:`~virtnode.network.kernel.netlink.NetlinkHost`) as :class:`LinkEvent` records::

        monitor = LinkMonitor()
        await monitor.start()
        async for event in monitor:     # ends after stop(); raises OSError if broken
            ...

    ``start()`` reads every link and address first, so the first event of a link that
    already existed is ``changed``, never ``added``. When the kernel drops messages
    because the reader fell behind (ENOBUFS), the monitor reads every link and address
    again and reports the differences as events (:attr:`overflows` counts those times).
    ``receive_buffer`` is the multicast socket's buffer in bytes. Events queue without
    bound until read.
    """

    def __init__(self, netns: str | None = None, *,
                 receive_buffer: int = RECEIVE_BUFFER) -> None:
        self.netns = netns
        self.receive_buffer = receive_buffer
        #: How many times the kernel dropped messages for this monitor.
        self.overflows = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tracker = LinkTracker()
        self._events: asyncio.Queue[LinkEvent | None] = asyncio.Queue()
        self._error: OSError | None = None
        self._stopped = False
        # While a snapshot is read, notifications wait here, to be applied after it.
        self._sync_task: asyncio.Task[None] | None = None
        self._sync_again = False
        self._held: list[Message] = []

    async def start(self) -> None:
        """Open the socket and read the current state. Raises OSError (FileNotFoundError
        for a missing namespace)."""
        if self._sock is not None or self._stopped:
            raise RuntimeError("a LinkMonitor starts once")
        self._loop = asyncio.get_running_loop()
        self._sock = await asyncio.to_thread(open_socket, self.netns, GROUPS,
                                             self.receive_buffer)
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._readable)
        self._sync()
        assert self._sync_task is not None
        try:
            await asyncio.shield(self._sync_task)
        except BaseException:
            self.stop()
            raise
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop reading and close the socket; iteration ends. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        # A failed snapshot stops the monitor from its own task: that one ends by itself.
        if self._sync_task is not None and self._sync_task is not asyncio.current_task():
            self._sync_task.cancel()
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
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

    # --- notifications

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(_MAX_PER_WAKEUP):
            try:
                data = self._sock.recv(_RECEIVE_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    log.warning("link monitor: the kernel dropped messages; reading again")
                    self._sync()
                    continue
                self._fail(exc)
                return
            try:
                for kind, _flags, _seq, body in split(data):
                    if self._sync_task is not None:
                        self._held.append((kind, body))
                    else:
                        self._apply((kind, body))
            except OSError as exc:  # a message that does not decode
                self._fail(exc)
                return

    def _fail(self, exc: OSError) -> None:
        log.error("link monitor: %s", exc)
        self._error = exc
        self.stop()

    def _emit(self, event: LinkEvent | None) -> None:
        if event is not None:
            self._events.put_nowait(event)

    def _apply(self, msg: Message) -> None:
        msg_type, body = msg
        if msg_type in (RTM_NEWLINK, RTM_DELLINK):
            # Bridge port messages (AF_BRIDGE) share the group and say nothing new.
            if not body or body[0] != socket.AF_UNSPEC:
                return
            info = decode_link(body)
            if msg_type == RTM_NEWLINK:
                self._emit(self._tracker.link(info))
            else:
                self._emit(self._tracker.link_removed(info.index))
        elif msg_type in (RTM_NEWADDR, RTM_DELADDR):
            address = decode_address(body)
            if address is not None:
                self._emit(self._tracker.address(address.index, address.address,
                                                 present=msg_type == RTM_NEWADDR))

    # --- snapshots

    def _sync(self) -> None:
        """Read a snapshot; one being read already is read again once it is done."""
        if self._sync_task is not None:
            self._sync_again = True
            return
        assert self._loop is not None
        self._sync_task = self._loop.create_task(self._read_snapshots(),
                                                 name=f"link monitor snapshot {self.netns}")

    async def _read_snapshots(self) -> None:
        try:
            again = True
            while again:
                self._sync_again = False
                links, addresses = await asyncio.to_thread(read_snapshot, self.netns)
                for event in self._tracker.reset(links, addresses):
                    self._emit(event)
                # Notifications sent while the snapshot was read: the ones it already
                # shows change nothing, the later ones apply on top.
                held, self._held = self._held, []
                for msg in held:
                    self._apply(msg)
                again = self._sync_again
        except OSError as exc:
            self._fail(exc)
        finally:
            self._sync_task = None
