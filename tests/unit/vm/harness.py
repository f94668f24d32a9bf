"""An agent in the test process on libvirt's test driver, called through its dispatcher.

:class:`InProcessAgent` builds what :class:`virtnode.daemon.Agent` builds for the ``VM.*``
methods, the same way: a real :class:`Hypervisor` on ``test:///default`` (libvirt-python
in this process: no libvirtd, no root), the event bus with its journal in a state store
under ``tmp_path``, the job manager, :class:`VmService`, :class:`VmDeviceService` and the
statistics sampler. Calls go through the real :class:`Dispatcher` with the loaded schema
and the real bindings (``VM.*`` and ``Job.*``; other methods fail the test), so params
are validated and defaults filled as in production, every result and event is checked
against the schema, and an error a method's schema entry does not list fails the test.
Storage and managed networks are not built: a disk given as a volume, or a NIC on a
managed network, is Unavailable here.

The test driver keeps one in-memory host per process while any connection to
``test:///default`` (or a domain handle of one) is alive; it starts again from its one
domain ``test`` when the last goes. Each agent opens one connection, checks that the
host it finds is that fresh one, and on stopping removes the VMs it made and closes its
connection. Two agents connected at once would share one host: start one at a time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.events import WAIT, EventLog
from tests.fakes.session import FakeSession
from virtnode.client import RemoteError
from virtnode.config import Role, build_config
from virtnode.daemon import peer_connector
from virtnode.errors import ERRORS_BY_NAME
from virtnode.events import journal
from virtnode.events.bus import EventBus
from virtnode.events.journal import Journal
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.connection import Hypervisor
from virtnode.jobs import store as jobstore
from virtnode.jobs.manager import JobManager
from virtnode.jobs.service import JobService
from virtnode.rpc import bindings
from virtnode.rpc.bindings import job as job_binding
from virtnode.rpc.bindings import migration as migration_binding
from virtnode.rpc.bindings import vm as vm_binding
from virtnode.rpc.dispatch import CallContext, Dispatcher
from virtnode.rpc.identity import Caller
from virtnode.rpc.schema import COMMON_ERRORS, ApiSchema
from virtnode.stats.sampler import StatsSampler, StatsService
from virtnode.store import Store
from virtnode.util.jsontypes import JsonObject
from virtnode.vm import clones, snapshots
from virtnode.vm.console import ConsoleService
from virtnode.vm.devices import VmDeviceService
from virtnode.vm.migration import MigrationService, Peer, PeerConnector
from virtnode.vm.ova import OvaService
from virtnode.vm.service import VmService
from virtnode.vm.snapshots import SnapshotService

URI = "test:///default"
#: The domain the test driver starts with: persistent, running, not made by virtnode.
DEFAULT_VM = "test"
DEFAULT_VM_ID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
ADMIN = Caller("uid:0", Role.ADMIN, "unix")
#: The agent's own host UUID (the one Host.getCapabilities reports).
HOST_ID = "0e5b2c1a-6f0d-4d7e-9a35-6c1f1f6f0a11"
READER = Caller("uid:1000", Role.READER, "unix")


class VmEventLog(EventLog):
    """Every event the agent's bus delivers, with the VM tests' questions about them."""

    def lifecycle_now(self, vm_id: str) -> list[tuple[str, str, str]]:
        """``(event, detail, state)`` of each ``vm.lifecycle`` event of ``vm_id`` so far."""
        return [(d["event"], d["detail"], d["state"]) for d in self.of("vm.lifecycle")
                if d["vm_id"] == vm_id]

    async def lifecycle(self, vm_id: str, count: int) -> list[tuple[str, str, str]]:
        """The VM's lifecycle events once there are at least ``count`` of them."""
        await self.until(lambda: len(self.lifecycle_now(vm_id)) >= count,
                         f"{count} vm.lifecycle events of {vm_id}")
        return self.lifecycle_now(vm_id)

    async def first(self, topic: str, predicate: Callable[[JsonObject], bool],
                    what: str) -> JsonObject:
        """The first event on ``topic`` whose data satisfies ``predicate``."""
        found: list[JsonObject] = []

        def seen() -> bool:
            found[:] = [d for d in self.of(topic) if predicate(d)]
            return bool(found)

        await self.until(seen, what)
        return found[0]


