"""One VM's serial console as the agent holds it: the stream, the recent output, the
clients it fans out to.

The agent opens the console of every running VM whose console is a pty, and keeps it open
while the VM runs: when libvirt ends the stream (a ``virsh console --force`` took it, the
hypervisor connection dropped) it opens it again, backing off up to
:data:`RETRY_MAX` seconds, until the VM stops or its console cannot be had
(``console_not_pty``). Output goes to the ring (:class:`ConsoleLog`) and to every client;
a client is fed without waiting and bounds its own backlog.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from virtnode.errors import ApiError, FailedPrecondition, NotFound
from virtnode.hypervisor.streams import ConsoleStream
from virtnode.vm.consolelog import ConsoleLog

log = logging.getLogger(__name__)

RETRY_MIN = 0.5
RETRY_MAX = 5.0
#: Bytes typed into a console that wait for libvirt before a writer's input is paused.
INPUT_BACKLOG = 64 * 1024

DataFn = Callable[[bytes], None]
EndFn = Callable[[str], None]
#: Opens the VM's console stream, or raises (FailedPrecondition console_not_pty,
#: console_busy, vm_not_running; NotFound; Unavailable).
Opener = Callable[[DataFn, EndFn], Awaitable[ConsoleStream]]


class ConsoleClient(Protocol):
    """A client attached to a VM's console (a WebSocket of the RPC edge)."""

    identity: str
    writer: bool

    def feed(self, data: bytes) -> None:
        """Queue output for the client; never waits (the client bounds its queue)."""

    def end(self, code: int, reason: str) -> None:
        """Close the client's connection (soon; never waits)."""


class SerialConsole:
    """The serial console of one VM, open while it runs."""

    def __init__(self, vm_id: str, log_size: int, opener: Opener) -> None:
        self.vm_id = vm_id
        self.log = ConsoleLog(log_size)
        self.clients: set[ConsoleClient] = set()
        self._opener = opener
        self._stream: ConsoleStream | None = None
        self._task: asyncio.Task[None] | None = None
        #: attached | opening | busy | unavailable | stopped
        self.state = "stopped"
        self.reason = "the VM is not running"

    @property
    def attached(self) -> bool:
        return self._stream is not None

    def run(self, *, fresh: bool) -> None:
        """Hold the console while the VM runs; ``fresh``: a new boot, forget the log."""
        if fresh:
            self.log.clear()
        if self._task is None or self._task.done():
            self.state, self.reason = "opening", "opening the console"
            self._task = asyncio.create_task(self._keep_open(),
                                             name=f"serial console {self.vm_id}")

    async def stop(self, reason: str) -> None:
        """Let go of the console (the VM stopped, or the agent stops)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()
        self.state, self.reason = "stopped", reason

    async def write(self, data: bytes) -> bool:
        """Type ``data`` into the console; waits while libvirt is behind. False when the
        agent does not hold the console now (the bytes are dropped)."""
        stream = self._stream
        if stream is None:
            return False
        stream.write(data)
        if stream.pending > INPUT_BACKLOG:
            await stream.drained()
        return True

    def _output(self, data: bytes) -> None:
        self.log.append(data)
        for client in list(self.clients):
            client.feed(data)

    async def _keep_open(self) -> None:
        delay = RETRY_MIN
        while True:
            ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

            def on_end(reason: str, ended: asyncio.Future[str] = ended) -> None:
                if not ended.done():
                    ended.set_result(reason)

            try:
                stream = await self._opener(self._output, on_end)
            except (NotFound, FailedPrecondition) as exc:
                if exc.reason != "console_busy":
                    self.state, self.reason = "unavailable", exc.message
                    log.info("serial console of %s: %s", self.vm_id, exc.message)
                    return
                self.state, self.reason = "busy", exc.message
            except ApiError as exc:
                self.state, self.reason = "opening", exc.message
                if exc.name == "Unavailable":
                    return  # the connection is down; the agent opens it again on reconnect
                if exc.name == "Unimplemented":
                    self.state = "unavailable"  # a hypervisor without consoles
                    return
                log.warning("cannot open the serial console of %s: %s", self.vm_id, exc)
            else:
                self._stream = stream
                self.state, self.reason = "attached", "the agent holds the console"
                stream.start()
                delay = RETRY_MIN
                try:
                    why = await ended
                finally:
                    self._stream = None
                    await stream.close()
                log.info("serial console of %s ended: %s; opening it again", self.vm_id, why)
                self.state, self.reason = "opening", why
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
