"""Consoles over the agent's own WebSocket, against real guests on qemu:///system.

The serial tests boot the ``console`` guest of :mod:`tests.guests` under TCG (a root
shell on ttyS0, prompt ``guest# ``); the token, VNC and page tests use firmware-only
guests under KVM. Commands typed into the guest quote a word (``echo ab''cd``) so the
terminal's echo of the typing never matches the answer (``abcd``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import struct
import sys
import uuid
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from tests import guests
from tests.agentproc import AgentProcess, free_port, start_agent
from tests.conftest import missing
from tests.integration import libvirtd as daemon
from tests.integration.conftest import VM_PREFIX, _remove_test_vms, expect_error
from tests.integration.consoleclient import console, http_session
from tests.pki import Pki
from virtnode.client import Client

pytestmark = pytest.mark.integration

#: The VMs of these tests, and only they, are removed after each.
PREFIX = f"{VM_PREFIX}console-"


def vm_name() -> str:
    return f"{PREFIX}{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def cleanup_vms(libvirtd: None) -> AsyncIterator[None]:
    yield
    await asyncio.to_thread(_remove_test_vms, PREFIX)


#: Long enough to use a token in the tests, short enough to watch one expire.
TOKEN_LIFETIME = 20.0


@pytest.fixture
async def console_agent(tmp_path: Path, libvirtd: None, pki: Pki,
                        cleanup_vms: None) -> AsyncIterator[AgentProcess]:
    """An agent on qemu:///system with unix, tcp (reader) and tls (admin) listeners."""
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI, tls=pki,
                              sections={"console": {"token_lifetime": TOKEN_LIFETIME}})
    yield agent
    assert await agent.stop() == 0, agent.log


async def create(client: Client, spec: dict[str, Any]) -> str:
    result = await client.call("VM.create", {"spec": spec})
    return str(result["vm_id"])


async def console_guest(client: Client) -> str:
    """The console guest, booted and ready (its ready marker in the agent's log)."""
    image = await guests.guest_image("console")
    vm_id = await create(client, {
        "name": vm_name(), "memory_mib": guests.MEMORY_MIB, "domain_type": "qemu",
        "machine": "pc", "kernel": str(image.kernel), "initrd": str(image.initrd),
        "cmdline": "console=ttyS0"})
    async with asyncio.timeout(120):
        while True:
            log = await client.call("VM.getConsoleLog", {"vm_id": vm_id, "format": "text"})
            if guests.GUEST_READY in log["text"] and "guest# " in log["text"]:
                return vm_id
            await asyncio.sleep(0.2)


async def open_console(client: Client, vm_id: str, kind: str = "serial",
                       takeover: str = "keep") -> str:
    grant = await client.call("VM.openConsole", {"vm_id": vm_id, "kind": kind,
                                                 "takeover": takeover})
    assert grant["url"] == f"/console/{grant['token']}"
    return str(grant["url"])


async def console_events(client: Client) -> list[dict[str, Any]]:
    """The vm.console events in the journal."""
    got = await client.call("Events.get", {"since": 0, "topics": ["vm.console"],
                                           "limit": 1000})
    return [event["data"] for event in got["events"]]