class DomainCalls:
    """The changes the agent asks of libvirt, each passed on to libvirt unchanged.

    For what the test driver does not do (it refuses device hotplug and graphics
    updates): the XML and flags the agent sends are what can be checked here.
    """

    RECORDED = frozenset({"attachDeviceFlags", "detachDeviceFlags", "updateDeviceFlags",
                          "reboot", "reset", "shutdownFlags", "setMemoryFlags",
                          "setVcpusFlags"})

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def of(self, method: str) -> list[tuple[Any, ...]]:
        with self._lock:
            return [args for name, args in self.calls if name == method]

    def _record(self, method: str, args: tuple[Any, ...]) -> None:
        with self._lock:
            self.calls.append((method, args))


class _DomainSpy:
    def __init__(self, dom: Any, calls: DomainCalls) -> None:
        self._dom = dom
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._dom, name)
        if name not in DomainCalls.RECORDED:
            return target

        def recorded(*args: Any) -> Any:
            self._calls._record(name, args)
            return target(*args)

        return recorded


class _ConnectionSpy:
    def __init__(self, conn: Any, calls: DomainCalls) -> None:
        self._conn = conn
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._conn, name)
        if name not in ("lookupByUUIDString", "lookupByName"):
            return target
        return lambda *args: _DomainSpy(target(*args), self._calls)


