"""The statistics sampler: the one owner of host and VM statistics.

It samples the host (psutil) every ``stats.host_interval`` and the VMs (one bulk libvirt
call) every ``stats.vm_interval``, computes rates from consecutive samples, keeps the
last hour of host samples, and publishes ``stats.host`` and ``stats.vm`` after each cycle.
API methods and ``/metrics`` read its cache; none of them calls libvirt.

A VM whose monitor does not answer (a stopped QEMU) would hold the bulk call forever. When
the call misses its deadline the sampler finds the stuck VMs, leaves them out of later
calls and reports them with their last values and ``stale_seconds`` until they answer
again; see docs/architecture.md, "Statistics".
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from virtnode.api_schema.params import HostGetStatsHistoryParams, VmGetStatsParams
from virtnode.config import StatsConfig
from virtnode.errors import ApiError, DeadlineExceeded, Unavailable
from virtnode.events.bus import EventBus
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor import domstats
from virtnode.hypervisor.connection import DomainEvent, Hypervisor
from virtnode.hypervisor.handles import Connection, Domain
from virtnode.stats import host as hoststats
from virtnode.stats.rates import (
    downsample,
    host_stats,
    parse_domain,
    vm_stats,
)
from virtnode.stats.summary import host_summary, vm_summary
from virtnode.util.jsontypes import JsonObject

log = logging.getLogger(__name__)

T = TypeVar("T")

HOST_TOPIC = "stats.host"
VM_TOPIC = "stats.vm"
_STUCK_STATES = (vc.DOMAIN_CONTROL_OCCUPIED, vc.DOMAIN_CONTROL_ERROR)


class CallTracker:
    """Counts the sampler's libvirt calls still running past their deadline.

    A call that misses its deadline keeps its pool thread until libvirt returns; the
    sampler stops making calls while too many of its own are in that state, so it never
    takes more than half of the pool from the other services.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, float] = {}
        self._ids = itertools.count()

    def wrap(self, fn: Callable[[Connection], T], deadline: float) -> Callable[[Connection], T]:
        def run(conn: Connection) -> T:
            token = next(self._ids)
            with self._lock:
                self._running[token] = time.monotonic() + deadline
            try:
                return fn(conn)
            finally:
                with self._lock:
                    del self._running[token]

        return run

    def overdue(self) -> int:
        """How many tracked calls are still running past their deadline."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for ends in self._running.values() if ends < now)


@dataclass
class VmEntry:
    counters: JsonObject
    stats: JsonObject
    sampled: float  # monotonic time of the last fresh sample
    fresh: bool = True


@dataclass
class CycleStats:
    """What /metrics reports about one kind of sampling cycle."""

    count: int = 0
    seconds: float = 0.0
    last_seconds: float = 0.0
    failed: int = 0


class StatsSampler:
    """Owns statistics collection; everyone else reads its cache."""

    def __init__(self, config: StatsConfig, hypervisor: Hypervisor, bus: EventBus, *,
                 pool_size: int, paths: Sequence[str] = ()) -> None:
        self._config = config
        self._hv = hypervisor
        self._bus = bus
        #: The filesystems whose usage the host samples report (the agent's state dir).
        self._paths = tuple(paths)
        self._host_raw: JsonObject | None = None
        self.host: JsonObject | None = None
        self.history: deque[JsonObject] = deque(
            maxlen=max(1, int(config.history // config.host_interval)))
        self.vms: dict[str, VmEntry] = {}
        self.vm_time: float | None = None
        #: VMs left out of the bulk call, with the monotonic time they were last probed.
        self._stuck: dict[str, float] = {}
        #: Domain handles of the VMs sampled last, to sample them without listing.
        self._handles: dict[str, Domain] = {}
        #: VMs started since the last listing (from lifecycle events).
        self._new: set[str] = set()
        #: VMs with a probe still running in a pool thread.
        self._probing: set[str] = set()
        self._tracker = CallTracker()
        self._max_overdue = max(2, pool_size // 2)
        self.cycles = {"host": CycleStats(), "vm": CycleStats()}
        #: Raised whenever :attr:`host` or :attr:`vms` change (what /metrics caches on);
        #: :attr:`vms` changes only through :meth:`_put_vm` and :meth:`_drop_vm`.
        self.host_generation = 0
        self.vm_generation = 0
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def interval(self) -> float:
        return self._config.host_interval

    @property
    def host_cores(self) -> list[dict[str, float]]:
        """Cumulative times of each host CPU, by mode, from the latest sample."""
        return list(self._host_raw["cores"]) if self._host_raw is not None else []

    @property
    def overdue_calls(self) -> int:
        return self._tracker.overdue()

    def stale_seconds(self, entry: VmEntry) -> float:
        return 0.0 if entry.fresh else round(time.monotonic() - entry.sampled, 1)

    def vm_record(self, entry: VmEntry) -> JsonObject:
        """A VM's stats as the API gives them, with its current staleness."""
        return {**entry.stats, "stale_seconds": self.stale_seconds(entry)}

    async def start(self) -> None:
        """Take the first host sample, then sample in the background."""
        self._hv.add_domain_listener(self._on_domain_event)
        self._hv.add_connect_hook(self._on_connect)
        await self._host_cycle()
        self._tasks = [
            asyncio.create_task(self._every("host", self._config.host_interval, self._host_cycle),
                                name="stats-host"),
            asyncio.create_task(self._every("vm", self._config.vm_interval, self._vm_cycle),
                                name="stats-vm"),
        ]

    async def close(self) -> None:
        """Stop sampling. Idempotent."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _every(self, kind: str, interval: float,
                     cycle: Callable[[], Awaitable[None]]) -> None:
        due = time.monotonic()
        while True:
            due += interval
            now = time.monotonic()
            if due < now:  # a cycle overran: skip the missed slots rather than catch up
                due = now + interval
            await asyncio.sleep(due - now)
            try:
                await cycle()
            except Exception:
                self.cycles[kind].failed += 1
                log.exception("%s statistics cycle failed", kind)

    def _record(self, kind: str, started: float) -> float:
        seconds = time.perf_counter() - started
        cycle = self.cycles[kind]
        cycle.count += 1
        cycle.seconds += seconds
        cycle.last_seconds = seconds
        return seconds

    # --- host -----------------------------------------------------------------------------

    async def _host_cycle(self) -> None:
        started = time.perf_counter()
        raw = await asyncio.to_thread(hoststats.collect, self._paths)
        stats = host_stats(self._host_raw, raw)
        self._host_raw, self.host = raw, stats
        self.host_generation += 1
        summary = host_summary(stats)
        self.history.append(summary)
        seconds = self._record("host", started)
        self._bus.publish(HOST_TOPIC, {**summary, "duration_seconds": round(seconds, 6)})

    # --- VMs ------------------------------------------------------------------------------

    async def _call(self, fn: Callable[[Connection], T], timeout: float, what: str) -> T:
        return await self._hv.call(self._tracker.wrap(fn, timeout), timeout=timeout, what=what)

    async def _vm_cycle(self) -> None:
        started = time.perf_counter()
        records = None
        overdue = self._tracker.overdue()
        if not self._hv.connected:
            pass  # keep the last values; they go stale
        elif overdue >= self._max_overdue:
            log.warning("%d VM statistics calls are still stuck; skipping this cycle", overdue)
        else:
            records = await self._collect()
        if records is None:
            self.cycles["vm"].failed += 1
            for entry in self.vms.values():
                entry.fresh = False
        else:
            self._update(records)
        seconds = self._record("vm", started)
        self._publish_vms(seconds)

    async def _collect(self) -> list[domstats.Record] | None:
        timeout = self._config.vm_timeout
        try:
            if self._stuck:
                await self._retry_stuck()
            if self._stuck:
                return await self._collect_others()
            self._new.clear()
            return await self._call(domstats.bulk, timeout, "reading VM statistics")
        except DeadlineExceeded:
            pass
        except ApiError as exc:
            log.warning("reading VM statistics failed: %s", exc)
            return None
        found = await self._find_stuck()
        if not found:
            log.warning("reading VM statistics took longer than %gs; no stuck VM found",
                        timeout)
            return None
        now = time.monotonic()
        for vm_id in found:
            self._stuck.setdefault(vm_id, now)
        log.warning("VMs not answering, left out of statistics until they do: %s",
                    ", ".join(sorted(found)))
        if self._tracker.overdue() >= self._max_overdue:
            return None
        try:  # the others still get fresh numbers in this cycle
            return await self._collect_others()
        except ApiError as exc:
            log.warning("reading VM statistics failed again: %s", exc)
            return None

    async def _collect_others(self) -> list[domstats.Record]:
        """Statistics of every VM but the stuck ones, by handle: nothing is listed."""
        doms = [dom for vm_id, dom in self._handles.items() if vm_id not in self._stuck]
        new = [vm_id for vm_id in self._new if vm_id not in self._handles]
        return await self._call(functools.partial(domstats.of, doms=doms, new_ids=new),
                                self._config.vm_timeout, "reading VM statistics")

    async def _is_stuck(self, vm_id: str, dom: Domain) -> bool:
        """Probe one VM's control interface with a short deadline.

        A probe that misses it waits on the lock a stuck call holds; a monitor occupied
        for longer than the bulk call could wait is stuck as well.
        """
        threshold_ms = min(1000.0, self._config.vm_timeout * 500)

        def probe(_conn: Connection) -> tuple[int, int] | None:
            # Marked only once the probe runs: a call that never got a pool slot leaves
            # nothing behind that would keep the VM from being probed again.
            self._probing.add(vm_id)
            try:
                return domstats.control_state(dom)
            finally:
                self._probing.discard(vm_id)

        try:
            state = await self._call(probe, self._config.probe_timeout, f"probing VM {vm_id}")
        except DeadlineExceeded:
            return True
        except ApiError:
            return False  # gone meanwhile, or failing for another reason: not stuck
        return state is not None and state[0] in _STUCK_STATES and state[1] >= threshold_ms

    async def _find_stuck(self) -> set[str]:
        """The VMs whose collection is stuck, probed one by one."""
        found = set()
        for vm_id, dom in list(self._handles.items()):
            if vm_id in self._stuck:
                continue
            if self._tracker.overdue() >= self._max_overdue:
                break
            if await self._is_stuck(vm_id, dom):
                found.add(vm_id)
        return found

    async def _retry_stuck(self) -> None:
        """Every ``stuck_retry`` seconds, probe each stuck VM again (one probe at a time)."""
        now = time.monotonic()
        for vm_id, since in list(self._stuck.items()):
            dom = self._handles.get(vm_id)
            if dom is None:
                del self._stuck[vm_id]
                continue
            if now - since < self._config.stuck_retry or vm_id in self._probing:
                continue
            if self._tracker.overdue() >= self._max_overdue:
                return
            self._stuck[vm_id] = now
            if not await self._is_stuck(vm_id, dom):
                log.info("VM %s answers again; sampling it again", vm_id)
                del self._stuck[vm_id]

    async def _on_connect(self, _conn: Connection) -> None:
        # The handles belong to the old connection, and what was stuck or new under it
        # says nothing of the new one: the next cycle lists every VM in one bulk call.
        self._handles.clear()
        self._stuck.clear()
        self._new.clear()

    def _on_domain_event(self, event: DomainEvent) -> None:
        if event.kind != "lifecycle":
            return
        if event.event == vc.DOMAIN_EVENT_STARTED:
            self._new.add(event.vm_id)
        elif event.event in (vc.DOMAIN_EVENT_STOPPED, vc.DOMAIN_EVENT_UNDEFINED):
            self._new.discard(event.vm_id)
            self._handles.pop(event.vm_id, None)
            self._stuck.pop(event.vm_id, None)
            self._drop_vm(event.vm_id)

    # Every change of :attr:`vms` goes through these two, so /metrics never serves a VM
    # that is gone or values that were replaced.

    def _put_vm(self, vm_id: str, entry: VmEntry) -> None:
        self.vms[vm_id] = entry
        self.vm_generation += 1

    def _drop_vm(self, vm_id: str) -> None:
        if self.vms.pop(vm_id, None) is not None:
            self.vm_generation += 1

    def _update(self, records: list[domstats.Record]) -> None:
        now, wall = time.monotonic(), time.time()
        handles = {vm_id: self._handles[vm_id] for vm_id in self._stuck
                   if vm_id in self._handles}
        for vm_id, name, raw, dom in records:
            handles[vm_id] = dom
            self._new.discard(vm_id)
            counters = parse_domain(raw)
            old = self.vms.get(vm_id)
            seconds = now - old.sampled if old is not None else 0.0
            stats = vm_stats(vm_id, name, old.counters if old else None, counters,
                             seconds=seconds, time=wall)
            self._put_vm(vm_id, VmEntry(counters, stats, now))
        self._handles = handles
        for vm_id in list(self.vms):
            if vm_id in self._stuck:
                self.vms[vm_id].fresh = False
            elif vm_id not in handles:
                self._drop_vm(vm_id)
        self.vm_time = wall

    def _publish_vms(self, seconds: float) -> None:
        summaries = [vm_summary(self.vm_record(e)) for e in self.vms.values()]
        self._bus.publish(VM_TOPIC, {
            "time": time.time(),
            "duration_seconds": round(seconds, 6),
            "stale_vms": sum(1 for s in summaries if s["stale_seconds"] > 0),
            "vms": summaries,
        })


class StatsService:
    """``Host.getStats``, ``Host.getStatsHistory`` and ``VM.getStats``: reads of the cache."""

    def __init__(self, sampler: StatsSampler,
                 storage: Callable[[], list[JsonObject]] = list) -> None:
        self.sampler = sampler
        #: The storage domains' latest monitor checks (a cache read, no I/O).
        self._storage = storage

    async def get_host_stats(self) -> JsonObject:
        if self.sampler.host is None:
            raise Unavailable("no host statistics yet", reason="not_sampled")
        return {**self.sampler.host, "storage_domains": self._storage()}

    async def get_history(self, params: HostGetStatsHistoryParams) -> JsonObject:
        since = params.get("since")
        interval = self.sampler.interval
        resolution = max(float(params.get("resolution") or interval), interval)
        samples = [s for s in self.sampler.history if since is None or s["time"] > since]
        if resolution > interval:
            samples = downsample(samples, resolution)
        return {"interval_seconds": interval, "resolution_seconds": resolution,
                "samples": samples}

    async def get_vm_stats(self, params: VmGetStatsParams) -> JsonObject:
        vms = self.sampler.vms
        wanted = params.get("vm_ids")
        if wanted is None:
            entries = list(vms.values())
            missing: list[str] = []
        else:
            ids = list(dict.fromkeys(v.lower() for v in wanted))
            entries = [vms[v] for v in ids if v in vms]
            missing = [v for v in ids if v not in vms]
        records = sorted((self.sampler.vm_record(e) for e in entries),
                         key=lambda r: (r["name"], r["vm_id"]))
        return {"time": self.sampler.vm_time, "vms": records, "missing": missing}
