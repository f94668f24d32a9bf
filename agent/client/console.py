"""``virtnode console VM`` and ``virtnode vnc VM``: a VM's consoles from the command line.

``console`` attaches the terminal to the serial console through the agent's WebSocket
(``VM.openConsole``, then ``GET /console/{token}``): the terminal is put in raw mode, every
key goes to the guest, and ``Ctrl-]`` detaches; the terminal is restored however the
session ends. ``vnc`` prints the URL of the VNC console page for a browser.

A VM is named by its UUID or its name; a name is looked up with ``VM.list`` and one that
several VMs share is refused, listing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import sys
import termios
import tty
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import aiohttp

from virtnode.client.connection import Client, ConnectionLost, endpoint

#: Ctrl-], as telnet and virsh console have it.
ESCAPE = b"\x1d"


class VmNameError(Exception):
    """The name names no VM, or more than one."""


async def resolve_vm(client: Client, name: str) -> str:
    """The vm_id of the VM named ``name`` (or with that UUID)."""
    with contextlib.suppress(ValueError):
        return str(uuid.UUID(name))
    vms = (await client.call("VM.list"))["vms"]
    found = [vm for vm in vms if vm["name"] == name]
    if not found:
        raise VmNameError(f"no VM is named {name!r}")
    if len(found) > 1:
        listed = ", ".join(f"{vm['vm_id']} ({vm['state']})" for vm in found)
        raise VmNameError(f"{len(found)} VMs are named {name!r}: {listed}; name one by UUID")
    return str(found[0]["vm_id"])


def page_url(agent_url: str, path: str) -> str:
    """The browser URL of a console path on the agent at ``agent_url``."""
    ws_url, unix_path = endpoint(agent_url)
    if unix_path is not None:
        return path
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return f"{scheme}://{parts.netloc}{path}"


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The terminal in raw mode for the block; as it was afterwards, whatever happens."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


async def attach(client: Client, agent_url: str, vm: str, *, takeover: str,
                 tls: ssl.SSLContext | None = None) -> str:
    """Attach stdin/stdout to the serial console of ``vm`` until Ctrl-] or the end of the
    session; returns why it ended."""
    vm_id = await resolve_vm(client, vm)
    grant = await client.call("VM.openConsole", {"vm_id": vm_id, "kind": "serial",
                                                 "takeover": takeover})
    ws_url, unix_path = endpoint(agent_url)
    url = ws_url.removesuffix("/rpc") + grant["url"]
    connector = aiohttp.UnixConnector(path=unix_path) if unix_path else None
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            ws = await session.ws_connect(url, ssl=tls if tls is not None else True,
                                          max_msg_size=0)
        except aiohttp.ClientError as exc:
            raise ConnectionLost(f"cannot open the console: {exc}") from None
        async with ws:
            return await _pump(ws)


async def _pump(ws: aiohttp.ClientWebSocketResponse) -> str:
    loop = asyncio.get_running_loop()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.buffer
    keys: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)

    def readable() -> None:
        data = os.read(stdin, 4096)
        with contextlib.suppress(asyncio.QueueFull):  # a paste faster than the guest
            keys.put_nowait(data)

    async def typing() -> str:
        while True:
            data = await keys.get()
            if not data:
                return "end of input"
            if ESCAPE in data:
                before = data.split(ESCAPE, 1)[0]
                if before:
                    await ws.send_bytes(before)
                return "detached"
            await ws.send_bytes(data)

    async def showing() -> str:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.BINARY:
                stdout.write(msg.data)
                stdout.flush()
            elif msg.type is aiohttp.WSMsgType.TEXT:
                notice = json.loads(msg.data)
                if notice.get("type") == "notice":
                    stdout.write(f"\r\n[virtnode: {notice['message']}]\r\n".encode())
                    stdout.flush()
        return f"session closed ({ws.close_code})"

    with raw_terminal(stdin):
        loop.add_reader(stdin, readable)
        tasks = [asyncio.create_task(typing()), asyncio.create_task(showing())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()
        finally:
            loop.remove_reader(stdin)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
