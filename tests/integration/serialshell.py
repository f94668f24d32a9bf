"""Type commands into a test guest's serial shell and read their answers.

The ``console`` guest of :mod:`tests.guests` runs a root shell on its serial port. Its
domain's serial device is a pty (what a spec's ``serial: true`` gives): this opens the pty
on the host, in raw mode, and talks to the shell through it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import select
import time
import tty
from dataclasses import dataclass, field

from lxml import etree

from tests import guests
from virtnode.client import Client

#: The console guest's shell prompt.
PROMPT = b"guest# "


@dataclass
class SerialShell:
    fd: int
    seen: bytearray = field(default_factory=bytearray)
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    async def open(cls, client: Client, vm_id: str) -> SerialShell:
        """The serial shell of a running VM, once the guest says it is ready."""
        xml = (await client.call("VM.getXML", {"vm_id": vm_id}))["xml"]
        source = etree.fromstring(xml).find("devices/serial[@type='pty']/source")
        assert source is not None, "the VM has no pty serial console"
        fd = os.open(source.get("path", ""), os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        shell = cls(fd)
        await shell.read_until(guests.GUEST_READY.encode(), 60)
        await shell.wait_prompt()
        # Without a size the shell wraps what it echoes at 80 columns.
        await shell.run("stty cols 4000")
        return shell

    def close(self) -> None:
        os.close(self.fd)

    def _read(self, until: re.Pattern[bytes], timeout: float, start: int) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            found = until.search(self.seen, start)
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                tail = self.seen[-2000:].decode(errors="replace")
                raise TimeoutError(f"no {until.pattern!r} on the serial console in "
                                   f"{timeout} s; it ends with:\n{tail}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.2))
            if ready:
                self.seen += os.read(self.fd, 65536)

    async def wait_prompt(self, tries: int = 20) -> None:
        """Press Enter until the shell prompts: getty drops what was typed before it ran."""
        prompt = re.compile(re.escape(PROMPT))
        for _ in range(tries):
            start = len(self.seen)
            os.write(self.fd, b"\r")
            try:
                await asyncio.to_thread(self._read, prompt, 1.0, start)
                return
            except TimeoutError:
                continue
        raise TimeoutError(f"the guest's shell never prompted; its console ends with:\n"
                           f"{self.seen[-2000:].decode(errors='replace')}")

    async def read_until(self, marker: bytes, timeout: float) -> None:
        await asyncio.to_thread(self._read, re.compile(re.escape(marker)), timeout, 0)

    async def run(self, command: str, timeout: float = 30) -> tuple[int, str]:
        """Run ``command`` in the guest's shell: ``(exit status, output)``."""
        number = next(self._numbers)
        start = len(self.seen)
        # The shell echoes the line as typed ("$?" unexpanded); only the answer has digits.
        os.write(self.fd, f"{command}; echo VN-END-{number}-$?\r".encode())
        done = re.compile(rb"VN-END-%d-(\d+)\r?\n" % number)
        found = await asyncio.to_thread(self._read, done, timeout, start)
        # The echo may wrap at the terminal's width: the answer starts after its end.
        typed = self.seen.find(b"$?", start)
        echo_end = self.seen.find(b"\n", typed)
        output = bytes(self.seen[echo_end + 1:found.start()]) if 0 <= echo_end < found.start() \
            else b""
        return int(found[1]), output.decode(errors="replace").replace("\r\n", "\n")
