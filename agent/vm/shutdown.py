"""Graceful shutdown as a plain state machine over a :class:`Guest`.

``VM.shutdown`` tries each requested method in order, keeps pressing the ACPI power
button while it waits (a guest still booting misses the first press), and falls back to
destroying the VM when asked. Where peers go wrong, this does not:

- libvirt's ``virDomainShutdown`` returns at once and never waits: here the call returns
  when the guest is off, or when ``timeout`` has passed;
- a method the guest cannot serve (no guest agent) is skipped at once, not waited on;
- a paused guest cannot handle ACPI or an agent, so it goes straight to the fallback
  instead of wasting the whole timeout;
- the ACPI press is repeated every ``acpi_interval`` seconds, so a guest stopped while
  booting still shuts down gracefully once its ACPI handler runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from virtnode.errors import ApiError, DeadlineExceeded, FailedPrecondition

METHODS = ("agent", "acpi")
FALLBACKS = ("destroy", "none")


class Guest(Protocol):
    """What shutting a guest down needs from the hypervisor."""

    async def state(self) -> str:
        """The agent's state name for the VM, ``removed`` when it no longer exists."""
        ...

    async def request(self, method: str) -> None:
        """Ask the guest to shut down with ``method``; raises ApiError if it cannot."""
        ...

    async def destroy(self) -> None: ...

    async def wait_stopped(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the VM to stop; True if it did."""
        ...


@dataclass(frozen=True)
class Outcome:
    stopped_by: str
    seconds: float
    tried: tuple[str, ...]


STOPPED = ("shutoff", "defined", "crashed", "removed")


async def shutdown(guest: Guest, *, methods: tuple[str, ...], timeout: float,
                   fallback: str, acpi_interval: float = 3.0) -> Outcome:
    """Shut ``guest`` down; returns which method stopped it.

    Raises :class:`FailedPrecondition` (``vm_not_running``) if it is not running,
    and :class:`DeadlineExceeded` (``shutdown_timeout``) when it is still running after
    ``timeout`` seconds and ``fallback`` is ``none``.
    """
    started = time.monotonic()
    deadline = started + timeout
    tried: list[str] = []
    state = await guest.state()
    if state in STOPPED:
        raise FailedPrecondition(f"the VM is not running (state {state})",
                                 reason="vm_not_running", object="vm")
    if state != "paused":
        for index, method in enumerate(methods):
            try:
                await guest.request(method)
            except ApiError:
                # Either the guest cannot serve it (try the next method at once) or it
                # stopped, or vanished, since the last look.
                if await guest.state() in STOPPED:
                    if tried:
                        return Outcome(tried[-1], time.monotonic() - started, tuple(tried))
                    raise FailedPrecondition("the VM stopped before it was asked to",
                                             reason="vm_not_running", object="vm") from None
                continue
            tried.append(method)
            last = index == len(methods) - 1
            remaining = deadline - time.monotonic()
            share = remaining if last else remaining / 2
            if await _wait(guest, method, time.monotonic() + share, acpi_interval):
                return Outcome(method, time.monotonic() - started, tuple(tried))
    if fallback == "destroy":
        if await guest.state() not in STOPPED:
            await guest.destroy()
        tried.append("destroy")
        return Outcome("destroy", time.monotonic() - started, tuple(tried))
    if state == "paused":
        raise FailedPrecondition("a paused VM cannot shut down gracefully; resume it or "
                                 "use fallback destroy", reason="vm_paused", object="vm")
    raise DeadlineExceeded(f"the guest did not shut down within {timeout:g}s",
                           reason="shutdown_timeout", object="vm", tried=tried)


async def _wait(guest: Guest, method: str, until: float, acpi_interval: float) -> bool:
    while (left := until - time.monotonic()) > 0:
        step = min(left, acpi_interval) if method == "acpi" else left
        if await guest.wait_stopped(step):
            return True
        if method == "acpi" and until - time.monotonic() > 0:
            try:
                await guest.request("acpi")
            except ApiError:
                # The VM may have stopped between the wait and the press.
                return await guest.state() in STOPPED
    return await guest.state() in STOPPED

