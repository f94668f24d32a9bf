"""Per-VM serialisation of mutating calls, in arrival order."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from virtnode.errors import Aborted


@dataclass
class Operation:
    """A mutating call holding a VM."""

    id: str
    method: str
    started: float

    def describe(self) -> dict[str, object]:
        return {"id": self.id, "method": self.method,
                "running_seconds": round(time.monotonic() - self.started, 3)}


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    holder: Operation | None = None
    users: int = 0


class VmLocks:
    """One FIFO lock per VM; waiting longer than ``wait`` seconds answers ``Aborted``."""

    def __init__(self, wait: float) -> None:
        self._wait = wait
        self._slots: dict[str, _Slot] = {}

    def holder(self, vm_id: str) -> Operation | None:
        slot = self._slots.get(vm_id)
        return None if slot is None else slot.holder

    @contextlib.asynccontextmanager
    async def hold(self, vm_id: str, method: str,
                   wait: float | None = None) -> AsyncIterator[Operation]:
        """Hold ``vm_id`` for ``method``; raises :class:`Aborted` naming the operation
        in progress when the wait runs out."""
        slot = self._slots.setdefault(vm_id, _Slot())
        slot.users += 1
        try:
            try:
                async with asyncio.timeout(self._wait if wait is None else wait):
                    await slot.lock.acquire()
            except TimeoutError:
                busy = slot.holder
                raise Aborted(
                    f"vm {vm_id} is busy with {busy.method if busy else 'another call'}",
                    reason="vm_busy", object="vm", id=vm_id,
                    operation=busy.describe() if busy else None,
                ) from None
            operation = Operation(str(uuid.uuid4()), method, time.monotonic())
            slot.holder = operation
            try:
                yield operation
            finally:
                slot.holder = None
                slot.lock.release()
        finally:
            slot.users -= 1
            if not slot.users:
                self._slots.pop(vm_id, None)
