"""Consoles: ``VM.openConsole``, ``VM.getConsoleLog``, ``VM.screenshot``, and the sessions
the RPC edge bridges to them.

``VM.openConsole`` hands out a one-time token (:mod:`virtnode.vm.consoletokens`) for one
serial or VNC session of one VM, with the caller's role: an admin's session may type, a
reader's only watches. The RPC edge takes the token when ``GET /console/{token}`` is
upgraded to a WebSocket and attaches the socket here.

Takeover, among the sessions that may type (writers) of one VM and kind:

- ``keep``: join the writers already there; everyone's input reaches the guest.
- ``fail``: refused (FailedPrecondition ``console_in_use``) while another writer is
  attached, both when the token is asked for and when it is used.
- ``disconnect``: the other writers are closed with WebSocket code 4001 (reason names
  who took over) and a ``vm.console`` ``takeover`` event; readers stay.

Watchers (readers' sessions) never displace anyone and are never displaced. The serial
output of every running VM is kept whether anyone watches or not
(:class:`~virtnode.vm.serial.SerialConsole`), so a session starts with the recent past.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from lxml import etree

from virtnode.api_schema.params import (
    VmGetConsoleLogParams,
    VmOpenConsoleParams,
    VmScreenshotParams,
)
from virtnode.config import ConsoleConfig, Role
from virtnode.errors import FailedPrecondition, Internal, ResourceExhausted, Unimplemented
from virtnode.events.bus import EventBus
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor import streams
from virtnode.hypervisor.connection import DomainEvent, Hypervisor
from virtnode.hypervisor.handles import Connection, Domain, Stream
from virtnode.hypervisor.streams import ConsoleStream
from virtnode.util import png
from virtnode.util.jsontypes import JsonObject
from virtnode.util.safexml import parse_xml
from virtnode.vm import ops as vmops
from virtnode.vm.consoletokens import ConsoleGrant, TokenTable
from virtnode.vm.core import VmCore
from virtnode.vm.serial import ConsoleClient, DataFn, EndFn, SerialConsole

log = logging.getLogger(__name__)

TOPIC = "vm.console"
#: WebSocket close codes the console sessions end with, besides the standard ones.
CLOSE_TAKEN_OVER = 4001
CLOSE_IN_USE = 4009
CLOSE_VM_STOPPED = 4010


def console_device(root: etree._Element) -> str | None:
    """The type of the domain's first console (``pty``, ``file``...), None without one."""
    for path in ("devices/console", "devices/serial"):
        element = root.find(path)
        if element is not None:
            return element.get("type", "pty")
    return None


def vnc_index(root: etree._Element) -> int | None:
    """The index among the graphics devices of the first VNC one."""
    for index, element in enumerate(root.iterfind("devices/graphics")):
        if element.get("type") == "vnc":
            return index
    return None