async def test_serial_console_types_reads_and_takes_over(console_agent: AgentProcess,
                                                         pki: Pki) -> None:
    agent = console_agent
    tls = pki.client_tls(pki.client)
    async with (await Client.connect(agent.unix_url) as admin,
                await Client.connect(agent.tcp_url) as reader):
        vm_id = await console_guest(admin)
        log = await admin.call("VM.getConsoleLog", {"vm_id": vm_id})
        assert guests.GUEST_READY.encode() in base64.b64decode(log["data"])
        assert log["state"] == "attached" and log["capacity"] == 256 * 1024

        # A reader connecting late sees the boot from the ring, then watches.
        watch_url = await open_console(reader, vm_id)
        late_fail_url = await open_console(admin, vm_id, takeover="fail")
        async with console(agent, watch_url, via="tcp") as watcher:
            await watcher.read_until(guests.GUEST_READY.encode())
            assert watcher.notices[0]["mode"] == "read-only"

            # An admin types a command over the unix socket and reads its answer.
            async with console(agent, await open_console(admin, vm_id), via="unix") as first:
                await first.send(b"echo ab''cd\r")
                await first.read_until(b"abcd\r\n")
                await watcher.read_until(b"abcd\r\n")

                # The reader's typing never reaches the guest.
                await watcher.send(b"echo RE''ADER\r")
                await first.send(b"echo DO''NE\r")
                output = await first.read_until(b"DONE\r\n")
                assert b"READER" not in output
                await watcher.read_until(b"DONE\r\n")
                assert any("read-only" in n.get("message", "") for n in watcher.notices)

                # fail: refused while a writer is attached, at the call and at the use.
                await expect_error(admin, "VM.openConsole",
                                   {"vm_id": vm_id, "kind": "serial", "takeover": "fail"},
                                   "FailedPrecondition", "console_in_use")
                async with console(agent, late_fail_url, via="unix") as refused:
                    assert await refused.wait_closed() == 4009

                # keep: a second writer joins; both type, both see.
                async with console(agent, await open_console(admin, vm_id),
                                   via="unix") as second:
                    await second.send(b"echo KE''EP\r")
                    await second.read_until(b"KEEP\r\n")
                    await first.read_until(b"KEEP\r\n")

                    # disconnect: over TLS, a third writer closes both; the reader stays.
                    url = await open_console(admin, vm_id, takeover="disconnect")
                    async with console(agent, url, via="tls", tls=tls) as third:
                        assert await first.wait_closed() == 4001
                        assert await second.wait_closed() == 4001
                        assert first.close_reason == "taken over by uid:0"
                        await third.send(b"echo TH''IRD\r")
                        await third.read_until(b"THIRD\r\n")
                        await watcher.read_until(b"THIRD\r\n")

            # The VM stops: the watcher is told so (4010).
            await admin.call("VM.destroy", {"vm_id": vm_id})
            code = await watcher.wait_closed()
            assert code == 4010, agent.log[-6000:]

        events = await console_events(admin)
        kinds = [(e["event"], e["role"]) for e in events]
        assert ("connect", "reader") in kinds and ("connect", "admin") in kinds
        takeovers = [e for e in events if e["event"] == "takeover"]
        assert len(takeovers) == 2 and all(e["caller"] == "uid:0" for e in takeovers)
        assert [e for e in events if e.get("reason") == "taken_over"]


def firmware_spec(**extra: Any) -> dict[str, Any]:
    """A guest with no disk and no kernel under KVM: SeaBIOS runs and waits."""
    return {"name": vm_name(), "memory_mib": 64, "domain_type": "kvm", "machine": "pc",
            **extra}


async def test_tokens_are_refused_when_reused_expired_misdirected_or_cross_site(
        tmp_path: Path, libvirtd: None, cleanup_vms: None) -> None:
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI,
                              sections={"console": {"token_lifetime": 2.0}})
    try:
        async with await Client.connect(agent.unix_url) as admin:
            vm_a = await create(admin, firmware_spec())
            vm_b = await create(admin, firmware_spec())

            # Opening the page does not use the token; the page is locked to the agent.
            url = await open_console(admin, vm_a)
            async with http_session(agent, "tcp") as (session, base):
                async with session.get(base + url) as page:
                    assert page.status == 200
                    assert page.content_type == "text/html"
                    policy = page.headers["Content-Security-Policy"]
                    assert "frame-ancestors 'self'" in policy and "connect-src 'self'" in policy
                    assert page.headers["Referrer-Policy"] == "no-referrer"
                async with session.get(base + "/console/static/app/serial.js") as script:
                    assert script.status == 200
                    assert script.headers["Cross-Origin-Resource-Policy"] == "same-origin"
                for escape in ("/console/static/app/..%2F..%2Fpackage.json",
                               "/console/static/novnc/..%2F..%2F..%2Fpackage.json"):
                    async with session.get(yarl.URL(base + escape, encoded=True)) as bad:
                        assert bad.status == 404

            # A page of another site cannot use a token.
            for origin in ("http://evil.example", f"http://127.0.0.1:{agent.tcp_port + 1}",
                           "null"):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    async with console(agent, url, headers={"Origin": origin}):
                        pass
                assert refused.value.status == 403
            # ...and the agent's own origin can, once.
            async with console(agent, url, headers={"Origin": agent.http_url}) as session_a:
                assert session_a.ws.protocol is None or session_a.ws.protocol == "binary"
            with pytest.raises(aiohttp.WSServerHandshakeError) as reused:
                async with console(agent, url):
                    pass
            assert reused.value.status == 403

            # A token shown for another VM (or kind) is refused, and gone.
            url = await open_console(admin, vm_a)
            for wrong in (f"?vm_id={vm_b}", f"?vm_id={vm_a}"):
                with pytest.raises(aiohttp.WSServerHandshakeError) as misdirected:
                    async with console(agent, url + wrong):
                        pass
                assert misdirected.value.status == 403
            url = await open_console(admin, vm_a, "serial")
            async with console(agent, url + f"?vm_id={vm_a}&kind=serial"):
                pass

            # Unknown and expired tokens.
            for bogus in ("/console/x", "/console/" + "A" * 43):
                with pytest.raises(aiohttp.WSServerHandshakeError) as unknown:
                    async with console(agent, bogus):
                        pass
                assert unknown.value.status == 403
            url = await open_console(admin, vm_a)
            await asyncio.sleep(2.5)  # the token's lifetime: what this part tests
            async with (http_session(agent, "tcp") as (session, base),
                        session.get(base + url) as page):
                assert page.status == 403
                assert "expired" in await page.text()
    finally:
        assert await agent.stop() == 0, agent.log


