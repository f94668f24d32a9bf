"""The agent: builds the services from the configuration, starts and stops them in order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from pathlib import Path

from prometheus_client import ProcessCollector

from virtnode.client import Client, ClientError, RemoteError, tls_context
from virtnode.config import Config, ConfigError, TlsConfig
from virtnode.errors import ERRORS_BY_NAME, FailedPrecondition, Internal, Unavailable
from virtnode.events import journal
from virtnode.events.bus import EventBus
from virtnode.events.journal import Journal
from virtnode.events.subscriptions import EventsService
from virtnode.host.devices import DeviceMonitor
from virtnode.host.service import ApiFacts, HostService, load_host_id
from virtnode.hypervisor.connection import Hypervisor
from virtnode.jobs import store as jobstore
from virtnode.jobs.manager import JobManager
from virtnode.jobs.service import JobService
from virtnode.network.service import NetworkService
from virtnode.rpc import bindings
from virtnode.rpc.api import ApiService
from virtnode.rpc.bindings import api as api_binding
from virtnode.rpc.bindings import events as events_binding
from virtnode.rpc.bindings import host as host_binding
from virtnode.rpc.bindings import job as job_binding
from virtnode.rpc.bindings import migration as migration_binding
from virtnode.rpc.bindings import network as network_binding
from virtnode.rpc.bindings import storage as storage_binding
from virtnode.rpc.bindings import vm as vm_binding
from virtnode.rpc.connguard import AcceptErrors, raise_descriptor_limit
from virtnode.rpc.consoles import ConsoleRoutes
from virtnode.rpc.dispatch import Dispatcher
from virtnode.rpc.schema import load_schema
from virtnode.rpc.server import ApiServer
from virtnode.rpc.tls import server_context
from virtnode.rpc.transfers import TransferRoutes
from virtnode.rpc.uplink import Uplink, Uplinks
from virtnode.stats.metrics import (
    AgentCollector,
    HostCollector,
    Metrics,
    ServicesCollector,
    VmCollector,
    VmStaleCollector,
)
from virtnode.stats.sampler import StatsSampler, StatsService
from virtnode.storage import usage
from virtnode.storage.domains.monitor import StorageCollector
from virtnode.storage.domains.service import StorageDomainService
from virtnode.storage.volumes.service import VolumeService
from virtnode.store import Store, StoreError, prepare_state_dir
from virtnode.util.jsontypes import JsonObject
from virtnode.vm import clones, migrationstore, snapshots
from virtnode.vm.console import ConsoleService
from virtnode.vm.devices import VmDeviceService
from virtnode.vm.migration import MigrationService, Peer, PeerConnector
from virtnode.vm.ova import OvaService
from virtnode.vm.service import VmService
from virtnode.vm.snapshots import SnapshotService

log = logging.getLogger(__name__)



class Agent:
    """One running agent. ``start()`` brings it up; ``stop()`` takes it down in stages."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(Path(config.state.dir),
                           (journal.TABLES, jobstore.TABLES, migrationstore.TABLES,
                            snapshots.TABLES, clones.TABLES))
        self.bus = EventBus()
        self.hypervisor = Hypervisor(config.hypervisor, self.bus)
        self.jobs = JobManager(self.store, self.bus, config.jobs)
        self.network = NetworkService(
            self.store, self.bus, self.jobs, boot_id_file=Path(config.network.boot_id_file),
            restore_boot_config=config.network.restore_boot_config,
            dhcp_dir=Path(config.state.dir) / "dhcp", reached_on=self._reached_on)
        self.events: EventsService | None = None
        self.uplinks = Uplinks([])
        self.devices = DeviceMonitor(config.devices, self.bus)
        self.stats = StatsSampler(config.stats, self.hypervisor, self.bus,
                                  pool_size=config.hypervisor.pool_size,
                                  paths=(config.state.dir,))
        def vm_disks() -> Awaitable[dict[str, list[str]]]:
            return usage.running_vm_disks(self.hypervisor)

        mount_root = Path(config.storage.mount_root or Path(config.state.dir) / "mnt")
        self.storage = StorageDomainService(config.storage, mount_root, self.store, self.bus,
                                            vm_disks, protected=(Path(config.state.dir),),
                                            hypervisor_uri=config.hypervisor.uri,
                                            cancel_job=lambda job_id: self.jobs.cancel(
                                                job_id, by="StorageDomain.delete"))
        self.volumes = VolumeService(self.storage, self.jobs, self.bus, vm_disks,
                                     lambda: usage.all_vm_disks(self.hypervisor),
                                     transfer_timeout=config.storage.transfer_timeout,
                                     import_paths=config.storage.import_paths)
        self.vms = VmService(self.hypervisor, self.bus, config.vm, self.jobs,
                             lambda ref, readonly: self.volumes.resolve(ref, readonly=readonly),
                             networks=self.network.bridge_of,
                             storage_dirs=lambda: [str(d.layout.images_dir)
                                                   for d in self.storage.attached()],
                             writers=self.volumes.core.writers, images=self.volumes,
                             guest_agent=config.guest_agent)
        self._host_id = ""
        self.migrations = MigrationService(
            self.vms.core, self.bus, self.jobs, config.migration,
            host_id=lambda: self._host_id, connect=peer_connector(config.tls),
            storage_dirs=lambda: {d.sd_id: str(d.layout.images_dir)
                                  for d in self.storage.attached()},
            volumes=self.volumes, store=self.store)
        self.vms.migration_of = self.migrations.migration_of
        self.consoles = ConsoleService(self.vms.core, self.bus, config.console)
        self.snapshots = SnapshotService(
            self.vms.core, self.vms.guests, self.jobs, self.volumes, self.store,
            storage_dirs=lambda: {d.sd_id: str(d.layout.images_dir)
                                  for d in self.storage.attached()},
            merge_bandwidth=config.storage.merge_bandwidth)
        self.clones = clones.CloneService(
            self.vms.core, self.jobs, self.volumes, self.store,
            storage_dirs=lambda: {d.sd_id: str(d.layout.images_dir)
                                  for d in self.storage.attached()})
        self.ova = OvaService(
            self.vms.core, self.jobs, self.volumes,
            storage_dirs=lambda: {d.sd_id: str(d.layout.images_dir)
                                  for d in self.storage.attached()},
            export_paths=config.storage.export_paths, clones=self.clones,
            create=self.vms.create)
        self.metrics: Metrics | None = None
        self.dispatcher: Dispatcher | None = None
        self.server: ApiServer | None = None
        self._stopped = False

    async def _close_started(self) -> None:
        """Undo a start whose listeners could not be bound."""
        await self.devices.close()
        await self.jobs.close()
        await self.stats.close()
        self.volumes.close()
        await self.storage.close()
        await self.network.close()
        await self.migrations.close()
        await self.consoles.close()
        await self.vms.close()
        await self.hypervisor.close()
        await self.bus.flush()
        await self.store.close()

    async def start(self) -> None:
        """Check the schema against the handlers, connect, then listen.

        Raises :class:`~virtnode.config.ConfigError` when the TLS files or the state
        directory cannot be used, :class:`~virtnode.rpc.schema.SchemaError` when the schema
        and the handlers disagree and ``OSError`` when a listener cannot be bound; nothing
        is left running in any case.
        """
        started = time.perf_counter()
        tls = None
        if any(listener.kind == "tls" for listener in self.config.server.listeners):
            # First, so that unusable certificate files stop the start before anything runs.
            tls = await asyncio.to_thread(server_context, self.config.tls)
        schema = await asyncio.to_thread(load_schema)  # compiling validators takes a while
        check = self.config.server.check_results
        if check:
            await asyncio.to_thread(schema.compile_checks)
            self.bus.check = schema.check_event
        host_id = await asyncio.to_thread(_open_state_dir, Path(self.config.state.dir))
        self._host_id = host_id
        await self.store.open()
        events_config = self.config.events
        await self.bus.attach_journal(Journal(self.store, events_config.journal_max_events,
                                              events_config.journal_max_age))
        self.events = EventsService(self.bus, events_config)
        # Before the jobs: a resumed VM.migrate looks for what its migration left.
        await self.migrations.start()
        await self.jobs.start()
        host = HostService(self.hypervisor, ApiFacts(schema.version, tuple(sorted(schema.methods)),
                                                     tuple(sorted(schema.events))),
                           host_id, device_events=lambda: self.devices.state.value)
        stats = StatsService(self.stats, lambda: [
            {"sd_id": sd_id, "name": name, "monitor": result.to_api()}
            for sd_id, name, result in self.storage.results()])
        handlers = bindings.combine(
            api_binding.handlers(ApiService(schema)),
            host_binding.handlers(host, stats),
            vm_binding.handlers(self.vms, VmDeviceService(self.vms.core), stats,
                                self.migrations),
            vm_binding.console_handlers(self.consoles),
            vm_binding.snapshot_handlers(self.snapshots),
            vm_binding.clone_handlers(self.clones),
            vm_binding.export_handlers(self.ova),
            migration_binding.handlers(self.migrations),
            events_binding.handlers(self.events),
            job_binding.handlers(JobService(self.jobs)),
            storage_binding.handlers(self.storage, self.volumes),
            network_binding.handlers(self.network),
        )
        self.metrics = metrics = self._metrics(schema.methods)
        self.dispatcher = Dispatcher(schema, handlers, check_results=check,
                                     observer=metrics.requests.observe,
                                     max_batch=self.config.server.max_batch,
                                     max_answer_size=self.config.server.max_answer_size)
        await host.start()
        await self.storage.start(host_id)
        await self.volumes.start()
        await self.devices.start()
        await self.vms.start()
        await self.snapshots.start()
        await self.clones.start()
        await self.consoles.start()
        await self.hypervisor.start()
        if self.hypervisor.connected:
            # Serve with a complete view of the VMs when libvirt is there to give it.
            await self.vms.wait_recovered(self.config.hypervisor.call_timeout)
        await self.stats.start()
        self.server = ApiServer(self.config.server, self.config.access, self.dispatcher,
                                self.health, metrics.render, tls=tls)
        self.server.add_routes(ConsoleRoutes(self.consoles, self.config.console))
        self.server.add_routes(TransferRoutes(
            self.volumes.transfers, body_timeout=self.config.server.body_timeout))
        try:
            await self.server.start()
        except BaseException:
            await self.server.close()
            await self._close_started()
            raise
        # Host networking gets ready in the background (Network.* calls wait for it); begun
        # once the agent listens, its import of pyroute2 and probe of the kernel (a fifth of
        # a second of Python) do not hold up the start.
        await self.network.start()
        self.uplinks = Uplinks([
            Uplink(url, self.config.uplink, server=self.server, events=self.events,
                   bus=self.bus, host_id=host_id,
                   max_message_size=self.config.server.max_message_size,
                   api_version=schema.version)
            for url in self.config.uplink.urls
        ])
        self.uplinks.start()
        log.info("virtnode ready in %.0f ms (hypervisor %s: %s)",
                 (time.perf_counter() - started) * 1000, self.hypervisor.uri,
                 self.hypervisor.state.value)

    def _metrics(self, methods: Iterable[str]) -> Metrics:
        metrics = Metrics(methods)
        metrics.events.attach(self.bus)
        metrics.add_collector(AgentCollector(metrics.requests, metrics.events, self.stats,
                                             lambda: self.hypervisor.connected))
        stats = self.stats
        metrics.add_collector(HostCollector(stats), version=lambda: stats.host_generation)
        vms = self.vms
        metrics.add_collector(VmCollector(stats, vms.view),
                              version=lambda: (stats.vm_generation, vms.generation))
        metrics.add_collector(VmStaleCollector(stats))
        metrics.add_collector(StorageCollector(self.storage.results))
        metrics.add_collector(ProcessCollector(registry=None))  # process_* of the agent
        metrics.add_collector(ServicesCollector(
            lambda: self.events.subscriber_count if self.events is not None else 0,
            self.jobs.counts,
            lambda: [(link.where, link.up) for link in self.uplinks.links]))
        return metrics

    def _reached_on(self) -> list[str]:
        """The local addresses clients reach the agent on now (not loopback)."""
        return self.server.local_addresses() if self.server is not None else []

    def health(self) -> JsonObject:
        """What ``GET /healthz`` reports."""
        hv = self.hypervisor
        health: JsonObject = {
            "status": "ok" if hv.connected and not self.vms.recovering else "degraded",
            "recovering": self.vms.recovering,
            "hypervisor": {"uri": hv.uri, "state": hv.state.value, "reason": hv.reason},
        }
        if self.uplinks.links:
            health["uplinks"] = self.uplinks.status()
        return health

    async def stop(self) -> None:
        """Stop in stages, each bounded by a timeout. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        stage_timeout = self.config.server.stage_timeout
        server, dispatcher = self.server, self.dispatcher
        async with _stage("close uplinks", stage_timeout):
            await self.uplinks.stop()
        if server is not None:
            async with _stage("stop accepting", stage_timeout):
                await server.stop_accepting()
        if dispatcher is not None:
            dispatcher.refuse_new()
        # Before the drain: interrupted jobs are recorded, and Job.wait calls answer.
        async with _stage("stop running jobs", stage_timeout):
            await self.jobs.close()
        if dispatcher is not None and not await dispatcher.drain(
                self.config.server.drain_timeout):
            log.warning("stop: %d calls still running after %.1fs; cancelling them",
                        dispatcher.inflight, self.config.server.drain_timeout)
        async with _stage("close the device monitor", stage_timeout):
            # Before the connections close, so device events still waiting reach them.
            await self.devices.close()
            await self.bus.flush()
        if server is not None:
            async with _stage("cancel calls and close connections", stage_timeout):
                await server.close_sessions()
        async with _stage("stop sampling statistics", stage_timeout):
            await self.stats.close()
        async with _stage("stop the storage domain monitors", stage_timeout):
            self.volumes.close()
            await self.storage.close()
        async with _stage("stop the network monitor", stage_timeout):
            await self.network.close()
        async with _stage("close the hypervisor connection", stage_timeout):
            await self.migrations.close()
            await self.consoles.close()
            await self.vms.close()
            await self.hypervisor.close()
        if server is not None:
            async with _stage("release listeners", stage_timeout):
                await server.close()
        async with _stage("write the last events and close the state store", stage_timeout):
            if self.events is not None:
                self.events.close()
            await self.bus.flush()
            await self.store.close()
        log.info("virtnode stopped")


def _open_state_dir(path: Path) -> str:
    """Make or check the state directory and return the host id kept in it. Blocking.

    Raises :class:`ConfigError` naming ``state.dir`` when the directory cannot be used:
    nothing in it is the agent's to repair, and the operator chose where it is.
    """
    try:
        prepare_state_dir(path)
        return load_host_id(path)
    except StoreError as exc:
        raise ConfigError(f"state.dir: {exc}") from None
    except OSError as exc:
        where = exc.filename or path
        raise ConfigError(f"state.dir: {path}: cannot use {where}: {exc.strerror}") from None


@contextlib.asynccontextmanager
async def _stage(name: str, timeout: float) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        pending = [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        log.error("stop: stage %r timed out after %.1fs; still running: %s",
                  name, timeout, ", ".join(sorted(pending)) or "nothing")


async def serve(config: Config) -> None:
    """Run an agent until SIGTERM or SIGINT, then stop it."""
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    AcceptErrors.install(loop)
    descriptors = raise_descriptor_limit()
    log.info("open file descriptor limit: %d", descriptors)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await agent.start()
    if not gc.isenabled():  # turned off for the start by virtnode.command
        gc.freeze()  # what the start made lives as long as the agent: never scan it again
        gc.enable()
    try:
        await stop.wait()
        log.info("stopping on signal")
    finally:
        await agent.stop()


class _RemotePeer:
    """Another agent over the client library: its errors raised as the API's own."""

    def __init__(self, client: Client, url: str) -> None:
        self._client = client
        self._url = url

    async def call(self, method: str, params: JsonObject | None = None, *,
                   timeout: float | None = None) -> JsonObject:
        try:
            return await self._client.call(method, params, timeout=timeout)
        except RemoteError as exc:
            error = ERRORS_BY_NAME.get(exc.name, Internal)
            details = {k: v for k, v in exc.data.items()
                       if k not in ("name", "reason", "object", "id")}
            raise error(f"{self._url}: {exc.message}", reason=exc.data.get("reason"),
                        object=exc.data.get("object"), id=exc.data.get("id"),
                        **details) from None
        except ClientError as exc:
            raise Unavailable(f"the agent at {self._url} went away: {exc}",
                              reason="peer_lost") from None

    async def close(self) -> None:
        await self._client.close()


def peer_connector(tls: TlsConfig) -> PeerConnector:
    """Reach another agent with this agent's own certificate (tls.cert_file/key_file),
    trusting tls.ca_file, as engines reach this one."""
    async def connect(url: str, timeout: float) -> Peer:
        if not (tls.cert_file and tls.key_file and tls.ca_file):
            raise FailedPrecondition(
                "reaching another agent needs tls.cert_file, tls.key_file and tls.ca_file",
                reason="destination_unreachable", destination=url)
        try:
            context = await asyncio.to_thread(tls_context, tls.ca_file, tls.cert_file,
                                              tls.key_file)
            client = await Client.connect(url, timeout=timeout, tls=context)
        except (ClientError, OSError, ValueError) as exc:
            raise FailedPrecondition(f"cannot reach the agent at {url}: {exc}",
                                     reason="destination_unreachable",
                                     destination=url) from None
        return _RemotePeer(client, url)

    return connect
