"""A web page from another site, in a real headless Chromium, against the agent.

The agent runs as ``make run`` runs it: loopback TCP callers are admins. A page served
from another origin (another port on the same host, as a local dev server or a page the
user opened would be) tries what such a page can: open a WebSocket to the agent's /rpc
and create a VM, and POST a VM.create with the content types a browser sends across
sites without asking (text/plain, a form). The page reports what it saw back to its own
server, which proves it ran; the agent must have created nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.agentproc import AgentProcess, free_port, start_agent
from tests.conftest import missing
from virtnode.client import Client

pytestmark = pytest.mark.integration

PAGE = """<!doctype html>
<html><body><pre id="log"></pre><script>
const agent = "127.0.0.1:%(agent_port)d";
const report = {};
function create(name) {
  return JSON.stringify({jsonrpc: "2.0", method: "VM.create",
                         params: {spec: {name: name, memory_mib: 64}}, id: 1});
}
async function attack() {
  report.websocket = await new Promise(resolve => {
    let ws;
    try { ws = new WebSocket("ws://" + agent + "/rpc"); }
    catch (e) { resolve("constructor failed: " + e); return; }
    ws.onopen = () => { ws.send(create("csrf-websocket")); };
    ws.onmessage = (m) => resolve("answered: " + m.data);
    ws.onerror = () => resolve("error");
    ws.onclose = (e) => resolve("closed " + e.code);
    setTimeout(() => resolve("timeout"), 5000);
  });
  for (const type of ["text/plain", "application/x-www-form-urlencoded"]) {
    try {
      await fetch("http://" + agent + "/rpc", {method: "POST", mode: "no-cors",
        headers: {"Content-Type": type}, body: create("csrf-post-" + type.split("/")[0])});
      report[type] = "sent";
    } catch (e) { report[type] = "failed: " + e; }
  }
  // A form post: what a page can do without any script at all.
  await new Promise(resolve => {
    const frame = document.createElement("iframe");
    frame.name = "sink";
    frame.onload = resolve;
    document.body.appendChild(frame);
    const form = document.createElement("form");
    form.method = "POST"; form.action = "http://" + agent + "/rpc";
    form.enctype = "text/plain"; form.target = "sink";
    // text/plain form bodies are NAME=VALUE: the "=" lands inside the request's id.
    const field = document.createElement("input");
    field.name = create("csrf-form").replace('"id":1}', '"id":"x');
    field.value = 'y"}';
    form.appendChild(field); document.body.appendChild(form); form.submit();
    setTimeout(resolve, 3000);
  });
  report.form = "submitted";
  await fetch("/done", {method: "POST", body: JSON.stringify(report)});
}
attack();
</script></body></html>
"""


@pytest.fixture
async def admin_agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    agent = await start_agent(tmp_path, sections={"access": {"tcp_role": "admin"}})
    yield agent
    assert await agent.stop() == 0


@contextlib.asynccontextmanager
async def evil_site(agent_port: int) -> AsyncIterator[tuple[int, asyncio.Future[Any]]]:
    """A web server on another port: the page, and where it reports what happened."""
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=PAGE % {"agent_port": agent_port}, content_type="text/html")

    async def report(request: web.Request) -> web.Response:
        if not done.done():
            done.set_result(json.loads(await request.text()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/done", report)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port, done
    finally:
        await runner.cleanup()


async def test_a_page_from_another_site_cannot_act_on_the_agent(admin_agent: AgentProcess,
                                                               tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        missing("chromium is not installed")
    async with evil_site(admin_agent.tcp_port) as (port, done):
        browser = await asyncio.create_subprocess_exec(
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
            f"http://127.0.0.1:{port}/",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            report = await asyncio.wait_for(done, 60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                browser.kill()
            await browser.wait()
    # The page ran and tried everything...
    assert report.keys() >= {"websocket", "text/plain", "form"}, report
    assert not str(report["websocket"]).startswith("answered"), report
    # ...and the agent made no VM for it.
    async with await Client.connect(admin_agent.unix_url) as client:
        names = [vm["name"] for vm in (await client.call("VM.list"))["vms"]]
    assert not [name for name in names if name.startswith("csrf")], names