async def rfb_handshake(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, int]:
    """Speak RFB 3.8 with no authentication up to ServerInit; the framebuffer's size."""
    stream = bytearray()

    async def need(size: int) -> bytes:
        while len(stream) < size:
            msg = await ws.receive(timeout=15)
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            stream.extend(msg.data)
        data = bytes(stream[:size])
        del stream[:size]
        return data

    assert await need(12) == b"RFB 003.008\n"
    await ws.send_bytes(b"RFB 003.008\n")
    count = (await need(1))[0]
    assert 1 in await need(count), "no-authentication not offered"
    await ws.send_bytes(b"\x01")
    assert await need(4) == b"\x00\x00\x00\x00"
    await ws.send_bytes(b"\x01")  # ClientInit: shared
    width, height = struct.unpack(">HH", await need(4))
    await need(16)
    (name_length,) = struct.unpack(">I", await need(4))
    await need(name_length)
    return width, height


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The chunks of a PNG, each CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack_from(">I", data, at)
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack_from(">I", data, at + 8 + length)
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, kind
        chunks.append((kind, body))
        at += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    return chunks


async def test_vnc_speaks_rfb_and_screenshots_are_png(console_agent: AgentProcess) -> None:
    agent = console_agent
    async with (await Client.connect(agent.unix_url) as admin,
                await Client.connect(agent.tcp_url) as reader):
        vm_id = await create(admin, firmware_spec(graphics="vnc"))
        async with console(agent, await open_console(admin, vm_id, "vnc")) as session:
            width, height = await rfb_handshake(session.ws)
        # A viewer's session too; its keys and pointer never reach QEMU (dropped).
        async with console(agent, await open_console(reader, vm_id, "vnc"),
                           via="tcp") as viewer:
            assert (width, height) == await rfb_handshake(viewer.ws)
            await viewer.ws.send_bytes(b"\x04\x01\x00\x00\x00\x00\xff\x0d"  # KeyEvent
                                       b"\x05\x00\x00\x10\x00\x10"  # PointerEvent
                                       b"\x03\x00\x00\x00\x00\x00\x00\x10\x00\x10")
            msg = await viewer.ws.receive(timeout=15)  # the update it asked for
            assert msg.type is aiohttp.WSMsgType.BINARY and msg.data[0] == 0
        shot = await reader.call("VM.screenshot", {"vm_id": vm_id})
        data = base64.b64decode(shot["png"])
        header = png_chunks(data)[0][1]
        assert struct.unpack(">II", header[:8]) == (shot["width"], shot["height"])
        assert (shot["width"], shot["height"]) == (width, height)
        # A serial-only VM has no display.
        other = await create(admin, firmware_spec())
        await expect_error(admin, "VM.openConsole", {"vm_id": other, "kind": "vnc"},
                           "FailedPrecondition", "no_graphics")
        # The agent stopping closes a session 1001 (going away), as its client sees it.
        async with console(agent, await open_console(admin, vm_id, "vnc")) as session:
            await rfb_handshake(session.ws)
            stopping = asyncio.create_task(agent.stop())
            assert await session.wait_closed() == 1001
            assert await stopping == 0


