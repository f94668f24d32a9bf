"""The hypervisor owner: the only module that imports libvirt.

It registers libvirt's asyncio event loop implementation before the first connection,
runs every blocking libvirt call in a bounded pool of threads with a deadline, notices a
lost connection (close callback, keepalive, failed calls), reconnects with backoff and
publishes ``hypervisor.connection`` events. Callers never see ``libvirtError``: errors are
translated into the API's vocabulary by :func:`translate_error`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import libvirt
import libvirtaio

from virtnode.config import HypervisorConfig
from virtnode.errors import (
    AlreadyExists,
    ApiError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from virtnode.events.bus import EventBus
from virtnode.hypervisor.handles import Connection, Domain
from virtnode.util.aio import DaemonThreadPool

log = logging.getLogger(__name__)

T = TypeVar("T")
ConnectHook = Callable[[Connection], Awaitable[None]]

TOPIC = "hypervisor.connection"

_NOT_FOUND = {
    libvirt.VIR_ERR_NO_DOMAIN: "vm",
    libvirt.VIR_ERR_NO_NETWORK: "network",
    libvirt.VIR_ERR_NO_STORAGE_POOL: "storage_pool",
    libvirt.VIR_ERR_NO_STORAGE_VOL: "volume",
    libvirt.VIR_ERR_NO_INTERFACE: "interface",
    libvirt.VIR_ERR_NO_NODE_DEVICE: "device",
}
_INVALID = {
    libvirt.VIR_ERR_INVALID_ARG,
    libvirt.VIR_ERR_XML_ERROR,
    libvirt.VIR_ERR_XML_DETAIL,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_XML_INVALID_SCHEMA,
    libvirt.VIR_ERR_CPU_INCOMPATIBLE,
}
_PRECONDITION = {libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_OPERATION_FAILED}
_UNSUPPORTED = {
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
}
_DENIED = {libvirt.VIR_ERR_OPERATION_DENIED, libvirt.VIR_ERR_AUTH_FAILED}
# A system error means a lost connection only when it comes from the RPC layer; from a
# driver it is about a file, a device or a process, and the connection is fine.
_CONNECTION_LOST = {libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_RPC}


@dataclass(frozen=True, slots=True)
class DomainEvent:
    """A domain event from libvirt, in plain Python types.

    ``kind`` is ``lifecycle`` (with libvirt's ``event`` and ``detail`` numbers),
    ``device_removed`` or ``device_removal_failed`` (with the device ``alias``),
    ``job_completed`` (with the job's final ``stats``, as ``jobStats`` gives them), or
    ``agent`` (the guest agent's channel: ``event`` is its state, 1 connected or 2
    disconnected, ``detail`` libvirt's reason).
    """

    kind: str
    vm_id: str
    name: str
    event: int = 0
    detail: int = 0
    alias: str = ""
    stats: Mapping[str, Any] = field(default_factory=dict)


DomainListener = Callable[[DomainEvent], None]


class ConnectionState(StrEnum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


def translate_error(code: int, domain: int, message: str) -> ApiError:
    """Map a libvirt error (code, domain, message) to an API error."""
    if code in _NOT_FOUND:
        return NotFound(message, reason="not_found", object=_NOT_FOUND[code])
    if code == libvirt.VIR_ERR_DOM_EXIST:
        return AlreadyExists(message, reason="exists", object="vm")
    if code in _INVALID:
        return InvalidArgument(message, reason="rejected_by_hypervisor")
    if code in _PRECONDITION:
        return FailedPrecondition(message, reason="invalid_state")
    if code in _UNSUPPORTED:
        return Unimplemented(message, reason="unsupported_by_hypervisor")
    if code in _DENIED:
        return PermissionDenied(message, reason="denied_by_hypervisor")
    if code == libvirt.VIR_ERR_INTERNAL_ERROR and "No more available PCI slots" in message:
        return ResourceExhausted(message, reason="no_free_slot")
    if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED):
        return FailedPrecondition(message, reason="guest_agent_unavailable", object="vm")
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return DeadlineExceeded(message, reason="hypervisor_timeout")
    if code in _CONNECTION_LOST or domain == libvirt.VIR_FROM_RPC:
        return Unavailable(message, reason="hypervisor_unreachable")
    return Internal(message, reason="hypervisor_error", libvirt_code=code)


class _LoopThreadEvents:
    """libvirt's event loop hooks, run on the asyncio loop's thread whichever thread calls.

    libvirt adds, changes and removes its handles and timers on the thread that makes a
    call: a driver that queues a domain event during a call in the pool arms the timer
    that delivers it from that pool thread, and the remote driver does the same with the
    events it reads while it waits for its reply. libvirtaio acts on the asyncio loop at
    once, which only the loop's own thread may do: in debug mode asyncio refuses it, and
    the event is never delivered; otherwise the loop's structures are changed under it.

    A hook called on another thread is queued and run on the loop, in the order of the
    calls; the caller never waits for the loop (a pool thread holding a libvirt lock
    would otherwise deadlock with a loop callback that wants it). Handle and timer ids
    are this class's own, so that an add can answer before it has run.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.get_ident()  # made on the loop's thread
        self._impl = libvirtaio.virEventAsyncIOImpl(loop=loop)
        self._ids = itertools.count(1)
        #: This class's ids to libvirtaio's; only the loop's thread reads and writes it.
        self._theirs: dict[int, int] = {}
        self._queue: collections.deque[Callable[[], object]] = collections.deque()

    def register(self) -> None:
        libvirt.virEventRegisterImpl(self._add_handle, self._update_handle,
                                     self._remove_handle, self._add_timeout,
                                     self._update_timeout, self._remove_timeout)

    def _run(self, action: Callable[[], object]) -> None:
        if self._loop.is_closed():
            # The agent's loop has ended (libvirt closes its last handles as the process
            # exits): no handle or timer will ever run again, so there is nothing to do.
            return
        self._queue.append(action)
        if threading.get_ident() == self._thread:
            self._drain()  # after what other threads queued before
            return
        with contextlib.suppress(RuntimeError):  # closed meanwhile: see above
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        while self._queue:
            action = self._queue.popleft()
            if self._loop.is_closed():
                self._queue.clear()
                return
            try:
                action()
            except Exception:
                log.exception("libvirt event loop hook failed")

    def _add_handle(self, fd: int, events: int, cb: Callable[..., None], opaque: Any) -> int:
        ours = next(self._ids)

        def add() -> None:
            self._theirs[ours] = self._impl._add_handle(
                fd, events, lambda _watch, *args: cb(ours, *args), opaque)

        self._run(add)
        return ours

    def _update_handle(self, watch: int, events: int) -> None:
        self._run(lambda: self._impl._update_handle(self._theirs[watch], events))

    def _remove_handle(self, watch: int) -> int:
        self._run(lambda: self._impl._remove_handle(self._theirs.pop(watch)))
        return 0

    def _add_timeout(self, timeout: int, cb: Callable[..., None], opaque: Any) -> int:
        ours = next(self._ids)

        def add() -> None:
            self._theirs[ours] = self._impl._add_timeout(
                timeout, lambda _timer, *args: cb(ours, *args), opaque)

        self._run(add)
        return ours

    def _update_timeout(self, timer: int, timeout: int) -> None:
        self._run(lambda: self._impl._update_timeout(self._theirs[timer], timeout))

    def _remove_timeout(self, timer: int) -> int:
        self._run(lambda: self._impl._remove_timeout(self._theirs.pop(timer)))
        return 0


_event_impl_lock = threading.Lock()
_event_impl_loop: asyncio.AbstractEventLoop | None = None


def _register_event_impl(loop: asyncio.AbstractEventLoop) -> None:
    """Register libvirt's asyncio event implementation once per process.

    libvirt accepts one event implementation per process; a second agent in the same
    process (tests) reuses it, which works only on the same loop.
    """
    global _event_impl_loop  # noqa: PLW0603 - libvirt's registration is process-wide
    with _event_impl_lock:
        if _event_impl_loop is None:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised
            _LoopThreadEvents(loop).register()
            _event_impl_loop = loop
        elif _event_impl_loop is not loop:
            raise RuntimeError("libvirt's event loop is bound to another asyncio loop")


class Hypervisor:
    """Owns the libvirt connection; every libvirt call goes through :meth:`call`."""

    def __init__(self, config: HypervisorConfig, bus: EventBus) -> None:
        self.uri = config.uri
        self._config = config
        self._bus = bus
        self._conn: Connection | None = None
        #: The domain event callbacks registered on ``_conn``, to deregister on closing.
        self._callback_ids: list[int] = []
        self._pool = DaemonThreadPool(config.pool_size, "libvirt")
        self._slots = asyncio.Semaphore(config.pool_size)
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._supervisor: asyncio.Task[None] | None = None
        self._hooks: list[ConnectHook] = []
        self._domain_listeners: list[DomainListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: A second connection for calls that may wait long (see :meth:`call_aside`).
        self._aside: Connection | None = None
        self._aside_lock = threading.Lock()
        self.state = ConnectionState.DISCONNECTED
        self.reason = "not started"

    @property
    def connected(self) -> bool:
        return self.state is ConnectionState.CONNECTED

    def add_connect_hook(self, hook: ConnectHook) -> None:
        """Run ``hook(conn)`` after every (re)connect, e.g. to register event callbacks."""
        self._hooks.append(hook)

    def add_domain_listener(self, listener: DomainListener) -> None:
        """Call ``listener`` on the event loop for every domain event of every connection."""
        self._domain_listeners.append(listener)

    async def start(self) -> None:
        """Register the event implementation, try to connect once, start supervising.

        An unreachable hypervisor does not fail the start: the agent serves and
        reconnects in the background.
        """
        self._loop = asyncio.get_running_loop()
        _register_event_impl(self._loop)
        self._pool.start()
        try:
            await self._connect()
        except ApiError as exc:
            self._set_state(ConnectionState.DISCONNECTED, exc.message)
        self._supervisor = asyncio.create_task(self._supervise(), name="hypervisor-supervisor")

    async def close(self) -> None:
        """Stop reconnecting and close the connection. Safe to call more than once."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        await self._drop("agent stopping")
        self.state = ConnectionState.CLOSED
        self._pool.shutdown(wait=False)

    async def call(self, fn: Callable[[Connection], T], *, timeout: float | None = None,
                   what: str = "libvirt call") -> T:
        """Run ``fn(conn)`` in the libvirt thread pool and return its result.

        Raises :class:`Unavailable` while disconnected, :class:`DeadlineExceeded` when the
        call (including waiting for a free thread) takes longer than ``timeout`` seconds,
        and the translation of any ``libvirtError``.
        """
        conn = self._conn
        if conn is None:
            raise Unavailable(f"hypervisor {self.uri} is not connected: {self.reason}",
                              reason="hypervisor_disconnected")
        try:
            return await self._in_thread(lambda: fn(conn), timeout, what)
        except libvirt.libvirtError as exc:
            error = translate_error(exc.get_error_code(), exc.get_error_domain(), str(exc))
            if isinstance(error, Unavailable):
                self._mark_lost(conn, error.message)
            raise error from None

    async def call_aside(self, fn: Callable[[Connection], T], *, timeout: float | None = None,
                         what: str = "libvirt call") -> T:
        """Like :meth:`call`, on a second connection of the agent's own, opened when first
        needed: for calls that may wait long on something outside libvirt (a guest agent
        that does not answer). Measured on libvirt 9.0: while such a call waits, other
        calls on its connection can wait with it, those on another connection do not.
        """
        if self._conn is None:
            raise Unavailable(f"hypervisor {self.uri} is not connected: {self.reason}",
                              reason="hypervisor_disconnected")

        def run() -> T:
            with self._aside_lock:
                conn = self._aside
                if conn is None:
                    conn = self._aside = libvirt.open(self.uri)
            return fn(conn)

        try:
            return await self._in_thread(run, timeout, what)
        except libvirt.libvirtError as exc:
            error = translate_error(exc.get_error_code(), exc.get_error_domain(), str(exc))
            if isinstance(error, Unavailable):
                await self._in_thread(self._close_aside, self._config.call_timeout,
                                      "closing the second connection")
            raise error from None

    def _close_aside(self) -> None:
        with self._aside_lock:
            conn, self._aside = self._aside, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    async def call_long(self, fn: Callable[[Connection], T], *, what: str) -> T:
        """Run ``fn(conn)`` on a thread of its own, with no deadline, and return its result.

        For an operation that lasts as long as it must (a migration) and that other calls
        watch and stop (job statistics, abort): it takes no slot of the pool, so they can
        run meanwhile. The thread is a daemon: a stuck operation does not keep the agent
        from exiting. Errors are translated as :meth:`call`'s are.
        """
        conn = self._conn
        if conn is None:
            raise Unavailable(f"hypervisor {self.uri} is not connected: {self.reason}",
                              reason="hypervisor_disconnected")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def work() -> None:
            try:
                result = fn(conn)
            except BaseException as exc:  # handed to the loop, raised there
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        threading.Thread(target=work, name=f"libvirt: {what}", daemon=True).start()
        try:
            return await asyncio.shield(future)
        except libvirt.libvirtError as exc:
            error = translate_error(exc.get_error_code(), exc.get_error_domain(), str(exc))
            if isinstance(error, Unavailable):
                self._mark_lost(conn, error.message)
            raise error from None

    async def _in_thread(self, fn: Callable[[], T], timeout: float | None, what: str) -> T:
        deadline = timeout if timeout is not None else self._config.call_timeout
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(deadline):
                await self._slots.acquire()
                future = loop.run_in_executor(self._pool, fn)
                future.add_done_callback(self._release_slot)
                return await asyncio.shield(future)
        except TimeoutError:
            raise DeadlineExceeded(f"{what} did not finish within {deadline:g}s",
                                   reason="hypervisor_call_timeout") from None

    def _release_slot(self, future: asyncio.Future[Any]) -> None:
        self._slots.release()
        if not future.cancelled():
            future.exception()  # a failure after the deadline has nobody left to tell

    async def _connect(self) -> None:
        conn, self._callback_ids = await self._in_thread(self._open, None,
                                                         f"connecting to {self.uri}")
        self._conn = conn
        self._lost.clear()
        try:
            for hook in self._hooks:
                await hook(conn)
        except Exception as exc:
            # A connection whose callbacks are not in place would miss events: retry it.
            if isinstance(exc, ApiError):
                log.warning("setting up the connection to %s failed: %s", self.uri, exc)
            else:
                log.exception("setting up the connection to %s failed", self.uri)
            await self._drop("connection set-up failed")
            raise Unavailable(f"setting up the connection failed: {exc}",
                              reason="hypervisor_setup_failed") from None
        self._set_state(ConnectionState.CONNECTED, "connected")

    def _open(self) -> tuple[Connection, list[int]]:
        try:
            conn: Connection = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise Unavailable(f"cannot connect to {self.uri}: {exc}",
                              reason="hypervisor_unreachable") from None
        try:
            conn.registerCloseCallback(self._on_close, None)
        except libvirt.libvirtError:
            log.debug("%s has no close callback; relying on failed calls", self.uri)
        try:
            conn.setKeepAlive(self._config.keepalive_interval, self._config.keepalive_count)
        except libvirt.libvirtError:
            log.debug("%s has no keepalive", self.uri)
        return conn, self._register_domain_events(conn)

    def _register_domain_events(self, conn: Connection) -> list[int]:
        callbacks = (
            (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
            (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device_removed),
            (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, self._on_removal_failed),
            (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed),
            (libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, self._on_agent),
        )
        ids = []
        for event_id, callback in callbacks:
            try:
                ids.append(conn.domainEventRegisterAny(None, event_id, callback, None))
            except libvirt.libvirtError as exc:
                log.debug("%s: no domain event %d: %s", self.uri, event_id, exc)
        return ids

    def _on_lifecycle(self, _conn: Connection, dom: Domain, event: int, detail: int,
                      _opaque: Any) -> None:
        self._deliver(DomainEvent("lifecycle", dom.UUIDString(), dom.name(), event, detail))

    def _on_device_removed(self, _conn: Connection, dom: Domain, alias: str,
                           _opaque: Any) -> None:
        self._deliver(DomainEvent("device_removed", dom.UUIDString(), dom.name(), alias=alias))

    def _on_removal_failed(self, _conn: Connection, dom: Domain, alias: str,
                           _opaque: Any) -> None:
        self._deliver(DomainEvent("device_removal_failed", dom.UUIDString(), dom.name(),
                                  alias=alias))

    def _on_job_completed(self, _conn: Connection, dom: Domain, stats: dict[str, Any],
                          _opaque: Any) -> None:
        self._deliver(DomainEvent("job_completed", dom.UUIDString(), dom.name(),
                                  stats=dict(stats)))

    def _on_agent(self, _conn: Connection, dom: Domain, state: int, reason: int,
                  _opaque: Any) -> None:
        self._deliver(DomainEvent("agent", dom.UUIDString(), dom.name(), state, reason))

    def _deliver(self, event: DomainEvent) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, event)

    def _dispatch(self, event: DomainEvent) -> None:
        for listener in self._domain_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("domain event listener failed on %s", event)

    def _on_close(self, conn: Connection, reason: int, _opaque: Any) -> None:
        why = {
            libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "connection error",
            libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "connection closed by libvirtd",
            libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
            libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by client",
        }.get(reason, f"closed ({reason})")
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._mark_lost, conn, why)

    def _mark_lost(self, conn: Connection, reason: str) -> None:
        if conn is self._conn and not self._lost.is_set():
            log.warning("hypervisor connection to %s lost: %s", self.uri, reason)
            self._lost_reason = reason
            self._lost.set()

    async def _drop(self, reason: str) -> None:
        conn, self._conn = self._conn, None
        callback_ids, self._callback_ids = self._callback_ids, []
        if conn is None:
            return
        self._set_state(ConnectionState.DISCONNECTED, reason)

        def close() -> None:
            # Each registered callback holds the connection: without deregistering them,
            # close() only drops a reference, and the connection stays open, its events
            # still delivered to this hypervisor's listeners next to the new one's.
            for callback_id in callback_ids:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(callback_id)
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            self._close_aside()

        try:
            await self._in_thread(close, self._config.call_timeout, "closing the connection")
        except DeadlineExceeded:
            log.warning("closing the connection to %s timed out; abandoned", self.uri)

    async def _supervise(self) -> None:
        delay = self._config.reconnect_min
        while True:
            if self._conn is not None:
                await self._lost.wait()
                await self._drop(self._lost_reason)
                delay = self._config.reconnect_min
            try:
                await self._connect()
            except ApiError as exc:
                self._set_state(ConnectionState.DISCONNECTED, exc.message)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._config.reconnect_max)

    def _set_state(self, state: ConnectionState, reason: str) -> None:
        changed = state is not self.state
        self.state, self.reason = state, reason
        if changed:
            log.info("hypervisor %s: %s (%s)", self.uri, state.value, reason)
            self._bus.publish(TOPIC, {"uri": self.uri, "state": state.value, "reason": reason})
