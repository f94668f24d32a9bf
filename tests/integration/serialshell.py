"""Type commands into a test guest's serial shell and read their answers.

The ``console`` guest of :mod:`tests.guests` runs a root shell on its serial port. This
talks to it as a person would: through the agent's serial console (``VM.openConsole``,
then the WebSocket at its URL), whose ring buffer replays the boot first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import AsyncIterator
from typing import Protocol

from tests import guests
from tests.agentproc import AgentProcess
from tests.integration.consoleclient import console
from virtnode.client import Client

#: The console guest's shell prompt.
PROMPT = b"guest# "


class Terminal(Protocol):
    """A serial console as the shell talks to it: the output so far, more of it, input."""

    output: bytearray

    async def receive(self) -> object:
        """Append what the guest wrote next to ``output``."""
        ...

    async def send(self, data: bytes) -> None: ...


class SerialShell:
    """Commands typed into the guest's shell over a :class:`Terminal` (the agent's serial
    console WebSocket, or the serial port's own socket)."""

    def __init__(self, socket: Terminal) -> None:
        self.socket = socket
        self._numbers = itertools.count(1)

    async def _read(self, until: re.Pattern[bytes], timeout: float,
                    start: int) -> re.Match[bytes]:
        output = self.socket.output
        try:
            async with asyncio.timeout(timeout):
                while (found := until.search(output, start)) is None:
                    await self.socket.receive()
        except TimeoutError:
            tail = bytes(output[-2000:]).decode(errors="replace")
            raise TimeoutError(f"no {until.pattern!r} on the serial console in {timeout} s; "
                               f"it ends with:\n{tail}") from None
        return found

    async def wait_prompt(self, tries: int = 20) -> None:
        """Press Enter until the shell prompts: getty drops what was typed before it ran."""
        prompt = re.compile(re.escape(PROMPT))
        for _ in range(tries):
            start = len(self.socket.output)
            await self.socket.send(b"\r")
            try:
                await self._read(prompt, 1.0, start)
                return
            except TimeoutError:
                continue
        raise TimeoutError("the guest's shell never prompted; its console ends with:\n"
                           f"{bytes(self.socket.output[-2000:]).decode(errors='replace')}")

    async def run(self, command: str, timeout: float = 30) -> tuple[int, str]:
        """Run ``command`` in the guest's shell: ``(exit status, output)``."""
        number = next(self._numbers)
        start = len(self.socket.output)
        # The shell echoes the line as typed ("$?" unexpanded); only the answer has digits.
        await self.socket.send(f"{command}; echo VN-END-{number}-$?\r".encode())
        done = re.compile(rb"VN-END-%d-(\d+)\r?\n" % number)
        found = await self._read(done, timeout, start)
        output = self.socket.output
        typed = output.find(b"VN-END-%d-$?" % number, start)
        echo_end = output.find(b"\n", typed)
        answer = bytes(output[echo_end + 1:found.start()]) if 0 <= echo_end < found.start() \
            else b""
        return int(found[1]), answer.decode(errors="replace").replace("\r\n", "\n")


@contextlib.asynccontextmanager
async def serial_shell(agent: AgentProcess, client: Client, vm_id: str, *,
                       booted: bool = False) -> AsyncIterator[SerialShell]:
    """The serial shell of a running console guest, once it has booted and prompts
    (with ``booted``, a guest known to have booted already: only the prompt is waited
    for; its boot may have been before this agent ran)."""
    grant = await client.call("VM.openConsole", {"vm_id": vm_id, "kind": "serial",
                                                 "takeover": "disconnect"})
    async with console(agent, grant["url"], via="unix") as socket:
        shell = SerialShell(socket)
        if not booted:
            await shell._read(re.compile(re.escape(guests.GUEST_READY.encode())), 120, 0)
        await shell.wait_prompt()
        # Without a size the shell wraps what it echoes at 80 columns.
        await shell.run("stty cols 4000")
        yield shell
