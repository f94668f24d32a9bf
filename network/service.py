"""``Network.*``: the host's networks as one transaction, with a connectivity check,
rollback and a boot config.

How a change runs (a job of kind ``Network.setup``):

1. The request is checked against one read of the kernel's state (:mod:`.validate`) and
   its steps planned (:mod:`.plan`) before a job exists; a second change while one runs
   is ``Aborted`` with the running job's id.
2. In the job, the transaction (its job id, the links it touches, that state as the
   snapshot) is written to the state store before the first step.
3. The steps are applied. A failed step, a connectivity check that times out, a cancel or
   the agent stopping puts the touched links back as the snapshot had them
   (:func:`.plan.restore`) and the job fails with reason ``rolled_back``.
4. Committing writes the new running config (and the boot config with ``persist``) and
   drops the transaction record. A transaction record found at start belongs to a change
   that a crash cut short: it is rolled back then.

All netlink work happens on one thread that owns the netlink socket; the event loop only
waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from virtnode.api_schema.params import NetworkConfirmParams, NetworkSetupParams
from virtnode.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from virtnode.events.bus import EventBus
from virtnode.jobs.manager import JobHandle, JobKind, JobManager
from virtnode.network import config as netconfig
from virtnode.network import plan, validate
from virtnode.network import store as netstore
from virtnode.network.kernel.dhcp import DhcpClients
from virtnode.network.layout import layout_of
from virtnode.network.model import (
    BondConfig,
    Features,
    HostState,
    NetworkConfig,
    SetupOptions,
    Step,
    after_request,
)
from virtnode.network.store import Transaction
from virtnode.store import Store
from virtnode.util.aio import DaemonThreadPool
from virtnode.util.jsontypes import JsonObject

if TYPE_CHECKING:
    # pyroute2 takes a seventh of a second to import: the netlink modules are imported
    # on the netlink thread while the agent starts, not before it can serve.
    from virtnode.network.kernel.netlink import LinkEvent, LinkMonitor, NetlinkHost

log = logging.getLogger(__name__)

T = TypeVar("T")
SETUP_JOB = JobKind("Network.setup", cancellable=True)
CONFIG_TOPIC = "network.config"
LINK_TOPIC = "network.link"
#: Addresses clients reach the agent on now (the local ends of their connections).
ReachedOn = Callable[[], Iterable[str]]
_STARTING = "starting"
#: Seconds before a failed link monitor is started again.
MONITOR_RETRY = 1.0
_DESTRUCTIVE = frozenset({"del_address", "del_link", "set_master", "set_up"})


class RolledBack(Aborted):
    """A change that was undone; ``trigger`` says why."""

    def __init__(self, message: str, trigger: str, error: str | None = None) -> None:
        data: dict[str, Any] = {"trigger": trigger}
        if error is not None:
            data["error"] = error
        super().__init__(message, reason="rolled_back", **data)
        self.trigger = trigger


class NetworkService:
    """Owns the netlink thread, the managed networks and the one change that may run."""

    def __init__(self, store: Store, bus: EventBus, jobs: JobManager, *,
                 boot_id_file: Path, restore_boot_config: bool, dhcp_dir: Path,
                 reached_on: ReachedOn = lambda: (), netns: str | None = None) -> None:
        self._store = store
        self._bus = bus
        self._jobs = jobs
        self._boot_id_file = boot_id_file
        self._restore_boot_config = restore_boot_config
        self._reached_on = reached_on
        self._netns = netns
        self._dhcp = DhcpClients(dhcp_dir)
        self._pool = DaemonThreadPool(1, "netlink")
        self._netlink: Any = None  # the module virtnode.network.kernel.netlink, once imported
        self._host: NetlinkHost | None = None
        self._monitor: LinkMonitor | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self.features = Features(bridge=False, vlan_filtering=False, vlan_8021q=False,
                                 bond=False)
        self._running: dict[str, NetworkConfig] = {}
        self._persisted: dict[str, NetworkConfig] = {}
        self._running_bonds: dict[str, BondConfig] = {}
        self._persisted_bonds: dict[str, BondConfig] = {}
        self._active: str | None = None  # the job id of the change that runs
        self._active_key: str | None = None  # and its request key
        self._starting = asyncio.Lock()  # checks and job creation of one change at a time
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._starting_task: asyncio.Task[None] | None = None
        jobs.register(SETUP_JOB)

    # --- life -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start getting ready in the background: the agent serves meanwhile, and the
        ``Network.*`` calls wait until this service is ready."""
        self._pool.start()
        self._starting_task = asyncio.create_task(self._start(), name="network-start")

    async def ready(self) -> None:
        """Return once started; Unavailable (``not_ready``) if starting failed."""
        if self._starting_task is None:
            raise Unavailable("host networking is not started", reason="not_ready")
        try:
            await asyncio.shield(self._starting_task)
        except Exception as exc:
            raise Unavailable(f"host networking could not start: {exc}",
                              reason="not_ready") from None

    async def _start(self) -> None:
        """Open netlink, find what the kernel can do, load the configs, finish or undo
        what a crash left, restore the boot config after a boot, then watch links."""
        try:
            await self._start_steps()
        except Exception as exc:
            log.error("network: cannot start host networking: %s", exc)
            raise

    async def _start_steps(self) -> None:
        self._netlink = await self._call(importlib.import_module, "virtnode.network.kernel.netlink")
        host: NetlinkHost = await self._call(partial(self._netlink.NetlinkHost, self._netns,
                                                     dhcp=self._dhcp))
        self._host = host
        self.features = await self._call(host.features)
        log.info("network: kernel supports %s", ", ".join(
            f"{k}={'yes' if v else 'no'}" for k, v in vars(self.features).items()))
        await self._store.ensure_schema(netstore.COMPONENT, netstore.VERSION, netstore.SCHEMA)
        saved = await self._store.run(netstore.load)
        self._running, self._persisted = dict(saved.running), dict(saved.persisted)
        self._running_bonds = dict(saved.running_bonds)
        self._persisted_bonds = dict(saved.persisted_bonds)
        if saved.transaction is not None:
            tx = saved.transaction
            log.warning("network: change %s was cut short by a stop or crash; rolling it "
                        "back", tx.job_id)
            await self._rollback(tx, [], "interrupted", "the agent stopped during the change")
        boot_id = await asyncio.to_thread(_read_boot_id, self._boot_id_file)
        if saved.boot_id is not None and saved.boot_id != boot_id:
            # The host booted since the agent last ran: what ran before is gone.
            self._running, self._running_bonds = {}, {}
            if self._restore_boot_config and (self._persisted or self._persisted_bonds):
                await self._restore_boot()
            await self._store.run(partial(netstore.save, kind=netstore.RUNNING,
                                          networks=self._running, bonds=self._running_bonds))
        await self._store.run(partial(netstore.save_boot_id, boot_id=boot_id))
        # A DHCP client that died while the agent was away is started again.
        await self._apply_dhcp(await self._dhcp_steps(), "start_dhcp")
        # Watching before ready: a client that waited for ready misses no link event.
        self._monitor = self._netlink.LinkMonitor(self._netns)
        await self._monitor.start()
        self._monitor_task = asyncio.create_task(self._watch_links(), name="network-monitor")

    async def close(self) -> None:
        if self._starting_task is not None:
            self._starting_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._starting_task
        if self._monitor is not None:
            self._monitor.stop()
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
        if self._host is not None:
            host, self._host = self._host, None
            await self._call(host.close)
        self._pool.shutdown(wait=False)

    # --- reading ----------------------------------------------------------------------------

    async def get_state(self) -> JsonObject:
        await self.ready()
        state = await self._call(self.host.read_state)
        return state_api(state, self._running, self.features, self._running_bonds)

    async def list_networks(self) -> JsonObject:
        await self.ready()
        return {"networks": [
            {"name": name, "config": netconfig.config_to_api(cfg),
             "persisted": self._persisted.get(name) == cfg}
            for name, cfg in sorted(self._running.items())], "bonds": [
            {"name": name, "config": netconfig.bond_to_api(bond),
             "persisted": self._persisted_bonds.get(name) == bond}
            for name, bond in sorted(self._running_bonds.items())]}

    def bridge_of(self, name: str) -> str:
        """The bridge a VM's NIC on managed network ``name`` plugs into.

        Raises NotFound (``no_network``) and FailedPrecondition (``not_bridged``).
        """
        if self._starting_task is None or not self._starting_task.done():
            raise Unavailable("host networking is starting", reason="not_ready")
        cfg = self._running.get(name)
        if cfg is None:
            raise NotFound(f"no managed network {name!r}", reason="no_network",
                           object="network", id=name)
        if not cfg.bridge:
            raise FailedPrecondition(f"network {name!r} has no bridge for VMs to join",
                                     reason="not_bridged", object="network", id=name)
        return name

    # --- changing ---------------------------------------------------------------------------

    async def setup(self, params: NetworkSetupParams) -> JsonObject:
        await self.ready()
        requested = self._requested(params)
        bonds = netconfig.bonds_from_api(params.get("bonds", {}))
        options = SetupOptions(**params.get("options", {}))
        key = params.get("request_key")
        async with self._starting:
            if key is None or key != self._active_key:  # a retry gets the running job
                self._refuse_if_busy()
            state = await self._call(self.host.read_state)
            validate.validate(requested, self._running, state, self.features,
                              bond_request=bonds, running_bonds=self._running_bonds)
            steps = plan.plan(state, self._running, requested, self.features,
                              running_bonds=self._running_bonds, requested_bonds=bonds)
            if not options.connectivity_check:
                self._protect_management(state, steps)
            # The job applies what was checked here: nothing else changes managed
            # networks until it ends (the change is exclusive from now on).
            job = await self._jobs.submit(
                SETUP_JOB.name, params, lambda handle: self._transaction(
                    handle, requested=requested, bonds=bonds, state=state, steps=steps,
                    options=options),
                description="network change: " + ", ".join(
                    [*sorted(requested), *(f"bond {b}" for b in sorted(bonds))]),
                request_key=key, prepare=self._exclusive)
            if self._active == _STARTING:
                self._active, self._active_key = job.job_id, key
        return {"job_id": job.job_id, "job": job.to_api()}

    async def confirm(self, params: NetworkConfirmParams) -> JsonObject:
        await self.ready()
        job_id = params["job_id"]
        job = self._jobs.get(job_id)  # NotFound
        waiting = self._confirmations.get(job_id)
        if job.kind != SETUP_JOB.name or waiting is None or waiting.done():
            raise FailedPrecondition(f"job {job_id} is not waiting for a confirmation",
                                     reason="not_pending", object="job", id=job_id)
        waiting.set_result(None)
        return {"job": (await self._jobs.wait(job_id, 30.0)).to_api()}

    async def persist(self) -> JsonObject:
        await self.ready()
        async with self._starting:
            self._refuse_if_busy()
            await self._save_persisted(dict(self._running), dict(self._running_bonds))
        return {"networks": sorted(self._persisted), "bonds": sorted(self._persisted_bonds)}

    # --- inside -----------------------------------------------------------------------------

    @property
    def host(self) -> NetlinkHost:
        if self._host is None:
            raise Unavailable("host networking is not ready", reason="not_ready")
        return self._host

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    def _requested(self, params: NetworkSetupParams) -> dict[str, NetworkConfig | None]:
        requested = netconfig.request_from_api(params["networks"])
        for name, cfg in requested.items():
            for family, ip in ((4, cfg.ipv4), (6, cfg.ipv6)) if cfg is not None else ():
                if ip.method == "dhcp" and not self.features.dhcp_client:
                    raise InvalidArgument(
                        f"network {name!r}: DHCP needs a DHCP client, and none is installed "
                        "(dhclient, Debian's isc-dhcp-client)", reason="unsupported",
                        object="network", id=name, field=f"networks.{name}.ipv{family}.method")
        return requested

    def _refuse_if_busy(self) -> None:
        if self._active is not None:
            raise Aborted(f"network change {self._active} is running", reason="busy",
                          job_id=self._active)

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        self._active = _STARTING
        try:
            yield
        finally:
            self._active = self._active_key = None

    def _protect_management(self, state: HostState, steps: list[Step]) -> None:
        """Refuse steps that would take away an address a client reaches the agent on."""
        reached = set(self._reached_on())
        carriers = {a.link for a in state.addresses if a.address.split("/")[0] in reached}
        below = carriers
        while below:  # the ports under them: a bridge's, its bond's slaves
            below = {port for link in below for port in state.ports_of(link)} - carriers
            carriers |= below
        for step in steps:
            if step.action in _DESTRUCTIVE and step.link in carriers and not (
                    step.action == "set_up" and step.args.get("up")):
                raise FailedPrecondition(
                    f"{step.describe()} would cut off the address a client reaches this "
                    "host on; use connectivity_check", reason="management_address",
                    link=step.link)

    async def _transaction(self, handle: JobHandle, *,
                           requested: Mapping[str, NetworkConfig | None],
                           bonds: Mapping[str, BondConfig | None], state: HostState,
                           steps: list[Step], options: SetupOptions) -> JsonObject:
        job_id = handle.job_id
        tx = Transaction(job_id, time.time(), frozenset(plan.touched(steps, state)), state)
        await self._store.run(partial(netstore.begin, tx=tx))
        names = sorted(requested)
        try:
            await self._apply(steps)
            handle.progress(50)
            if options.connectivity_check:
                await self._wait_confirmation(job_id, options.connectivity_timeout)
        except BaseException as exc:
            trigger = exc.trigger if isinstance(exc, RolledBack) else (
                "cancelled" if isinstance(exc, asyncio.CancelledError) else "step_failed")
            await asyncio.shield(self._rollback(tx, names, trigger, str(exc)))
            raise
        await self._commit(tx, after_request(self._running, requested),
                           after_request(self._running_bonds, bonds), options.persist)
        self._bus.publish(CONFIG_TOPIC, {"event": "committed", "job_id": job_id,
                                         "networks": names, "bonds": sorted(bonds)})
        return {"networks": names, "bonds": sorted(bonds)}

    async def _apply(self, steps: list[Step]) -> None:
        try:
            await self._call(self.host.apply, steps)
        except self._netlink.StepError as exc:
            raise RolledBack(f"step {exc.index + 1} of {len(steps)} failed: {exc}; the "
                             "previous state was put back", "step_failed", str(exc)) from None

    async def _wait_confirmation(self, job_id: str, timeout: float) -> None:
        waiting = self._confirmations[job_id] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(waiting, timeout)
        except TimeoutError:
            raise RolledBack(f"no Network.confirm within {timeout:g}s; the previous state was "
                             "put back", "connectivity_timeout") from None
        finally:
            self._confirmations.pop(job_id, None)

    async def _commit(self, tx: Transaction, running: dict[str, NetworkConfig],
                      bonds: dict[str, BondConfig], persist: bool) -> None:
        def write(conn: Any) -> None:
            netstore.save(conn, netstore.RUNNING, running, bonds)
            if persist:
                netstore.save(conn, netstore.PERSISTED, running, bonds)
            netstore.end(conn, tx.job_id)

        await self._store.run(write)
        self._running, self._running_bonds = running, bonds
        if persist:
            self._persisted, self._persisted_bonds = dict(running), dict(bonds)
            self._published_persisted(tx.job_id)

    async def _rollback(self, tx: Transaction, names: list[str], trigger: str,
                        error: str) -> None:
        """Put the touched links and the DHCP clients back; then forget the record."""
        try:
            await self._restore_snapshot(tx.snapshot, tx.links)
        except Exception:
            log.exception("network: rolling back %s failed; the transaction is kept and "
                          "retried at the next start", tx.job_id)
            raise
        await self._store.run(partial(netstore.end, job_id=tx.job_id))
        log.warning("network: change %s rolled back (%s): %s", tx.job_id, trigger, error)
        self._bus.publish(CONFIG_TOPIC, {"event": "rolled_back", "job_id": tx.job_id,
                                         "networks": names, "trigger": trigger,
                                         "error": error})

    async def _restore_snapshot(self, snapshot: HostState, links: frozenset[str]) -> None:
        """Put ``links`` back as ``snapshot`` has them, and the DHCP clients as the running
        networks want them (the snapshot cannot show clients): the ones they do not want
        are stopped before the links are restored, the missing ones started after."""
        dhcp = await self._dhcp_steps()
        await self._apply_dhcp(dhcp, "stop_dhcp")
        await self._restore_links(snapshot, links)
        await self._apply_dhcp(dhcp, "start_dhcp")

    async def _restore_links(self, snapshot: HostState, links: frozenset[str]) -> None:
        # Twice at most: a step of the first pass can fail on a kernel side effect (a
        # route that went with an address); the second pass starts from what is there.
        for attempt in (1, 2):
            current = await self._call(self.host.read_state)
            steps = plan.restore(current, snapshot, links)
            if not steps:
                return
            log.info("network: putting back: %s", "; ".join(s.describe() for s in steps))
            try:
                await self._call(self.host.apply, steps)
            except self._netlink.StepError:
                if attempt == 2:
                    raise
                log.warning("network: a rollback step failed; trying again", exc_info=True)

    async def _dhcp_steps(self) -> list[Step]:
        """The steps that stop the DHCP clients the running networks do not want and
        start the ones they want that do not run."""
        if not self.features.dhcp_client:
            return []
        state = await self._call(self.host.read_state)
        running = await self._call(self._dhcp.running)
        return plan.dhcp_steps(plan.dhcp_clients(state, self._running, self.features),
                               running)

    async def _apply_dhcp(self, steps: list[Step], action: str) -> None:
        """Apply the ``action`` steps of ``steps``, one at a time. A client that will not
        start or stop is logged, not raised: the links are right either way."""
        for step in steps:
            if step.action != action:
                continue
            try:
                await self._call(self.host.apply, [step])
            except self._netlink.StepError as exc:
                log.error("network: %s", exc)

    async def _restore_boot(self) -> None:
        """Set up the boot config: the bonds whose slaves exist, and the networks whose
        NICs (or bonds) are there."""
        state = await self._call(self.host.read_state)
        failed: dict[str, str] = {}
        bonds: dict[str, BondConfig | None] = {}
        for name, bond in sorted(self._persisted_bonds.items()):
            why = _missing(bond.slaves, state) or _refusal(partial(
                validate.validate, {}, {}, state, self.features, bond_request={name: bond}))
            if why is None:
                bonds[name] = bond
            else:
                failed[f"bond {name}"] = why
        wanted: dict[str, NetworkConfig | None] = {}
        for name, cfg in sorted(self._persisted.items()):
            nics = [p for p in cfg.ports if p not in self._persisted_bonds]
            lost = [p for p in cfg.ports if p in self._persisted_bonds and p not in bonds]
            why = (_missing(nics, state) or (f"bond {lost[0]} was not restored" if lost else None)
                   or _refusal(partial(validate.validate, {name: cfg}, {}, state,
                                       self.features, bond_request=bonds)))
            if why is None:
                wanted[name] = cfg
            else:
                failed[name] = why
        if wanted or bonds:
            steps = plan.plan(state, {}, wanted, self.features, requested_bonds=bonds)
            try:
                await self._call(self.host.apply, steps)
            except self._netlink.StepError as exc:
                await self._restore_snapshot(state, frozenset(plan.touched(steps, state)))
                failed.update(dict.fromkeys([*wanted, *(f"bond {b}" for b in bonds)], str(exc)))
                wanted, bonds = {}, {}
        self._running = {name: cfg for name, cfg in wanted.items() if cfg is not None}
        self._running_bonds = {name: b for name, b in bonds.items() if b is not None}
        for name, why in failed.items():
            log.error("network: boot config of %s not restored: %s", name, why)
        self._bus.publish(CONFIG_TOPIC, {"event": "restored", "networks": sorted(self._running),
                                         "bonds": sorted(self._running_bonds),
                                         "failed": failed})

    async def _save_persisted(self, configs: dict[str, NetworkConfig],
                              bonds: dict[str, BondConfig]) -> None:
        await self._store.run(partial(netstore.save, kind=netstore.PERSISTED,
                                      networks=configs, bonds=bonds))
        self._persisted, self._persisted_bonds = configs, bonds
        self._published_persisted(None)

    def _published_persisted(self, job_id: str | None) -> None:
        data: JsonObject = {"event": "persisted", "networks": sorted(self._persisted),
                            "bonds": sorted(self._persisted_bonds)}
        if job_id is not None:
            data["job_id"] = job_id
        self._bus.publish(CONFIG_TOPIC, data)

    async def _watch_links(self) -> None:
        """Publish link events; a monitor the kernel breaks (an OSError) is started again."""
        while True:
            monitor = self._monitor
            try:
                if monitor is None:
                    self._monitor = monitor = self._netlink.LinkMonitor(self._netns)
                    await monitor.start()
                async for event in monitor:
                    self._publish_link(event)
                return  # stopped
            except OSError as exc:
                log.warning("network: the link monitor failed (%s); starting it again in "
                            "%.0fs", exc, MONITOR_RETRY)
                if monitor is not None:
                    monitor.stop()
                self._monitor = None
                await asyncio.sleep(MONITOR_RETRY)

    def _publish_link(self, event: LinkEvent) -> None:
        data: JsonObject = {
            "link": event.link, "event": event.event, "up": event.up,
            "carrier": event.carrier, "operstate": event.operstate, "mtu": event.mtu,
            "master": event.master, "changes": list(event.changes)}
        if event.address is not None:
            data["address"] = event.address
        self._bus.publish(LINK_TOPIC, data)