def _merge(base: dict[str, Any], more: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in more.items():
        merged.setdefault(section, {}).update(values)
    return merged


class InProcessAgent:
    """The VM side of an agent on the test driver. :meth:`start` it, :meth:`stop` it."""

    def __init__(self, tmp_path: Path, schema: ApiSchema,
                 config: Mapping[str, Mapping[str, Any]] = ()) -> None:
        self.images = tmp_path / "images"
        #: The directory of storage.export_paths (not made).
        self.exports = tmp_path / "exports"
        self.images.mkdir(exist_ok=True)
        raw = _merge({
            "hypervisor": {"uri": URI, "pool_size": 4},
            "state": {"dir": str(tmp_path / "state")},
            "vm": {"allowed_paths": [str(self.images)]},
            # Sampled when a test asks for it (it sets stats.vm_interval).
            "stats": {"vm_interval": 3600.0, "host_interval": 3600.0},
        }, dict(config))
        self.config = build_config(raw)
        self.schema = schema
        self.store = Store(Path(self.config.state.dir),
                           (journal.TABLES, jobstore.TABLES, snapshots.TABLES,
                            clones.TABLES))
        self.bus = EventBus()
        self.bus.check = schema.check_event
        self.hypervisor = Hypervisor(self.config.hypervisor, self.bus)
        self.jobs = JobManager(self.store, self.bus, self.config.jobs)
        self.vms = VmService(self.hypervisor, self.bus, self.config.vm, self.jobs)
        self.sampler = StatsSampler(self.config.stats, self.hypervisor, self.bus,
                                    pool_size=self.config.hypervisor.pool_size)
        #: How VM.migrate reaches another agent: by default the daemon's own connector
        #: (with this config's tls section), else whatever a test sets.
        self.connect: PeerConnector = peer_connector(self.config.tls)
        self.migrations = MigrationService(
            self.vms.core, self.bus, self.jobs, self.config.migration, host_id=lambda: HOST_ID,
            connect=self._connect,
            storage_dirs=lambda: {"00000000-0000-4000-8000-000000000001":
                                  str(tmp_path / "domain-images")}, store=self.store)
        self.vms.migration_of = self.migrations.migration_of
        self.consoles = ConsoleService(self.vms.core, self.bus, self.config.console)
        # No storage here: snapshots of volumes are tested with a whole agent.
        self.snapshots = SnapshotService(self.vms.core, self.vms.guests, self.jobs, None,
                                         self.store, storage_dirs=dict)
        self.clones = clones.CloneService(self.vms.core, self.jobs, None, self.store,
                                   storage_dirs=dict)
        handlers = bindings.combine(
            vm_binding.snapshot_handlers(self.snapshots),
            vm_binding.clone_handlers(self.clones),
            vm_binding.export_handlers(OvaService(
                self.vms.core, self.jobs, None, storage_dirs=dict,
                export_paths=[str(self.exports)], clones=self.clones,
                create=self.vms.create)),
            vm_binding.console_handlers(self.consoles),
            vm_binding.handlers(self.vms, VmDeviceService(self.vms.core),
                                StatsService(self.sampler), self.migrations),
            migration_binding.handlers(self.migrations),
            job_binding.handlers(JobService(self.jobs)),
        )
        handlers.update({name: _not_served for name in schema.methods if name not in handlers})
        self.dispatcher = Dispatcher(schema, handlers, check_results=True)
        self.session = FakeSession(ADMIN, can_push=False)
        self.events = VmEventLog(self.bus)
        #: Every method called through :meth:`call`, answered with a result or an error.
        self.called: set[str] = set()
        self._ids = 0
        self._started = False

    async def _connect(self, url: str, timeout: float) -> Peer:
        return await self.connect(url, timeout)

    async def start(self, *, connect: bool = True) -> None:
        """Start as the daemon does; with ``connect=False`` the hypervisor is never
        connected, and the agent stays as it is before its first view of the VMs."""
        await self.store.open()
        await self.bus.attach_journal(Journal(self.store, self.config.events.journal_max_events,
                                              self.config.events.journal_max_age))
        await self.migrations.start()
        await self.jobs.start()
        self._started = True
        if not connect:
            return
        await self.vms.start()
        await self.snapshots.start()
        await self.clones.start()
        await self.consoles.start()
        await self.hypervisor.start()
        assert self.hypervisor.connected, self.hypervisor.reason
        assert await self.vms.wait_recovered(WAIT), "no view of the VMs"
        await self.sampler.start()
        vms = await self.hypervisor.call(lambda conn: [
            (dom.name(), dom.state()[0]) for dom in conn.listAllDomains()])
        assert vms == [(DEFAULT_VM, vc.DOMAIN_RUNNING)], (
            f"the test driver's host is not fresh ({vms}): something in this process still "
            f"holds a connection to {URI}, or a domain handle of one")

    async def stop(self) -> None:
        """Stop in the daemon's order, having removed every VM this agent made."""
        if not self._started:
            return
        self._started = False
        await self.jobs.close()
        await self.sampler.close()
        await self.migrations.close()
        await self.consoles.close()
        await self.vms.close()
        if self.hypervisor.connected:
            await self._remove_vms()
        await self.hypervisor.close()
        await self.bus.flush()
        await self.store.close()

    async def _remove_vms(self) -> None:
        def remove(conn: Any) -> list[tuple[str, str]]:
            removed = []
            for dom in conn.listAllDomains():
                if dom.name() == DEFAULT_VM:
                    if dom.state()[0] == vc.DOMAIN_PAUSED:
                        dom.resume()
                        removed.append((dom.UUIDString(), "resumed"))
                    elif dom.state()[0] == vc.DOMAIN_SHUTOFF:
                        dom.create()
                        removed.append((dom.UUIDString(), "started"))
                    continue
                persistent = dom.isPersistent()
                if dom.state()[0] != vc.DOMAIN_SHUTOFF:
                    dom.destroy()
                if persistent:
                    dom.undefineFlags(0)
                removed.append((dom.UUIDString(), "undefined" if persistent else "stopped"))
            return removed

        removed = await self.hypervisor.call(remove, what="removing the test's VMs")
        # Their events are delivered before the connection closes, not to a closed store.
        await self.events.until(
            lambda: all((event, vm_id) in {(d["event"], d["vm_id"])
                                           for d in self.events.of("vm.lifecycle")}
                        for vm_id, event in removed),
            "the events of the VMs removed after the test")

    # --- calls ------------------------------------------------------------------------------

    async def answer(self, method: str, params: JsonObject | None = None, *,
                     caller: Caller = ADMIN) -> JsonObject:
        """The JSON-RPC response to one request, as a client would get it."""
        self._ids += 1
        request_id = self._ids
        request: JsonObject = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        session = self.session if caller is ADMIN else FakeSession(caller, can_push=False)
        raw = await self.dispatcher.handle(json.dumps(request), session)
        assert raw is not None
        response: JsonObject = json.loads(raw)
        assert response["id"] == request_id
        self.called.add(method)
        return response

    async def call(self, method: str, params: JsonObject | None = None, *,
                   caller: Caller = ADMIN, undeclared: str | None = None) -> Any:
        """The result of ``method``; raises :class:`RemoteError` for an error answer.

        An error the method's schema entry does not list fails the test, unless it is
        ``undeclared`` (what only the test driver answers).
        """
        response = await self.answer(method, params, caller=caller)
        if "error" in response:
            error = RemoteError(response["error"])
            declared = self.schema.methods[method].errors if method in self.schema.methods \
                else ()
            if error.name not in (*declared, *COMMON_ERRORS, undeclared):
                pytest.fail(f"{method} answered {error.name}, which its schema entry does "
                            f"not list ({', '.join(declared)}): {error.error}")
            raise error
        return response["result"]

    async def error(self, method: str, params: JsonObject | None, name: str,
                    reason: str | None = None, *, caller: Caller = ADMIN,
                    undeclared: str | None = None) -> RemoteError:
        """The error ``method`` answers, checked to be ``name`` (and ``reason``)."""
        with pytest.raises(RemoteError) as caught:
            await self.call(method, params, caller=caller, undeclared=undeclared)
        assert caught.value.name == name, caught.value.error
        if reason is not None:
            assert caught.value.reason == reason, caught.value.error
        return caught.value

    # --- helpers ----------------------------------------------------------------------------

    async def create(self, name: str = "vm1", *, persistent: bool = True, start: bool = True,
                     **spec: Any) -> str:
        """Create a VM of the test domain type from a spec; returns its vm_id."""
        result = await self.call("VM.create", {
            "spec": {"name": name, "domain_type": "test", "memory_mib": 64, **spec},
            "persistent": persistent, "start": start})
        return str(result["vm_id"])

    async def state(self, vm_id: str) -> str:
        return str((await self.call("VM.getInfo", {"vm_id": vm_id}))["state"])

    def image(self, name: str = "disk.img", data: bytes = b"\0" * 512) -> str:
        """A file in the allowed directory, for a disk."""
        path = self.images / name
        path.write_bytes(data)
        return str(path)

    def record_domain_calls(self, monkeypatch: pytest.MonkeyPatch) -> DomainCalls:
        """Record the domain changes the agent asks of libvirt from now on."""
        calls = DomainCalls()
        original = self.hypervisor.call

        async def call(fn: Callable[[Any], Any], **kwargs: Any) -> Any:
            return await original(lambda conn: fn(_ConnectionSpy(conn, calls)), **kwargs)

        monkeypatch.setattr(self.hypervisor, "call", call)
        return calls


async def _not_served(ctx: CallContext, _params: JsonObject) -> JsonObject:
    raise AssertionError(f"{ctx.method} is not served by the VM test harness")


class LoopbackPeer:
    """The agent itself as the destination of a migration: its own dispatcher answers,
    with errors raised as the API's own, as the daemon's peer raises them."""

    def __init__(self, agent: InProcessAgent) -> None:
        self._agent = agent

    async def call(self, method: str, params: JsonObject | None = None, *,
                   timeout: float | None = None) -> JsonObject:
        response = await self._agent.answer(method, params)
        if "error" in response:
            data = dict(response["error"].get("data", {}))
            error = ERRORS_BY_NAME[data.pop("name")]
            raise error(response["error"]["message"], **data)
        result: JsonObject = response["result"]
        return result

    async def close(self) -> None:
        return None


def loopback(agent: InProcessAgent) -> PeerConnector:
    async def connect(_url: str, _timeout: float) -> Peer:
        return LoopbackPeer(agent)

    return connect
