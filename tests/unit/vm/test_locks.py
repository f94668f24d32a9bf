"""Per-VM locks: arrival order, Aborted with the operation in progress, no leaks."""

from __future__ import annotations

import asyncio
import time

import pytest

from virtnode.errors import Aborted
from virtnode.vm.locks import VmLocks

VM = "6f1c2d3e-0000-4000-8000-000000000001"
OTHER = "6f1c2d3e-0000-4000-8000-000000000002"


async def settle() -> None:
    """Let every ready task run until it blocks (no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


def slots(locks: VmLocks) -> dict[str, object]:
    """The per-VM state the locks keep (nothing once every holder and waiter is gone)."""
    return {**locks._locks._locks, **locks._holders}


class Holder:
    """Holds a VM in a task until released."""

    def __init__(self, locks: VmLocks, vm_id: str, method: str) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.task = asyncio.create_task(self._run(locks, vm_id, method))

    async def _run(self, locks: VmLocks, vm_id: str, method: str) -> None:
        async with locks.hold(vm_id, method):
            self.entered.set()
            await self.release.wait()

    async def done(self) -> None:
        self.release.set()
        await self.task


async def test_one_call_holds_a_vm() -> None:
    locks = VmLocks(wait=1)
    assert locks.holder(VM) is None
    async with locks.hold(VM, "VM.start") as operation:
        holder = locks.holder(VM)
        assert holder is operation
        assert holder.method == "VM.start"
        assert holder.describe()["method"] == "VM.start"
    assert locks.holder(VM) is None
    assert slots(locks) == {}


async def test_a_second_call_waits_for_the_first() -> None:
    locks = VmLocks(wait=5)
    first = Holder(locks, VM, "VM.shutdown")
    await first.entered.wait()
    second = Holder(locks, VM, "VM.start")
    await settle()
    assert not second.entered.is_set()
    assert locks.holder(VM).method == "VM.shutdown"
    await first.done()
    await second.entered.wait()
    assert locks.holder(VM).method == "VM.start"
    await second.done()
    assert slots(locks) == {}


async def test_waiters_get_the_vm_in_arrival_order() -> None:
    locks = VmLocks(wait=5)
    order: list[str] = []

    async def call(method: str) -> None:
        async with locks.hold(VM, method):
            order.append(method)

    first = Holder(locks, VM, "VM.create")
    await first.entered.wait()
    tasks = []
    for method in ("VM.start", "VM.setMemory", "VM.shutdown"):
        tasks.append(asyncio.create_task(call(method)))
        await settle()
    assert order == []
    await first.done()
    await asyncio.gather(*tasks)
    assert order == ["VM.start", "VM.setMemory", "VM.shutdown"]
    assert slots(locks) == {}


async def test_waiting_too_long_is_aborted_naming_the_operation() -> None:
    locks = VmLocks(wait=0.05)
    first = Holder(locks, VM, "VM.shutdown")
    await first.entered.wait()
    started = time.monotonic()
    with pytest.raises(Aborted) as caught:
        async with locks.hold(VM, "VM.start"):
            pytest.fail("entered a held VM")
    assert 0.04 <= time.monotonic() - started < 0.3
    error = caught.value.to_error()
    assert error["code"] == 10
    data = error["data"]
    assert data["name"] == "Aborted"
    assert data["reason"] == "vm_busy"
    assert (data["object"], data["id"]) == ("vm", VM)
    assert data["operation"]["method"] == "VM.shutdown"
    assert data["operation"]["id"] == locks.holder(VM).id
    assert data["operation"]["running_seconds"] >= 0.04
    assert "VM.shutdown" in error["message"]
    # The holder is untouched and the slot goes away with it.
    assert locks.holder(VM).method == "VM.shutdown"
    await first.done()
    assert slots(locks) == {}


async def test_a_per_call_wait_overrides_the_default() -> None:
    locks = VmLocks(wait=30)
    first = Holder(locks, VM, "VM.migrate")
    await first.entered.wait()
    started = time.monotonic()
    with pytest.raises(Aborted):
        async with locks.hold(VM, "VM.getInfo", wait=0.02):
            pass
    assert time.monotonic() - started < 0.2
    await first.done()


async def test_other_vms_are_not_blocked() -> None:
    locks = VmLocks(wait=0.05)
    first = Holder(locks, VM, "VM.shutdown")
    await first.entered.wait()
    started = time.monotonic()
    async with locks.hold(OTHER, "VM.start") as operation:
        assert locks.holder(OTHER) is operation
        assert locks.holder(VM).method == "VM.shutdown"
    assert time.monotonic() - started < 0.04
    assert set(slots(locks)) == {VM}
    await first.done()
    assert slots(locks) == {}


async def test_an_error_inside_releases_the_vm() -> None:
    locks = VmLocks(wait=0.05)
    with pytest.raises(RuntimeError):
        async with locks.hold(VM, "VM.start"):
            raise RuntimeError("boom")
    assert locks.holder(VM) is None
    assert slots(locks) == {}
    async with locks.hold(VM, "VM.start"):
        pass


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    locks = VmLocks(wait=5)
    first = Holder(locks, VM, "VM.shutdown")
    await first.entered.wait()
    waiter = Holder(locks, VM, "VM.start")
    last = Holder(locks, VM, "VM.destroy")
    await settle()
    waiter.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter.task
    assert not waiter.entered.is_set()
    await first.done()
    await last.entered.wait()  # the next in line gets the VM
    await last.done()
    assert slots(locks) == {}


async def test_cancelled_right_after_being_woken_passes_the_vm_on() -> None:
    locks = VmLocks(wait=5)
    async with locks.hold(VM, "VM.shutdown"):
        woken = Holder(locks, VM, "VM.start")
        last = Holder(locks, VM, "VM.destroy")
        await settle()
    # Leaving the block woke the next waiter, which has not run yet: cancel it now.
    woken.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await woken.task
    assert not woken.entered.is_set()
    await asyncio.wait_for(last.entered.wait(), 1)
    await last.done()
    assert slots(locks) == {}


async def test_cancelled_holder_releases_the_vm() -> None:
    locks = VmLocks(wait=5)
    first = Holder(locks, VM, "VM.shutdown")
    await first.entered.wait()
    first.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first.task
    assert locks.holder(VM) is None
    assert slots(locks) == {}
