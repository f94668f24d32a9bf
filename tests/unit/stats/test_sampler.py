"""The statistics sampler's bookkeeping, on a hypervisor stand-in: no libvirt."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from virtnode.config import StatsConfig
from virtnode.errors import DeadlineExceeded
from virtnode.events.bus import EventBus
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor import domstats
from virtnode.hypervisor.connection import DomainEvent
from virtnode.stats.sampler import StatsSampler, VmEntry

VM = "0d4f6a3e-0000-4000-8000-000000000001"


class NoSlotHypervisor:
    """Every call misses its deadline while waiting for a pool slot: nothing runs."""

    connected = True

    def __init__(self) -> None:
        self.hooks: list[Callable[[Any], Any]] = []

    def add_connect_hook(self, hook: Callable[[Any], Any]) -> None:
        self.hooks.append(hook)

    def add_domain_listener(self, _listener: Callable[[DomainEvent], None]) -> None:
        pass

    async def call(self, _fn: Callable[[Any], Any], *, timeout: float | None = None,
                   what: str = "") -> Any:
        raise DeadlineExceeded(f"{what}: no pool slot within {timeout}s")


def sampler(hypervisor: Any) -> StatsSampler:
    return StatsSampler(StatsConfig(), hypervisor, EventBus(), pool_size=4)


async def test_a_probe_that_never_ran_leaves_the_vm_probeable() -> None:
    stats = sampler(NoSlotHypervisor())
    assert await stats._is_stuck(VM, object())
    assert VM not in stats._probing


def test_a_stopped_vm_leaves_the_cache_and_raises_its_generation() -> None:
    stats = sampler(NoSlotHypervisor())
    stats.vms[VM] = VmEntry({}, {"vm_id": VM, "name": "a"}, 0.0)
    generation = stats.vm_generation
    stats._on_domain_event(DomainEvent("lifecycle", VM, "a", vc.DOMAIN_EVENT_STOPPED))
    assert VM not in stats.vms
    assert stats.vm_generation > generation, "/metrics would keep serving the stopped VM"



async def test_a_reconnect_forgets_what_the_old_connection_left() -> None:
    hypervisor = NoSlotHypervisor()
    stats = sampler(hypervisor)
    await stats.start()  # registers its hooks; samples the host once
    await stats.close()
    stats._handles = {VM: object()}
    stats._stuck = {VM: 0.0}
    stats._new = {VM}
    for hook in hypervisor.hooks:
        await hook(None)
    assert not stats._handles and not stats._stuck and not stats._new, \
        "the next cycle would sample the old connection's handles instead of listing"


def test_records_carry_each_nic_s_bridge() -> None:
    class Dom:
        def UUIDString(self) -> str:  # noqa: N802 - libvirt's name
            return VM

        def name(self) -> str:
            return "a"

    stats = {"state.state": vc.DOMAIN_RUNNING, "net.0.name": "vn-no-such-nic", "net.1.name": "lo"}
    ((_, _, raw, _),) = domstats._records([(Dom(), stats)])
    assert raw["net.0.bridge"] == "" and raw["net.1.bridge"] == ""
