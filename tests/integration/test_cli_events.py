"""``virtnode events`` against a real agent subprocess on test:///default."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory
from tests.subproc import virtnode
from virtnode.client.cli import EXIT_REMOTE_ERROR, EXIT_UNREACHABLE

pytestmark = pytest.mark.integration

TIMEOUT = 15.0
PRETTY = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  #(\d+)  ([a-z.]+)  (.*)$"
)


@dataclass
class EventsCommand:
    """A running ``virtnode events``: its stdout lines, its stderr as it comes."""

    proc: asyncio.subprocess.Process
    stderr: str = ""

    async def subscribed(self) -> None:
        """Wait until the command says it has subscribed."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(TIMEOUT):
            while "subscribed to" not in self.stderr:
                line = await self.proc.stderr.readline()
                if not line:
                    raise AssertionError(f"exited {await self.proc.wait()}: {self.stderr}")
                self.stderr += line.decode()

    async def line_where(self, match: Callable[[str], bool]) -> list[str]:
        """Read stdout lines up to and including the first that ``match`` accepts."""
        assert self.proc.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(TIMEOUT):
            while True:
                raw = await self.proc.stdout.readline()
                assert raw, f"stdout closed after {lines}; stderr: {self.stderr}"
                lines.append(raw.decode().rstrip("\n"))
                if match(lines[-1]):
                    return lines

    async def exit_status(self) -> int:
        assert self.proc.stderr is not None
        async with asyncio.timeout(TIMEOUT):
            self.stderr += (await self.proc.stderr.read()).decode()
            return await self.proc.wait()


@pytest.fixture
async def events_command() -> AsyncIterator[Callable[..., Any]]:
    started: list[asyncio.subprocess.Process] = []

    async def start(*args: str) -> EventsCommand:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "virtnode", "events", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(proc)
        command = EventsCommand(proc)
        await command.subscribed()
        return command

    yield start
    for proc in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def create_and_start(agent: AgentProcess, checked_client: ClientFactory) -> str:
    """Create a stopped VM, then start it; returns its id."""
    client = await checked_client(agent.unix_url)
    name = f"vn-cli-{uuid.uuid4().hex[:6]}"
    created = await client.call("VM.create", {"spec": {"name": name, "memory_mib": 64},
                                              "start": False})
    await client.call("VM.start", {"vm_id": created["vm_id"]})
    return str(created["vm_id"])


def started_json(vm_id: str) -> Callable[[str], bool]:
    def match(line: str) -> bool:
        data = json.loads(line)["data"]
        return data.get("vm_id") == vm_id and data.get("event") == "started"
    return match


async def test_json_lines_until_interrupted(agent: AgentProcess, checked_client: ClientFactory,
                                            events_command: Callable[..., Any]) -> None:
    command = await events_command("--url", agent.unix_url)
    vm_id = await create_and_start(agent, checked_client)
    lines = await command.line_where(started_json(vm_id))
    events = [json.loads(line) for line in lines]
    for event in events:
        assert set(event) == {"epoch", "seq", "topic", "time", "data"}
    ours = [(e["topic"], e["data"]["event"]) for e in events if e["data"].get("vm_id") == vm_id]
    assert ours == [("vm.lifecycle", "defined"), ("vm.lifecycle", "started")]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    assert len({e["epoch"] for e in events}) == 1
    command.proc.send_signal(signal.SIGINT)
    assert await command.exit_status() == 0, command.stderr
    assert "Traceback" not in command.stderr


async def test_topic_filter_and_pretty_lines(agent: AgentProcess, checked_client: ClientFactory,
                                             events_command: Callable[..., Any]) -> None:
    command = await events_command("--url", agent.tcp_url, "--topic", "vm.life*",
                                   "--topic", "job.*", "--pretty")
    vm_id = await create_and_start(agent, checked_client)
    lines = await command.line_where(lambda line: f"vm_id={vm_id}" in line
                                     and "event=started" in line)
    for line in lines:
        match = PRETTY.match(line)
        assert match, line
        assert match.group(2) == "vm.lifecycle"
    assert "state=running" in lines[-1]
    command.proc.send_signal(signal.SIGTERM)
    assert await command.exit_status() == 0, command.stderr


async def test_dropped_connection_exits_3(tmp_path: Path,
                                          events_command: Callable[..., Any]) -> None:
    own = await start_agent(tmp_path / "own")
    try:
        command = await events_command("--url", own.unix_url)
    finally:
        assert await own.stop() == 0, own.log
    assert await command.exit_status() == EXIT_UNREACHABLE
    assert "closed the connection" in command.stderr


async def test_unreachable_agent_exits_3(tmp_path: Path) -> None:
    result = await virtnode("events", "--url", f"unix:{tmp_path / 'none.sock'}")
    assert result.status == EXIT_UNREACHABLE
    assert "cannot connect" in result.err


async def test_bad_topic_is_the_agents_error(agent: AgentProcess) -> None:
    result = await virtnode("events", "--url", agent.unix_url, "--topic", "Not A Topic!")
    assert result.status == EXIT_REMOTE_ERROR
    assert json.loads(result.err)["data"]["name"] == "InvalidParams"


async def test_since_replays_from_the_journal(agent: AgentProcess,
                                              checked_client: ClientFactory,
                                              events_command: Callable[..., Any]) -> None:
    vm_id = await create_and_start(agent, checked_client)
    command = await events_command("--url", agent.unix_url, "--since", "0")
    lines = await command.line_where(started_json(vm_id))
    assert json.loads(lines[0])["seq"] == 1
    command.proc.send_signal(signal.SIGINT)
    assert await command.exit_status() == 0, command.stderr
