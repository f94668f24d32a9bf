"""The state directory's filesystem runs full under a working agent, then gets room again.

The state dir is a 4 MiB tmpfs; a filler file takes all but a sliver of it. Calls that
need the store answer ``Unavailable`` (``state_store_full``), not an internal error; no
subscriber sees an event the journal does not hold; the log says so once, with no
traceback; and once the filler is gone everything works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory, missing
from tests.integration.test_events_journal import vm_cycle
from tests.subproc import tmpfs
from virtnode.client import Client, RemoteError

pytestmark = pytest.mark.integration


@pytest.fixture
async def small_state(tmp_path: Path) -> AsyncIterator[Path]:
    if os.geteuid() != 0:
        missing("not root: the test mounts a tmpfs")
    where = tmp_path / "mnt"
    where.mkdir()
    async with tmpfs(where, "size=4m,mode=0711"):
        yield where


def fill(path: Path, leave: int) -> Path:
    """A file that takes all of ``path``'s filesystem but ``leave`` bytes."""
    filler = path / "filler"
    stats = os.statvfs(path)
    free = stats.f_bavail * stats.f_frsize
    with filler.open("wb") as out:
        out.write(b"\0" * max(0, free - leave))
    return filler


async def received(client: Client, quiet: float = 0.5) -> list[dict[str, Any]]:
    """The notifications that arrive until none has for ``quiet`` seconds."""
    got: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        while True:
            async with asyncio.timeout(quiet):
                got.append(await anext(client.notifications()))
    return got


async def test_a_full_state_directory_is_unavailable_until_it_has_room(
        small_state: Path, tmp_path: Path, checked_client: ClientFactory) -> None:
    state = small_state / "state"
    agent: AgentProcess = await start_agent(tmp_path, sections={"state": {"dir": str(state)}})
    try:
        client = await checked_client(agent.unix_url)
        await client.call("Events.subscribe", {"topics": ["vm.*"]})
        filler = await asyncio.to_thread(fill, small_state, 0)
        # Work that writes events and jobs until the store cannot take more.
        refused: RemoteError | None = None
        for _ in range(200):
            await vm_cycle(client)
            vms = (await client.call("VM.list"))["vms"]
            try:
                await client.call("VM.shutdown", {"vm_id": vms[0]["vm_id"], "async": True,
                                                  "timeout": 1})
            except RemoteError as exc:
                refused = exc
                break
        assert refused is not None, "the store never filled up"
        assert (refused.name, refused.data["reason"]) == ("Unavailable", "state_store_full")
        # Nothing reached a subscriber that the journal does not hold.
        position = await client.call("Events.get", {})
        seen = [n["params"]["seq"] for n in await received(client) if n["method"] == "event"]
        assert all(seq <= position["last_seq"] for seq in seen)
        # Room again: calls work, and the events held meanwhile arrive.
        await asyncio.to_thread(filler.unlink)
        await vm_cycle(client)
        vms = (await client.call("VM.list"))["vms"]
        await client.call("VM.shutdown", {"vm_id": vms[0]["vm_id"], "async": True,
                                          "timeout": 1})
        full_lines = [line for line in agent.log_lines if "is full" in line]
        assert 1 <= len(full_lines) <= 2, full_lines
    finally:
        assert await agent.stop() == 0, agent.log
    assert shutil.disk_usage(small_state).free > 0