class Browser:
    """Headless Chromium driven over its DevTools protocol (loopback only)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        await self._ws.send_json({"id": self._ids, "method": method, "params": params})
        while True:
            msg = await self._ws.receive_json(timeout=30)
            if msg.get("id") == self._ids:
                assert "error" not in msg, msg
                return dict(msg.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[Browser]:
    command = shutil.which("chromium")
    if command is None:
        missing("chromium is not installed")
    assert command is not None
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        command, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
        f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1024,768", "about:blank",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(30):
                while True:
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                            pages = [t for t in await resp.json() if t["type"] == "page"]
                        if pages:
                            break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.2)
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"],
                                          max_msg_size=0) as ws:
                browser = Browser(ws)
                await browser.send("Page.enable")
                yield browser
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def until(browser: Browser, condition: str, timeout: float = 30.0) -> None:
    """Poll the page (it has no event to wait on from here) until ``condition`` holds."""
    async with asyncio.timeout(timeout):
        while True:
            if await browser.evaluate(condition):
                return
            await asyncio.sleep(0.2)


async def test_the_vnc_page_connects_in_chromium(console_agent: AgentProcess,
                                                 tmp_path: Path) -> None:
    agent = console_agent
    async with await Client.connect(agent.unix_url) as admin:
        vm_id = await create(admin, firmware_spec(graphics="vnc"))
        url = agent.http_url + await open_console(admin, vm_id, "vnc")
        async with chromium(tmp_path) as browser:
            await browser.send("Page.navigate", url=url)
            await until(browser, "document.body && document.body.dataset.state === 'connected'")
            # The canvas shows the guest's screen once noVNC has drawn the first update
            # (its pixels are transparent until then).
            await until(browser, "(() => { const c = document.querySelector('#screen canvas');"
                                 " if (!c || !c.width) return false;"
                                 " const p = c.getContext('2d').getImageData(c.width / 2,"
                                 " c.height / 2, 1, 1).data; return p[3] === 255; })()")
            shot = await browser.send("Page.captureScreenshot", format="png")
        path = tmp_path / "vnc-console-page.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"screenshot of the console page: {path}")
        events = await console_events(admin)
        assert any(e["kind"] == "vnc" and e["event"] == "connect" for e in events)


#: The text of the serial page's terminal (xterm.js), one line per row, right-trimmed.
TERMINAL_TEXT = ("(() => { const b = window.virtnodeConsole.buffer.active; const rows = [];"
                 " for (let i = 0; i < b.length; i++)"
                 " rows.push(b.getLine(i).translateToString(true));"
                 " return rows.join('\\n'); })()")


async def test_the_serial_page_types_and_reads_in_chromium(console_agent: AgentProcess,
                                                           tmp_path: Path) -> None:
    agent = console_agent
    async with await Client.connect(agent.unix_url) as admin:
        vm_id = await console_guest(admin)
        url = agent.http_url + await open_console(admin, vm_id, "serial")
        async with chromium(tmp_path) as browser:
            await browser.send("Page.navigate", url=url)
            await until(browser, "document.body && document.body.dataset.state === 'connected'")
            # The boot, from the console's ring, before anything is typed.
            await until(browser, f"{TERMINAL_TEXT}.includes({guests.GUEST_READY!r})")
            await browser.evaluate("window.virtnodeConsole.focus()")
            await browser.send("Input.insertText", text="echo pa''ge")
            for kind in ("keyDown", "keyUp"):
                await browser.send("Input.dispatchKeyEvent", type=kind, key="Enter",
                                   code="Enter", windowsVirtualKeyCode=13,
                                   **({"text": "\r"} if kind == "keyDown" else {}))
            await until(browser, f"{TERMINAL_TEXT}.split('\\n').includes('page')")
            shot = await browser.send("Page.captureScreenshot", format="png")
        path = tmp_path / "serial-console-page.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"screenshot of the console page: {path}")
        events = await console_events(admin)
        assert any(e["kind"] == "serial" and e["event"] == "connect" and e["role"] == "admin"
                   for e in events)


async def test_virtnode_vnc_prints_a_page_url_and_names_must_be_unique(
        console_agent: AgentProcess) -> None:
    agent = console_agent
    async with await Client.connect(agent.unix_url) as admin:
        spec = firmware_spec(graphics="vnc")
        await create(admin, spec)

        async def virtnode(*args: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "virtnode", *args, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
            out, err = await proc.communicate()
            return int(proc.returncode or 0), out.decode(), err.decode()

        status, out, err = await virtnode("vnc", spec["name"], "--url", agent.tcp_url)
        assert status == 0, err
        assert out.startswith(agent.http_url + "/console/"), out
        async with (http_session(agent, "tcp") as (session, _),
                    session.get(out.strip()) as page):
            assert page.status == 200
        status, _, err = await virtnode("vnc", "no-such-vm", "--url", agent.unix_url)
        assert status == 1 and "no VM is named" in err
