"""The guest agent of each running VM: whether it is there, what it reports, and freezes.

A VM created from a spec has a virtio-serial channel for qemu-guest-agent unless its spec
says ``guest_agent: false``. libvirt follows the channel and sends an agent lifecycle
event when the guest agent connects or goes away; this module keeps, per running VM:

- ``agent``: ``connected``, ``disconnected`` (a channel, nobody listening yet) or
  ``none`` (no channel);
- what the guest agent last reported (OS, hostname, timezone, users, filesystems with
  usage, interfaces with addresses), fetched when it connects, when the VM resumes,
  and then every ``guest_agent.refresh_interval`` seconds while it stays connected —
  never in a tight loop — with the time it was fetched, so readers see its age;
- a freeze, if one is in force, and when it ends.

Every guest agent command has a deadline (``guest_agent.timeout``, given to libvirt
with ``virDomainAgentSetResponseTimeout`` before each command), runs on the hypervisor's
second connection (while a command waits for a guest agent, libvirt answers other calls
on its connection late), and at most :data:`CONCURRENT` of them run at once in the
hypervisor's pool, so a guest agent that never answers holds one thread for a few
seconds and delays nothing else: other VMs' calls, and other calls on the same VM, go
on.

A freeze (``VM.freeze``) always ends: the agent thaws it after its ``timeout`` unless
``VM.thaw`` came first. So that a freeze also ends when the agent itself stops or
crashes meanwhile, the deadline is written into the running domain's live metadata
(its own namespace, gone when the VM stops) before the guest is frozen, and at every
connection to libvirt the agent thaws each VM that carries one.

Changes are published as ``vm.guest`` events: ``connected``, ``disconnected``, ``info``
(what the guest reported changed), ``frozen`` and ``thawed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lxml import etree

from virtnode.config import GuestAgentConfig
from virtnode.errors import ApiError, FailedPrecondition, InvalidArgument, NotFound
from virtnode.events.bus import EventBus
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.connection import DomainEvent, Hypervisor
from virtnode.hypervisor.handles import Connection, Domain
from virtnode.util.jsontypes import JsonObject
from virtnode.vm import ops as vmops
from virtnode.vm.spec import GUEST_AGENT_CHANNEL

log = logging.getLogger(__name__)

T = TypeVar("T")

TOPIC = "vm.guest"
#: Guest agent commands in flight at once, over all VMs.
CONCURRENT = 2
#: Seconds the pool call may take beyond libvirt's own agent deadline.
GRACE = 5.0
#: Where a freeze's deadline is kept in the domain's live metadata.
FREEZE_NAMESPACE = "https://virtnode.dev/xmlns/freeze/1"
FREEZE_PREFIX = "virtnodefreeze"
#: The longest freeze a caller may ask for, seconds.
MAX_FREEZE = 600

_CONNECTED = vc.CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
_DISCONNECTED = vc.CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED


@dataclass
class _Guest:
    """What the agent knows of one running VM's guest agent."""

    vm_id: str
    name: str
    agent: str = "none"  # connected | disconnected | none
    info: JsonObject = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    fetched_at: float | None = None  # wall clock
    fetched_mono: float | None = None
    refresher: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    frozen_until: float | None = None  # wall clock
    thaw_timer: asyncio.TimerHandle | None = None


