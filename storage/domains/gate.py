"""One storage domain's reader/writer discipline.

Operations on a domain's volumes (create, delete, resize, and the copy and merge jobs for
as long as they run) hold the domain *shared* through a :class:`Lease`; deleting or
detaching the domain holds it *exclusive*: new leases wait while it does, and it waits
until the leases held have been given back. A lease taken after the domain was deleted or
detached is refused with NotFound, so a volume call never meets a domain whose directory
is being removed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from virtnode.errors import FailedPrecondition, NotFound


@dataclass(eq=False)
class Lease:
    """A shared hold on a domain; a job that took one over (``taken``) names itself in
    ``job_id`` once it runs."""

    gate: DomainGate
    what: str
    job_id: str | None = None
    taken: bool = False

    def release(self) -> None:
        """Give the hold back; idempotent, never waits."""
        self.gate._release(self)


class DomainGate:
    """The shared and exclusive holds of one domain."""

    def __init__(self, sd_id: str) -> None:
        self.sd_id = sd_id
        self.closed = False  # deleted or detached: no lease is given any more
        self._leases: set[Lease] = set()
        self._open = asyncio.Event()  # cleared while held exclusive
        self._open.set()
        self._idle = asyncio.Event()  # set while no lease is held
        self._idle.set()

    async def enter(self, what: str) -> Lease:
        """Take a shared hold, waiting while the domain is held exclusive. Raises NotFound
        (``not_attached``) once the domain is gone."""
        while not self._open.is_set():
            await self._open.wait()
        if self.closed:
            raise NotFound(f"storage domain {self.sd_id} is not attached",
                           object="storage_domain", id=self.sd_id, reason="not_attached")
        lease = Lease(self, what)
        self._leases.add(lease)
        self._idle.clear()
        return lease

    @contextlib.asynccontextmanager
    async def shared(self, what: str) -> AsyncIterator[Lease]:
        lease = await self.enter(what)
        try:
            yield lease
        finally:
            lease.release()

    @contextlib.asynccontextmanager
    async def exclusive(self, *, force: bool, timeout: float,
                        cancel_job: Callable[[str], Awaitable[object]]) -> AsyncIterator[None]:
        """Hold the domain exclusive: the jobs holding it are cancelled with ``force``
        (waited for by ``cancel_job``), else refused; then the calls holding it are waited
        for up to ``timeout``. Raises FailedPrecondition (``domain_busy``, data ``jobs``).
        Whoever removes the domain sets :attr:`closed` before leaving."""
        self._open.clear()
        try:
            jobs = sorted({lease.job_id for lease in self._leases if lease.job_id})
            if jobs and not force:
                raise self._busy(f"jobs work on it ({', '.join(jobs)}); wait for them, "
                                 "cancel them, or use force", jobs)
            for job_id in jobs:
                await cancel_job(job_id)
            try:
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
            except TimeoutError:
                held = sorted(lease.what for lease in self._leases)
                raise self._busy(f"still in use after {timeout:g}s ({', '.join(held)})",
                                 sorted({lease.job_id for lease in self._leases
                                         if lease.job_id})) from None
            yield
        finally:
            self._open.set()

    def _busy(self, why: str, jobs: list[str]) -> FailedPrecondition:
        return FailedPrecondition(f"storage domain {self.sd_id} is busy: {why}",
                                  reason="domain_busy", object="storage_domain", id=self.sd_id,
                                  jobs=jobs)

    def _release(self, lease: Lease) -> None:
        self._leases.discard(lease)
        if not self._leases:
            self._idle.set()
