"""Per-VM serialisation of mutating calls, in arrival order."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from virtnode.errors import Aborted
from virtnode.util.aio import KeyedLocks, LockTimeout


@dataclass
class Operation:
    """A mutating call holding a VM."""

    id: str
    method: str
    started: float

    def describe(self) -> dict[str, object]:
        return {"id": self.id, "method": self.method,
                "running_seconds": round(time.monotonic() - self.started, 3)}


class VmLocks:
    """One FIFO lock per VM; waiting longer than ``wait`` seconds answers ``Aborted``."""

    def __init__(self, wait: float) -> None:
        self._wait = wait
        self._locks = KeyedLocks()
        self._holders: dict[str, Operation] = {}

    def holder(self, vm_id: str) -> Operation | None:
        return self._holders.get(vm_id)

    @contextlib.asynccontextmanager
    async def hold(self, vm_id: str, method: str,
                   wait: float | None = None) -> AsyncIterator[Operation]:
        """Hold ``vm_id`` for ``method``; raises :class:`Aborted` naming the operation
        in progress when the wait runs out."""
        try:
            async with self._locks.hold(vm_id, self._wait if wait is None else wait):
                operation = Operation(str(uuid.uuid4()), method, time.monotonic())
                self._holders[vm_id] = operation
                try:
                    yield operation
                finally:
                    del self._holders[vm_id]
        except LockTimeout as exc:
            if exc.key != vm_id:
                raise
            busy = self._holders.get(vm_id)
            raise Aborted(
                f"vm {vm_id} is busy with {busy.method if busy else 'another call'}",
                reason="vm_busy", object="vm", id=vm_id,
                operation=busy.describe() if busy else None,
            ) from None