class ConsoleService:
    """The consoles of the VMs: tokens, the serial consoles the agent holds, sessions."""

    def __init__(self, core: VmCore, bus: EventBus, config: ConsoleConfig) -> None:
        self._core = core
        self._hv: Hypervisor = core.hypervisor
        self._bus = bus
        self._config = config
        self.tokens = TokenTable(config.token_lifetime)
        self._serials: dict[str, SerialConsole] = {}
        #: Attached sessions by (vm_id, kind); the serial ones are also their console's.
        self._sessions: dict[tuple[str, str], set[ConsoleClient]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: The last lifecycle step of each VM: the next one waits for it (a stop, then a
        #: start, must happen in that order).
        self._steps: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        """Follow the VMs' lifecycle, and open the running VMs' consoles on each connect."""
        self._hv.add_domain_listener(self._on_domain_event)
        self._hv.add_connect_hook(self._on_connect)

    async def close(self) -> None:
        """Close every session (1001) and let go of every console."""
        for clients in self._sessions.values():
            for client in list(clients):
                client.end(1001, "agent stopping")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for serial in self._serials.values():
            await serial.stop("agent stopping")

    # --- lifecycle ---------------------------------------------------------------------------

    async def _on_connect(self, conn: Connection) -> None:
        del conn
        running = await self._hv.call(
            lambda c: [d.UUIDString() for d in c.listAllDomains(vc.CONNECT_LIST_DOMAINS_ACTIVE)],
            what="listing running VMs for their consoles")
        for vm_id in running:
            self._serial(vm_id).run(fresh=False)
        for vm_id, serial in self._serials.items():
            if vm_id not in running and serial.state != "stopped":
                await self._stopped(vm_id, "the VM is not running")

    def _on_domain_event(self, event: DomainEvent) -> None:
        if event.kind != "lifecycle":
            return
        vm_id = event.vm_id
        if event.event == vc.DOMAIN_EVENT_STARTED:
            self._step(vm_id, self._started(vm_id))
        elif event.event in (vc.DOMAIN_EVENT_STOPPED, vc.DOMAIN_EVENT_UNDEFINED):
            forget = event.event == vc.DOMAIN_EVENT_UNDEFINED
            self._step(vm_id, self._stopped(vm_id, "the VM stopped", forget=forget))

    async def _started(self, vm_id: str) -> None:
        self._serial(vm_id).run(fresh=True)

    def _step(self, vm_id: str, step: Coroutine[Any, Any, None]) -> None:
        previous = self._steps.get(vm_id)

        async def run() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            await step

        task = asyncio.create_task(run(), name=f"console lifecycle {vm_id}")
        self._steps[vm_id] = task
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            if self._steps.get(vm_id) is finished:
                del self._steps[vm_id]
            if not finished.cancelled() and finished.exception() is not None:
                log.error("console step of %s failed", vm_id, exc_info=finished.exception())

        task.add_done_callback(done)

    async def _stopped(self, vm_id: str, reason: str, *, forget: bool = False) -> None:
        self.tokens.drop_vm(vm_id)
        for kind in ("serial", "vnc"):
            for client in list(self._sessions.get((vm_id, kind), ())):
                client.end(CLOSE_VM_STOPPED, reason)
        serial = self._serials.get(vm_id)
        if serial is not None:
            await serial.stop(reason)
            if forget and serial.state == "stopped":
                self._serials.pop(vm_id, None)

    def _serial(self, vm_id: str) -> SerialConsole:
        serial = self._serials.get(vm_id)
        if serial is None:
            async def opener(on_data: DataFn, on_end: EndFn) -> ConsoleStream:
                return await self._open_serial(vm_id, on_data, on_end)

            serial = SerialConsole(vm_id, self._config.log_size, opener)
            serial.clients = self._sessions.setdefault((vm_id, "serial"), set())
            self._serials[vm_id] = serial
        return serial

    async def _open_serial(self, vm_id: str, on_data: DataFn, on_end: EndFn) -> ConsoleStream:
        def run(conn: Connection) -> Stream:
            dom = vmops.lookup(conn, vm_id)
            vmops.require_running(dom, vm_id)
            kind = console_device(parse_xml(dom.XMLDesc(0), what="domain XML"))
            if kind != "pty":
                raise FailedPrecondition(
                    "the VM has no serial console" if kind is None else
                    f"the VM's serial console is a {kind}, not a pty: libvirt cannot "
                    "open it", reason="console_not_pty", object="vm", id=vm_id)
            return streams.open_console(conn, dom)

        stream = await self._hv.call(run, what=f"opening the console of {vm_id}")
        return ConsoleStream(self._hv, stream, on_data, on_end)

    # --- methods -------------------------------------------------------------------------------

    async def open_console(self, params: VmOpenConsoleParams, by: str, role: Role
                           ) -> JsonObject:
        vm_id, kind, takeover = params["vm_id"], params["kind"], params["takeover"]

        def check(dom: Domain) -> None:
            vmops.require_running(dom, vm_id)
            root = parse_xml(dom.XMLDesc(0), what="domain XML")
            if kind == "serial" and console_device(root) != "pty":
                raise FailedPrecondition("the VM has no pty serial console",
                                         reason="console_not_pty", object="vm", id=vm_id)
            if kind == "vnc" and vnc_index(root) is None:
                raise FailedPrecondition("the VM has no VNC graphics", reason="no_graphics",
                                         object="vm", id=vm_id)

        await self._core.on_vm(vm_id, check, what=f"VM.openConsole on {vm_id}")
        if role is Role.ADMIN and takeover == "fail":
            self._refuse_if_in_use(vm_id, kind)
        token, grant = self.tokens.issue(vm_id, kind, takeover, by, role)
        return {"token": token, "url": f"/console/{token}",
                "expires_at": round(grant.expires_at, 3), "mode": grant.mode}

    async def get_console_log(self, params: VmGetConsoleLogParams) -> JsonObject:
        vm_id = params["vm_id"]
        serial = self._serials.get(vm_id)
        if serial is None:
            # Known to libvirt but never seen running by this agent: an empty log.
            await self._core.on_vm(vm_id, lambda dom: dom.UUIDString())
            data, total, state, reason = b"", 0, "stopped", "the VM has not run"
        else:
            data, total = serial.log.snapshot(), serial.log.total
            state, reason = serial.state, serial.reason
        result: JsonObject = {"size": len(data), "total_bytes": total,
                              "capacity": self._config.log_size, "state": state,
                              "reason": reason}
        if params["format"] == "text":
            result["text"] = data.decode("utf-8", errors="replace")
        else:
            result["data"] = base64.b64encode(data).decode()
        return result

    async def screenshot(self, params: VmScreenshotParams) -> JsonObject:
        vm_id = params["vm_id"]

        def run(conn: Connection) -> tuple[str, bytes]:
            dom = vmops.lookup(conn, vm_id)
            vmops.require_running(dom, vm_id)
            return streams.screenshot(conn, dom)

        mime, data = await self._hv.call(run, what=f"VM.screenshot on {vm_id}")
        try:
            if mime == "image/png":
                width, height = png.png_size(data)
            elif mime in ("image/x-portable-pixmap", "image/x-portable-anymap"):
                data, width, height = png.ppm_to_png(data)
            else:
                raise Unimplemented(f"the hypervisor gave a screenshot as {mime}",
                                    reason="unsupported_by_hypervisor")
        except png.ImageError as exc:
            raise Internal(f"the hypervisor's screenshot is broken: {exc}",
                           reason="bad_screenshot") from None
        return {"png": base64.b64encode(data).decode(), "width": width, "height": height}

    # --- sessions, for the RPC edge ----------------------------------------------------------

    def serial_log(self, vm_id: str) -> bytes:
        serial = self._serials.get(vm_id)
        return serial.log.snapshot() if serial is not None else b""

    def serial_state(self, vm_id: str) -> tuple[str, str]:
        serial = self._serials.get(vm_id)
        return (serial.state, serial.reason) if serial is not None else (
            "stopped", "the VM is not running")

    async def type_into(self, vm_id: str, data: bytes) -> bool:
        """Send a writer's input to the serial console; False when it was dropped."""
        serial = self._serials.get(vm_id)
        return await serial.write(data) if serial is not None else False

    async def open_graphics(self, grant: ConsoleGrant) -> socket.socket:
        """A socket to the VM's VNC server, authentication done (the token was it)."""
        vm_id = grant.vm_id

        def run(dom: Domain) -> socket.socket:
            vmops.require_running(dom, vm_id)
            index = vnc_index(parse_xml(dom.XMLDesc(0), what="domain XML"))
            if index is None:
                raise FailedPrecondition("the VM has no VNC graphics", reason="no_graphics",
                                         object="vm", id=vm_id)
            return streams.open_graphics(dom, index)

        return await self._core.on_vm(vm_id, run, what=f"opening the display of {vm_id}")

    @contextlib.asynccontextmanager
    async def session(self, grant: ConsoleGrant, client: ConsoleClient,
                      *, backlog: bool = False) -> AsyncIterator[None]:
        """Attach ``client`` for the ``async with`` block, by the takeover rules.

        With ``backlog`` (serial), the console's recent output is fed to the client first,
        in the same step as it joins: nothing is missed or repeated at the seam. Raises
        FailedPrecondition (``console_in_use``) and ResourceExhausted (``too_many_clients``).
        """
        key = (grant.vm_id, grant.kind)
        clients = self._sessions.setdefault(key, set())
        if len(clients) >= self._config.max_clients:
            raise ResourceExhausted(f"{len(clients)} clients are attached to this console",
                                    reason="too_many_clients")
        if client.writer and grant.takeover == "fail":
            self._refuse_if_in_use(grant.vm_id, grant.kind)
        displaced = []
        if client.writer and grant.takeover == "disconnect":
            displaced = [other for other in clients if other.writer]
            for other in displaced:
                other.end(CLOSE_TAKEN_OVER, f"taken over by {grant.by}")
                clients.discard(other)
        if backlog:
            client.feed(self.serial_log(grant.vm_id))
        clients.add(client)
        for other in displaced:
            self._publish(grant, "disconnect", other.identity, "admin", reason="taken_over")
            self._publish(grant, "takeover", grant.by, grant.role.value,
                          displaced=other.identity)
        self._publish(grant, "connect", grant.by, grant.role.value)
        reason = "closed"
        try:
            yield
        except BaseException:
            reason = "error"
            raise
        finally:
            if client in clients:
                clients.discard(client)
                self._publish(grant, "disconnect", grant.by, grant.role.value, reason=reason)

    def _refuse_if_in_use(self, vm_id: str, kind: str) -> None:
        writers = [c.identity for c in self._sessions.get((vm_id, kind), ()) if c.writer]
        if writers:
            raise FailedPrecondition(
                f"{writers[0]} is attached to the {kind} console and may type; use takeover "
                "keep or disconnect", reason="console_in_use", object="vm", id=vm_id)

    def _publish(self, grant: ConsoleGrant, event: str, caller: str, role: str,
                 **more: str) -> None:
        self._bus.publish(TOPIC, {"vm_id": grant.vm_id, "kind": grant.kind, "event": event,
                                  "caller": caller, "role": role, **more})