class GuestAgents:
    """The guest agents of the running VMs (see the module's documentation)."""

    def __init__(self, hypervisor: Hypervisor, bus: EventBus, config: GuestAgentConfig
                 ) -> None:
        self._hv = hypervisor
        self._bus = bus
        self._config = config
        self._guests: dict[str, _Guest] = {}
        self._slots = asyncio.Semaphore(CONCURRENT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        self._hv.add_domain_listener(self._on_event)
        self._hv.add_connect_hook(self._on_connect)

    async def close(self) -> None:
        self._closed = True
        for guest in self._guests.values():
            self._stop_refresh(guest)
            if guest.thaw_timer is not None:
                guest.thaw_timer.cancel()  # the live metadata thaws it at the next start
        tasks = [*self._tasks, *(g.refresher for g in self._guests.values() if g.refresher)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- reading ---------------------------------------------------------------------------

    def section(self, vm_id: str) -> JsonObject:
        """The ``guest`` section of ``VM.getInfo``."""
        guest = self._guests.get(vm_id)
        if guest is None:
            return {"agent": "none", "fetched_at": None, "age_seconds": None, "frozen": False}
        age = (None if guest.fetched_mono is None
               else round(time.monotonic() - guest.fetched_mono, 3))
        section: JsonObject = {
            "agent": guest.agent,
            "fetched_at": None if guest.fetched_at is None else round(guest.fetched_at, 3),
            "age_seconds": age,
            "frozen": guest.frozen_until is not None,
            **guest.info,
        }
        if guest.frozen_until is not None:
            section["thaw_at"] = round(guest.frozen_until, 3)
        if guest.errors:
            section["errors"] = dict(guest.errors)
        return section

    def connected(self, vm_id: str) -> bool:
        guest = self._guests.get(vm_id)
        return guest is not None and guest.agent == "connected"

    def require_connected(self, vm_id: str, what: str) -> None:
        """Raise FailedPrecondition ``guest_agent_unavailable`` unless the VM's guest agent
        is connected."""
        guest = self._guests.get(vm_id)
        if guest is not None and guest.agent == "connected":
            return
        why = ("the VM has no guest agent channel (spec guest_agent: false, or a VM "
               "defined without one)" if guest is None or guest.agent == "none"
               else "the guest agent is not connected (not installed or not running in "
                    "the guest, or the guest is still booting)")
        raise FailedPrecondition(f"{what} needs the guest agent: {why}",
                                 reason="guest_agent_unavailable", object="vm", id=vm_id)

    # --- guest agent commands --------------------------------------------------------------

    async def command(self, vm_id: str, fn: Callable[[Domain], T], what: str) -> T:
        """Run ``fn(domain)``, a guest agent command, with the agent's deadline and within
        the concurrency limit. Raises FailedPrecondition ``guest_agent_unavailable`` when
        the guest agent does not answer in time."""
        timeout = self._config.timeout

        def run(conn: Connection) -> T:
            dom = vmops.lookup(conn, vm_id)
            dom.agentSetResponseTimeout(max(1, round(timeout)), 0)
            return fn(dom)

        async with self._slots:
            try:
                return await self._hv.call_aside(run, timeout=timeout + GRACE,
                                                 what=f"{what} on {vm_id}")
            except NotFound as exc:
                if exc.id is None:
                    raise NotFound(exc.message, reason="not_found", object="vm",
                                   id=vm_id) from None
                raise

    # --- freezing --------------------------------------------------------------------------

    async def freeze(self, vm_id: str, mountpoints: list[str], timeout: float) -> JsonObject:
        """Freeze the guest's filesystems (all, or ``mountpoints``) for at most ``timeout``
        seconds."""
        if not 1 <= timeout <= MAX_FREEZE:
            raise InvalidArgument(f"timeout must be 1 to {MAX_FREEZE} seconds",
                                  reason="invalid_timeout", field="timeout")
        self.require_connected(vm_id, "VM.freeze")
        guest = self._guests[vm_id]
        if guest.frozen_until is not None:
            raise FailedPrecondition("the guest is frozen already; VM.thaw it first",
                                     reason="already_frozen", object="vm", id=vm_id)
        until = time.time() + timeout
        await self._hv.call(lambda conn: _set_freeze(vmops.lookup(conn, vm_id), until),
                            what=f"recording the freeze of {vm_id}")
        try:
            count = await self.command(
                vm_id, lambda dom: dom.fsFreeze(mountpoints or None, 0), "freezing the guest")
        except BaseException:
            with contextlib.suppress(ApiError):
                await self._hv.call(lambda conn: _set_freeze(vmops.lookup(conn, vm_id), None),
                                    what=f"clearing the freeze of {vm_id}")
            raise
        guest.frozen_until = until
        loop = asyncio.get_running_loop()
        guest.thaw_timer = loop.call_later(timeout, self._spawn, self._thaw_by_timer(vm_id),
                                           f"thaw {vm_id}")
        self._publish(guest, "frozen", frozen=count, thaw_at=round(until, 3))
        return {"frozen": count, "thaw_at": round(until, 3)}

    async def thaw(self, vm_id: str, *, reason: str = "thaw") -> JsonObject:
        """Thaw the guest's filesystems; ``thawed`` counts them (0 when none were frozen)."""
        guest = self._guests.get(vm_id)
        if guest is not None and guest.thaw_timer is not None:
            guest.thaw_timer.cancel()
            guest.thaw_timer = None
        count = await self.command(vm_id, lambda dom: dom.fsThaw(None, 0), "thawing the guest")
        await self._hv.call(lambda conn: _set_freeze(vmops.lookup(conn, vm_id), None),
                            what=f"clearing the freeze of {vm_id}")
        if guest is not None:
            was = guest.frozen_until is not None
            guest.frozen_until = None
            if was or count:
                self._publish(guest, "thawed", thawed=count, reason=reason)
        return {"thawed": count}

    async def _thaw_by_timer(self, vm_id: str) -> None:
        log.warning("VM %s: the freeze ran out; thawing the guest", vm_id)
        await self._thaw_until_done(vm_id, "timeout")

    async def _thaw_until_done(self, vm_id: str, reason: str) -> None:
        """Thaw, retrying while the VM runs: a freeze must not outlive its deadline."""
        delay = 1.0
        while not self._closed and vm_id in self._guests:
            try:
                await self.thaw(vm_id, reason=reason)
                return
            except NotFound:
                return
            except ApiError as exc:
                log.warning("VM %s: thawing failed (%s); retrying in %g s", vm_id, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    # --- following libvirt -----------------------------------------------------------------

    async def _on_connect(self, _conn: Connection) -> None:
        """Rebuild the view from the running domains' live XML, thaw leftover freezes."""
        found = await self._hv.call(_survey, what="reading the guest agent channels")
        for vm_id in [v for v in self._guests if v not in found]:
            self._forget(vm_id)
        for vm_id, (name, agent, frozen) in found.items():
            record = self._guests.get(vm_id)
            if record is None:
                record = self._guests[vm_id] = _Guest(vm_id, name)
            record.name = name
            self._set_agent(record, agent, publish=False)
            if frozen and record.frozen_until is None:  # not a freeze of this run's
                log.warning("VM %s carries a freeze of an earlier run of the agent; thawing",
                            vm_id)
                self._spawn(self._thaw_until_done(vm_id, "agent_restart"), f"thaw {vm_id}")

    def _on_event(self, event: DomainEvent) -> None:
        if event.kind == "agent":
            guest = self._guests.get(event.vm_id)
            if guest is None:
                guest = self._guests[event.vm_id] = _Guest(event.vm_id, event.name)
            state = {_CONNECTED: "connected", _DISCONNECTED: "disconnected"}.get(event.event)
            if state is not None:
                self._set_agent(guest, state, publish=True)
        elif event.kind == "lifecycle":
            if event.event == vc.DOMAIN_EVENT_STOPPED:
                self._forget(event.vm_id)
            elif event.event == vc.DOMAIN_EVENT_STARTED:
                self._spawn(self.learn(event.vm_id), f"guest agent of {event.vm_id}")
            elif event.event == vc.DOMAIN_EVENT_RESUMED:
                guest = self._guests.get(event.vm_id)
                if guest is not None and guest.agent == "connected":
                    guest.wake.set()  # a guest that was paused may have changed

    def known(self, vm_id: str) -> bool:
        return vm_id in self._guests

    async def learn(self, vm_id: str) -> None:
        """A VM started: whether it has a channel (its agent event comes later)."""
        try:
            found = await self._hv.call(lambda conn: _survey_one(vmops.lookup(conn, vm_id)),
                                        what=f"reading the guest agent channel of {vm_id}")
        except ApiError:
            return  # gone again: its stop event cleans up
        name, agent, _frozen = found
        known = self._guests.get(vm_id)
        if known is None:
            known = self._guests[vm_id] = _Guest(vm_id, name)
            self._set_agent(known, agent, publish=False)
        elif known.agent == "none":
            self._set_agent(known, agent, publish=False)

    def _set_agent(self, guest: _Guest, agent: str, *, publish: bool) -> None:
        before = guest.agent
        guest.agent = agent
        if agent == "connected":
            if guest.refresher is None or guest.refresher.done():
                guest.refresher = asyncio.create_task(
                    self._refresh(guest), name=f"guest agent of {guest.vm_id}")
            else:
                guest.wake.set()
        else:
            self._stop_refresh(guest)
        # "disconnected" only for a guest agent that was connected: at a VM's start libvirt
        # reports the channel disconnected, which is no news.
        if publish and agent != before and (agent == "connected" or before == "connected"):
            self._publish(guest, agent)

    def _stop_refresh(self, guest: _Guest) -> None:
        if guest.refresher is not None:
            guest.refresher.cancel()
            guest.refresher = None

    def _forget(self, vm_id: str) -> None:
        guest = self._guests.pop(vm_id, None)
        if guest is None:
            return
        self._stop_refresh(guest)
        if guest.thaw_timer is not None:
            guest.thaw_timer.cancel()  # a stopped VM has nothing frozen

    async def _refresh(self, guest: _Guest) -> None:
        """Fetch what the guest agent reports now, then every refresh interval, and when
        woken (the VM resumed), while it stays connected."""
        while guest.agent == "connected" and not self._closed:
            guest.wake.clear()
            await self._fetch(guest)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.refresh_interval):
                    await guest.wake.wait()

    async def _fetch(self, guest: _Guest) -> None:
        vm_id = guest.vm_id
        errors: dict[str, str] = {}
        info: JsonObject = {}
        try:
            params = await self.command(vm_id, lambda dom: dom.guestInfo(0, 0),
                                        "asking the guest agent")
            info.update(parse_guest_info(params))
        except ApiError as exc:
            errors["info"] = exc.message
        try:
            addresses = await self.command(
                vm_id, lambda dom: dom.interfaceAddresses(
                    vc.DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0),
                "asking the guest agent for its interfaces")
            info["interfaces"] = parse_interfaces(addresses)
        except ApiError as exc:
            errors["interfaces"] = exc.message
        if self._guests.get(vm_id) is not guest:
            return  # the VM stopped meanwhile
        if errors and not info:
            if guest.errors != errors:
                guest.errors = errors
                log.info("VM %s: the guest agent did not answer: %s", vm_id, errors)
            return
        changed = info != guest.info or errors != guest.errors
        guest.info, guest.errors = info, errors
        guest.fetched_at, guest.fetched_mono = time.time(), time.monotonic()
        if changed:
            self._publish(guest, "info", guest=self.section(vm_id))

    # --- plumbing --------------------------------------------------------------------------

    def _publish(self, record: _Guest, event: str, **extra: Any) -> None:
        self._bus.publish(TOPIC, {"vm_id": record.vm_id, "name": record.name,
                                  "event": event, "agent": record.agent, **extra})

    def _spawn(self, coro: Any, name: str) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# --- in the libvirt pool ---------------------------------------------------------------------


def _survey(conn: Connection) -> dict[str, tuple[str, str, bool]]:
    """Every running domain: its name, guest agent state and whether it carries a freeze."""
    found = {}
    for dom in conn.listAllDomains(vc.CONNECT_LIST_DOMAINS_ACTIVE):
        with contextlib.suppress(Exception):  # one that stopped meanwhile
            found[dom.UUIDString()] = _survey_one(dom)
    return found


def _survey_one(dom: Domain) -> tuple[str, str, bool]:
    root = etree.fromstring(dom.XMLDesc(0))
    agent = "none"
    for target in root.iterfind("devices/channel/target"):
        if target.get("type") == "virtio" and target.get("name") == GUEST_AGENT_CHANNEL:
            agent = "connected" if target.get("state") == "connected" else "disconnected"
    frozen = root.find(f"metadata/{{{FREEZE_NAMESPACE}}}freeze") is not None
    return dom.name(), agent, frozen


def _set_freeze(dom: Domain, until: float | None) -> None:
    """Record (or clear, with None) a freeze's deadline in the live metadata."""
    body = None if until is None else f'<freeze until="{until:.3f}"/>'
    dom.setMetadata(vc.DOMAIN_METADATA_ELEMENT, body, FREEZE_PREFIX if body else None,
                    FREEZE_NAMESPACE, vc.DOMAIN_AFFECT_LIVE)


# --- what the guest agent says, as the API shows it ------------------------------------------


def _indexed(params: Mapping[str, Any], prefix: str) -> list[dict[str, Any]]:
    """``prefix.count`` items of ``prefix.N.key`` typed parameters, as dicts by key."""
    count = params.get(f"{prefix}.count")
    if not isinstance(count, int):
        return []
    items: list[dict[str, Any]] = [{} for _ in range(min(count, 1024))]
    head = f"{prefix}."
    for key, value in params.items():
        if not key.startswith(head):
            continue
        index, _, rest = key[len(head):].partition(".")
        if index.isdigit() and rest and int(index) < len(items):
            items[int(index)][rest] = value
    return items


def parse_guest_info(params: Mapping[str, Any]) -> JsonObject:
    """``virDomainGetGuestInfo``'s typed parameters as the ``guest`` section's fields."""
    info: JsonObject = {}
    os_fields = {k.removeprefix("os."): v for k, v in params.items() if k.startswith("os.")}
    if os_fields:
        info["os"] = {k.replace("-", "_"): v for k, v in sorted(os_fields.items())}
    if "hostname" in params:
        info["hostname"] = params["hostname"]
    if "timezone.offset" in params or "timezone.name" in params:
        info["timezone"] = {"name": params.get("timezone.name"),
                            "offset_seconds": params.get("timezone.offset")}
    if "user.count" in params:
        info["users"] = [
            {"name": u.get("name"), "domain": u.get("domain"),
             "login_time": (None if u.get("login-time") is None
                            else u["login-time"] / 1000)}
            for u in _indexed(params, "user")]
    if "fs.count" in params:
        info["filesystems"] = [
            {"mountpoint": f.get("mountpoint"), "name": f.get("name"),
             "type": f.get("fstype"), "total_bytes": f.get("total-bytes"),
             "used_bytes": f.get("used-bytes"),
             "disks": sorted(v for k, v in f.items()
                             if k.startswith("disk.") and k.endswith(".alias"))}
            for f in _indexed(params, "fs")]
    return info


def parse_interfaces(addresses: Mapping[str, Any]) -> list[JsonObject]:
    """``virDomainInterfaceAddresses``' answer as a sorted list."""
    kinds = {0: "ipv4", 1: "ipv6"}
    result = []
    for name, iface in sorted(addresses.items()):
        addrs = [{"type": kinds.get(a.get("type"), "other"), "address": a.get("addr"),
                  "prefix": a.get("prefix")} for a in (iface.get("addrs") or [])]
        result.append({"name": name, "hwaddr": iface.get("hwaddr"), "addresses": addrs})
    return result