def _read_boot_id(path: Path) -> str:
    return path.read_text().strip()


def _refusal(check: Callable[[], None]) -> str | None:
    """What ``check`` refuses (its InvalidArgument's message), or None."""
    try:
        check()
    except InvalidArgument as exc:
        return exc.message
    return None


def _missing(nics: Iterable[str], state: HostState) -> str | None:
    gone = [nic for nic in nics if nic not in state.links]
    return "no such NIC: " + ", ".join(gone) if gone else None


def state_api(state: HostState, running: Mapping[str, NetworkConfig], features: Features,
              bonds: Mapping[str, BondConfig]) -> JsonObject:
    """``Network.getState``'s result."""
    managed = {link for cfg in running.values()
               for link in layout_of(cfg, features, state).links}
    managed |= {link for bond in bonds.values() for link in (bond.name, *bond.slaves)}
    links = []
    bridges = []
    bond_list = []
    for name, link in sorted(state.links.items()):
        entry: JsonObject = {
            "name": name, "kind": link.kind, "mac": link.mac, "mtu": link.mtu, "up": link.up,
            "carrier": link.carrier, "operstate": link.operstate, "speed": link.speed,
            "master": link.master, "managed": name in managed}
        if link.vlan_id is not None:
            entry["vlan"] = {"id": link.vlan_id, "parent": link.vlan_parent}
        links.append(entry)
        if link.kind == "bond":
            bond_list.append({"name": name, "slaves": list(state.ports_of(name)),
                              "mode": link.bond_mode, "miimon": link.miimon})
        if link.kind == "bridge":
            ports = state.ports_of(name)
            vlans = [{"port": member, "vid": v.vid, "pvid": v.pvid, "untagged": v.untagged}
                     for member in (name, *ports) for v in state.links[member].vlans]
            bridges.append({"name": name, "ports": list(ports), "stp": bool(link.stp),
                            "vlan_filtering": bool(link.vlan_filtering),
                            "default_pvid": link.default_pvid, "vlans": vlans})
    return {
        "links": links,
        "bridges": bridges,
        "addresses": [{"link": a.link, "address": a.address, "family": a.family,
                       "scope": a.scope, "dynamic": a.dynamic} for a in state.addresses],
        "routes": [{"dst": r.dst, "family": r.family, "gateway": r.gateway, "link": r.link,
                    "metric": r.metric, "proto": r.proto, "scope": r.scope}
                   for r in state.routes],
        "dns": {"nameservers": list(state.dns.nameservers), "search": list(state.dns.search)},
        "bonds": bond_list,
        "managed": {"networks": sorted(running), "bonds": sorted(bonds),
                    "links": sorted(managed)},
        "features": dataclasses.asdict(features),
    }
