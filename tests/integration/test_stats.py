"""Statistics through the agent on test:///default: method, event and /metrics shapes."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory, missing
from tests.integration.conftest import next_event, scrape
from tests.subproc import run, virtnode
from virtnode.client import Client, RemoteError

pytestmark = pytest.mark.integration

FAST = {"stats": {"host_interval": 0.5, "vm_interval": 0.5}}
TEST_VM = "test"


@pytest.fixture
async def stats_agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    agent = await start_agent(tmp_path, sections=FAST)
    yield agent
    status = await agent.stop()
    assert status == 0, agent.log


async def sampled(client: Client, topic: str, cycles: int = 2) -> None:
    """Wait for ``cycles`` more sampling cycles of ``topic``."""
    await client.call("Events.subscribe", {"topics": [topic]})
    for _ in range(cycles):
        await next_event(client, topic, lambda _data: True, timeout=10)


async def test_host_stats_have_rates_after_two_samples(
        stats_agent: AgentProcess, checked_client: ClientFactory) -> None:
    client = await checked_client(stats_agent.unix_url)
    await sampled(client, "stats.host")
    stats = await client.call("Host.getStats")
    assert stats["interval_seconds"] == pytest.approx(0.5, abs=0.3)
    assert stats["cpu"]["percent"] is not None
    assert len(stats["cpu"]["cores"]) == stats["cpu"]["count"]
    lo = next(nic for nic in stats["nics"] if nic["name"] == "lo")
    assert lo["rx_bytes_per_second"] is not None
    assert [fs["path"] for fs in stats["filesystems"]] == [str(stats_agent.unix_path.parent
                                                              .parent / "state")]


async def test_history_filters_and_averages(stats_agent: AgentProcess,
                                            checked_client: ClientFactory) -> None:
    client = await checked_client(stats_agent.unix_url)
    await sampled(client, "stats.host", cycles=4)
    history = await client.call("Host.getStatsHistory")
    samples = history["samples"]
    assert history["interval_seconds"] == 0.5 and len(samples) >= 4
    times = [s["time"] for s in samples]
    assert times == sorted(times)
    later = await client.call("Host.getStatsHistory", {"since": times[1]})
    assert [s["time"] for s in later["samples"]][:len(times) - 2] == times[2:]
    coarse = await client.call("Host.getStatsHistory", {"resolution": 60})
    assert coarse["resolution_seconds"] == 60
    assert 1 <= len(coarse["samples"]) <= 2  # the samples span at most one bucket boundary
    two = await client.call("Host.getStatsHistory", {"resolution": 1})
    assert two["resolution_seconds"] == 1
    assert len(samples) / 2 - 1 <= len(two["samples"]) <= len(samples) / 2 + 2


async def test_vm_stats_and_missing_ids(stats_agent: AgentProcess,
                                        checked_client: ClientFactory) -> None:
    client = await checked_client(stats_agent.unix_url)
    await sampled(client, "stats.vm")
    result = await client.call("VM.getStats")
    assert result["time"] is not None
    (vm,) = [v for v in result["vms"] if v["name"] == TEST_VM]
    assert vm["state"] == "running" and vm["stale_seconds"] == 0
    unknown = str(uuid.uuid4())
    chosen = await client.call("VM.getStats", {"vm_ids": [vm["vm_id"].upper(), unknown]})
    assert [v["vm_id"] for v in chosen["vms"]] == [vm["vm_id"]]
    assert chosen["missing"] == [unknown]
    with pytest.raises(RemoteError) as caught:
        await client.call("VM.getStats", {"vm_ids": ["not-a-uuid"]})
    assert caught.value.name == "InvalidParams" and caught.value.data["field"] == "vm_ids.0"
    with pytest.raises(RemoteError) as caught:
        await client.call("Host.getStatsHistory", {"resolution": -1})
    assert caught.value.name == "InvalidParams"


async def test_stats_events_are_compact(stats_agent: AgentProcess,
                                        checked_client: ClientFactory) -> None:
    # The agent checks every payload against the schema (check_results); here the content.
    client = await checked_client(stats_agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["stats.*"]})
    host = await next_event(client, "stats.host", lambda _d: True)
    assert host["duration_seconds"] < 0.5
    vms = await next_event(client, "stats.vm", lambda d: bool(d["vms"]))
    assert vms["stale_vms"] == 0
    assert [v["name"] for v in vms["vms"]] == [TEST_VM]
    assert set(vms["vms"][0]) >= {"cpu_percent", "memory_used_bytes", "stale_seconds"}


async def test_metrics_text_passes_promtool(stats_agent: AgentProcess,
                                            checked_client: ClientFactory,
                                            tmp_path: Path) -> None:
    client = await checked_client(stats_agent.unix_url)
    await sampled(client, "stats.vm")
    await client.call("Host.ping")
    with pytest.raises(RemoteError):
        await client.call("No.suchMethod")
    stopped = await client.call("VM.create", {"spec": {"name": "stopped", "memory_mib": 64},
                                              "start": False})
    status, content_type, text = await scrape(stats_agent.http_url)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    vm_id = (await client.call("VM.getStats"))["vms"][0]["vm_id"]
    assert f'virtnode_vm_info{{state="running",vm_id="{vm_id}",vm_name="test"}} 1.0' in text
    # A VM that is not running is not sampled, and still counted.
    state, stopped_id = stopped["state"], stopped["vm_id"]
    assert (f'virtnode_vm_info{{state="{state}",vm_id="{stopped_id}",'
            'vm_name="stopped"} 1.0') in text
    assert 'virtnode_rpc_requests_total{method="Host.ping",outcome="ok"}' in text
    assert 'virtnode_rpc_requests_total{method="other",outcome="MethodNotFound"}' in text
    assert "No.suchMethod" not in text, "unknown methods must not become labels"
    assert 'virtnode_rpc_request_duration_seconds_bucket{le="+Inf",method="Host.ping"}' in text
    assert 'virtnode_events_published_total{topic="stats.vm"}' in text
    assert 'virtnode_stats_cycle_duration_seconds_count{kind="vm"}' in text
    assert "virtnode_stats_stale_vms 0.0" in text
    assert 'virtnode_host_cpu_seconds_total{cpu="0",mode="user"}' in text
    # The same text on every listener.
    status, _, over_unix = await scrape("http://localhost", unix=stats_agent.unix_path)
    assert status == 200 and "virtnode_vm_info" in over_unix

    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool is not installed (Debian package prometheus; tools/ensure-host)")
    path = tmp_path / "metrics.txt"
    path.write_text(text)
    checked = await run("sh", "-c", f"{promtool} check metrics < {path}")
    assert checked.status == 0, checked.out + checked.err


async def test_stats_command_prints_tables(stats_agent: AgentProcess,
                                           checked_client: ClientFactory) -> None:
    client = await checked_client(stats_agent.unix_url)
    await sampled(client, "stats.vm")
    out = (await virtnode("stats", "--url", stats_agent.unix_url)).check()
    lines = out.splitlines()
    assert lines[0].startswith("host  cpu ")
    assert any(line.startswith("NIC ") for line in lines)
    header = next(line for line in lines if line.startswith("VM "))
    assert "CPU" in header and "DISK WRITE" in header
    assert any(line.split()[:2] == [TEST_VM, "running"] for line in lines)
    as_json: dict[str, Any] = json.loads(
        (await virtnode("stats", "--json", "--url", stats_agent.unix_url)).check())
    assert set(as_json) == {"host", "vms"}


def _sample(text: str, series: str) -> tuple[float, int]:
    """The value and timestamp (ms) of ``series`` in a /metrics text."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            _, value, stamp = line.split(" ")
            return float(value), int(stamp)
    raise AssertionError(f"{series} is not in the text, or has no timestamp")


async def test_statistics_carry_the_time_they_were_sampled(stats_agent: AgentProcess,
                                                           checked_client: ClientFactory) -> None:
    client = await checked_client(stats_agent.unix_url)
    await sampled(client, "stats.host")
    series = 'virtnode_host_cpu_seconds_total{cpu="0",mode="idle"}'
    host = await client.call("Host.getStats")
    _, _, text = await scrape(stats_agent.http_url)
    value, stamp = _sample(text, series)
    # The sample's own time, in milliseconds, whatever the time of the scrape: a rate over
    # any window is then taken over the true interval between two samples.
    newest = (await client.call("Host.getStats"))["time"]
    assert stamp in (round(host["time"] * 1000), round(newest * 1000))
    await sampled(client, "stats.host")
    _, _, later = await scrape(stats_agent.http_url)
    value2, stamp2 = _sample(later, series)
    assert stamp2 > stamp and value2 >= value
    # Per-VM series carry their own sample's time too.
    vm = (await client.call("VM.getStats"))["vms"][0]
    assert re.search(rf'virtnode_vm_vcpus\{{vm_id="{vm["vm_id"]}",vm_name="test"\}}'
                     r" \S+ \d{13}$", later, flags=re.MULTILINE)
