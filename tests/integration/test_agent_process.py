"""The real agent as a subprocess on test:///default: its first methods, transports, the
``virtnode call`` command, stopping on SIGTERM and how fast it starts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import stat
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.agentproc import AgentProcess, running_agent, start_agent, write_config
from tests.conftest import ClientFactory, missing
from tests.subproc import tmpfs, virtnode
from virtnode.client import RemoteError
from virtnode.rpc.schema import ApiSchema
from virtnode.util.jsontypes import JsonObject

#: test:///default always defines one running domain with this name.
TEST_VM = "test"


def url_of(agent: AgentProcess, via: str) -> str:
    return agent.unix_url if via == "unix" else agent.tcp_url


def assert_uuid(text: str) -> None:
    assert str(uuid.UUID(text)) == text.lower()


@pytest.fixture(params=["unix", "tcp"])
def via(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_ping(agent: AgentProcess, checked_client: ClientFactory, via: str) -> None:
    client = await checked_client(url_of(agent, via))
    result = await client.call("Host.ping")
    assert abs(result["time"] - time.time()) < 60


async def test_capabilities(agent: AgentProcess, checked_client: ClientFactory,
                            schema: ApiSchema, via: str) -> None:
    client = await checked_client(url_of(agent, via))
    caps = await client.call("Host.getCapabilities")
    assert "test" in caps["domain_types"]
    assert caps["hypervisor"]["uri"] == "test:///default"
    assert caps["features"]["methods"] == sorted(schema.methods)
    assert caps["features"]["events"] == sorted(schema.events)
    assert set(caps["features"]["methods"]) >= {"Host.ping", "VM.list", "Api.describe"}
    assert_uuid(caps["host_uuid"])
    assert caps["memory_bytes"] > 0
    assert caps["cpu"]["count"] >= 1
    # The machine's memory is the one the statistics report, whatever the hypervisor's
    # mock host says it has.
    stats = await client.call("Host.getStats")
    assert caps["host_memory_bytes"] == stats["memory"]["total_bytes"]


async def test_host_uuid_survives_a_restart(agent: AgentProcess, checked_client: ClientFactory,
                                            tmp_path: Path) -> None:
    before = (await (await checked_client(agent.unix_url)).call("Host.getCapabilities"))
    assert await agent.stop() == 0
    async with running_agent(tmp_path) as again:
        client = await checked_client(again.tcp_url)
        after = await client.call("Host.getCapabilities")
        assert after["host_uuid"] == before["host_uuid"]
        await client.close()
    # A different state directory is a different host.
    (tmp_path / "other").mkdir()
    async with running_agent(tmp_path / "other") as other:
        client = await checked_client(other.unix_url)
        elsewhere = await client.call("Host.getCapabilities")
        assert_uuid(elsewhere["host_uuid"])
        assert elsewhere["host_uuid"] != before["host_uuid"]
        await client.close()


async def test_host_stats(agent: AgentProcess, checked_client: ClientFactory, via: str) -> None:
    client = await checked_client(url_of(agent, via))
    stats = await client.call("Host.getStats")
    assert stats["memory"]["total_bytes"] > 0
    assert 0 < stats["memory"]["available_bytes"] <= stats["memory"]["total_bytes"]
    assert "lo" in {nic["name"] for nic in stats["nics"]}
    assert stats["cpu"]["count"] >= 1


async def test_vm_list(agent: AgentProcess, checked_client: ClientFactory, via: str) -> None:
    client = await checked_client(url_of(agent, via))
    vms = (await client.call("VM.list"))["vms"]
    test_vms = [vm for vm in vms if vm["name"] == TEST_VM]
    assert len(test_vms) == 1
    assert test_vms[0]["state"] == "running"
    assert_uuid(test_vms[0]["vm_id"])
    assert [vm["name"] for vm in vms] == sorted(vm["name"] for vm in vms)

    running = (await client.call("VM.list", {"state": "running"}))["vms"]
    assert TEST_VM in {vm["name"] for vm in running}
    assert all(vm["state"] == "running" for vm in running)
    assert (await client.call("VM.list", {"state": "shutoff"}))["vms"] == []


async def test_api_describe_is_the_shipped_schema(agent: AgentProcess,
                                                  checked_client: ClientFactory,
                                                  schema: ApiSchema, via: str) -> None:
    client = await checked_client(url_of(agent, via))
    described = await client.call("Api.describe")
    shipped = schema.describe()
    assert [m["name"] for m in described["methods"]] == list(schema.methods)
    assert described["methods"] == shipped["methods"]
    assert [e["topic"] for e in described["events"]] == list(schema.events)
    assert {e["name"]: e["code"] for e in described["errors"]} == {
        name: spec.code for name, spec in schema.errors.items()
    }
    assert described["info"]["version"] == schema.version


async def test_post_rpc_over_tcp(agent: AgentProcess, schema: ApiSchema) -> None:
    url = f"{agent.http_url}/rpc"
    headers = {"Content-Type": "application/json"}
    batch = [
        {"jsonrpc": "2.0", "method": "Host.ping", "id": 1},
        {"jsonrpc": "2.0", "method": "VM.list", "params": {"state": "running"}, "id": 2},
        {"jsonrpc": "2.0", "method": "VM.list", "params": {"bogus": 1}, "id": 3},
    ]
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=json.dumps(batch[0]), headers=headers) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            single = await resp.json()
        async with http.post(url, data=json.dumps(batch), headers=headers) as resp:
            assert resp.status == 200
            answers = {a["id"]: a for a in await resp.json()}
        async with http.get(f"{agent.http_url}/healthz") as resp:
            assert resp.status == 200
            health = await resp.json()

    assert single["jsonrpc"] == "2.0"
    assert single["id"] == 1
    schema.check_result("Host.ping", single["result"])
    assert answers.keys() == {1, 2, 3}
    schema.check_result("Host.ping", answers[1]["result"])
    schema.check_result("VM.list", answers[2]["result"])
    assert TEST_VM in {vm["name"] for vm in answers[2]["result"]["vms"]}
    assert answers[3]["error"]["code"] == -32602
    assert answers[3]["error"]["data"]["field"] == "bogus"
    assert health["status"] == "ok"
    assert health["hypervisor"]["uri"] == "test:///default"


# --- the command line ---------------------------------------------------------------------


async def run_cli(*args: str) -> tuple[int, str, str]:
    done = await virtnode(*args)
    return done.status, done.out, done.err


async def test_cli_call_prints_the_result(agent: AgentProcess, schema: ApiSchema,
                                          via: str) -> None:
    status, out, err = await run_cli("call", "VM.list", "state=running",
                                     "--url", url_of(agent, via))
    assert status == 0, err
    result = json.loads(out)
    schema.check_result("VM.list", result)
    assert TEST_VM in {vm["name"] for vm in result["vms"]}

    status, out, err = await run_cli("call", "Host.ping", "--url", url_of(agent, via))
    assert status == 0, err
    assert abs(json.loads(out)["time"] - time.time()) < 60


async def test_cli_call_error_goes_to_stderr_with_status_1(agent: AgentProcess) -> None:
    status, out, err = await run_cli("call", "VM.list", "bogus=1", "--url", agent.unix_url)
    assert status == 1
    assert out == ""
    error = json.loads(err)
    assert error["code"] == -32602
    assert error["data"]["name"] == "InvalidParams"
    assert error["data"]["field"] == "bogus"


# --- stopping and starting ----------------------------------------------------------------


async def test_sigterm_exits_0_and_removes_the_socket(agent: AgentProcess) -> None:
    assert agent.unix_path.exists()
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{agent.http_url}/rpc")
        started = time.monotonic()
        status = await agent.stop(signal.SIGTERM, timeout=5.0)
        assert time.monotonic() - started < 5.0
        msg = await ws.receive(timeout=5.0)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
    assert status == 0, agent.log
    assert not agent.unix_path.exists()
    assert "virtnode stopped" in agent.log
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", agent.tcp_port)


async def test_start_to_ready_under_one_second(tmp_path: Path) -> None:
    timings = []
    for attempt in range(3):
        workdir = tmp_path / f"start{attempt}"
        workdir.mkdir()
        # As operators run it: without the development check of every result and event
        # (compiling those validators is what that check costs at start).
        agent = await start_agent(workdir, sections={"server": {"check_results": False},
                                                     "log": {"level": "info"}})
        timings.append(agent.ready_at - agent.started_at)
        assert await agent.stop() == 0, agent.log
    assert min(timings) < 1.0, f"start-to-ready times: {timings}"


@pytest.fixture
async def read_only_dir(tmp_path: Path) -> AsyncIterator[Path]:
    """An empty directory on a filesystem mounted read-only (needs root)."""
    if os.geteuid() != 0:
        missing("mounting a read-only filesystem needs root")
    path = tmp_path / "read-only"
    path.mkdir()
    async with tmpfs(path, "ro,size=1m"):
        yield path


async def serve_exit(tmp_path: Path, state_dir: Path) -> tuple[int, str]:
    """Run ``virtnode serve`` with ``state_dir``; its exit status and stderr."""
    config = write_config(tmp_path / "virtnode.toml", {
        "server": {"listen": [f"unix:{tmp_path / 'run' / 'virtnode.sock'}"]},
        "state": {"dir": str(state_dir)},
    })
    done = await virtnode("serve", "--config", str(config), timeout=60)
    return done.status, done.err


@pytest.mark.parametrize("case", ["a-file", "under-a-file", "host-id-a-directory"])
async def test_a_state_dir_that_is_not_a_directory_is_a_configuration_error(
        tmp_path: Path, case: str) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    state_dir = {"a-file": tmp_path / "file", "under-a-file": tmp_path / "file" / "state",
                 "host-id-a-directory": tmp_path / "state"}[case]
    if case == "host-id-a-directory":
        (state_dir / "host-id").mkdir(parents=True)
    status, err = await serve_exit(tmp_path, state_dir)
    assert status == 2, err
    assert f"virtnode: configuration error: state.dir: {state_dir}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "virtnode.sock").exists()


async def test_a_state_dir_that_cannot_be_written_is_a_configuration_error(
        tmp_path: Path, read_only_dir: Path) -> None:
    for state_dir in (read_only_dir, read_only_dir / "state"):
        status, err = await serve_exit(tmp_path, state_dir)
        assert status == 2, err
        assert f"virtnode: configuration error: state.dir: {state_dir}" in err
        assert "Traceback" not in err


async def test_state_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    names = ("state.db", "state.db-wal", "state.db-shm")
    async with running_agent(tmp_path, sections={"log": {"level": "info"}}) as agent:
        assert stat.S_IMODE(state.stat().st_mode) == 0o711
        for name in names:
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    assert agent.proc.returncode == 0, agent.log
    # A database an older agent made readable to all is made private at the next start.
    state.chmod(0o755)
    (state / "state.db").chmod(0o644)
    async with running_agent(tmp_path, sections={"log": {"level": "info"}}):
        for name in names:
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(state.stat().st_mode) == 0o755  # the operator's own directory


@pytest.mark.parametrize("tables", [
    # A jobs table from another schema: the index on ``finished`` cannot be made.
    "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, kind TEXT);"
    "INSERT INTO schema VALUES ('jobs', 1)",
    # Both components at a known version, but a journal table lacking columns.
    "CREATE TABLE journal (seq INTEGER PRIMARY KEY);"
    "INSERT INTO schema VALUES ('journal', 1), ('jobs', 1)",
])
async def test_a_database_from_another_schema_is_kept_aside(
        tmp_path: Path, checked_client: ClientFactory, tables: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    conn = sqlite3.connect(state / "state.db")
    conn.executescript("CREATE TABLE schema (component TEXT PRIMARY KEY, "
                       f"version INTEGER NOT NULL); {tables};")
    conn.close()
    async with running_agent(tmp_path) as agent:
        client = await checked_client(agent.unix_url)
        await client.call("Host.ping")
        await client.call("Job.list")
        aside = [p.name for p in state.glob("state.db.unreadable-*")]
        assert len([name for name in aside if name.split("-")[-1].isdigit()]) == 1, aside
        await agent.wait_log("is unreadable")
    assert agent.proc.returncode == 0, agent.log


async def test_each_request_is_logged_at_debug(agent: AgentProcess,
                                               checked_client: ClientFactory) -> None:
    client = await checked_client(agent.unix_url)
    await client.call("Host.ping")
    with pytest.raises(Exception, match="InvalidParams"):
        await client.call("VM.list", {"bogus": 1})
    await agent.wait_log("call VM.list caller=uid:0")
    lines = [line for line in agent.log_lines if "virtnode.rpc.dispatch: call " in line]
    ping = next(line for line in lines if "call Host.ping " in line)
    assert "caller=uid:0" in ping and "outcome=ok" in ping and "duration_ms=" in ping
    bad = next(line for line in lines if "call VM.list " in line)
    assert "outcome=InvalidParams" in bad


# --- text that is not Unicode -------------------------------------------------------------

#: Requests with a lone surrogate, as an escape: valid JSON grammar, but no UTF-8 form.
SURROGATE_ID = r'{"jsonrpc": "2.0", "method": "Host.ping", "id": "\ud800"}'
SURROGATE_METHOD = r'{"jsonrpc": "2.0", "method": "VM.\udc00", "id": 1}'


def assert_bad_unicode(answer: Any) -> None:
    assert answer["id"] is None
    assert answer["error"]["code"] == -32700
    assert answer["error"]["data"] == {"name": "ParseError", "reason": "bad_unicode"}


async def test_text_that_is_not_unicode_is_a_parse_error(agent: AgentProcess) -> None:
    url = f"{agent.http_url}/rpc"
    headers = {"Content-Type": "application/json"}
    ping = json.dumps({"jsonrpc": "2.0", "method": "Host.ping", "id": 2})
    async with aiohttp.ClientSession() as http, asyncio.timeout(30):
        for body in (SURROGATE_ID.encode(), SURROGATE_METHOD.encode(),
                     b'{"jsonrpc": "2.0", "method": "Host.ping", "id": "\xff"}',
                     b'{"jsonrpc": "2.0", "method": "Host.ping", "id": "\xed\xa0\x80"}'):
            async with http.post(url, data=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                assert_bad_unicode(await resp.json())

        ws = await http.ws_connect(url)
        for text in (SURROGATE_METHOD, SURROGATE_ID):
            await ws.send_str(text)
            assert_bad_unicode(await ws.receive_json(timeout=10))
        # Binary frames are bytes like a POST body; the connection serves on after all.
        await ws.send_bytes(b'{"jsonrpc": "2.0", "method": "Host.ping", "id": "\xff"}')
        assert_bad_unicode(await ws.receive_json(timeout=10))
        await ws.send_str(ping)
        assert (await ws.receive_json(timeout=10))["id"] == 2
        await ws.close()
    assert "never retrieved" not in agent.log


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"xml": "<domain type='test'><name>a\u0000b</name></domain>"}, "xml"),
        ({"spec": {"name": "vm1", "disks": [{"path": "/images/a\u0000.img"}]}},
         "spec.disks.0.path"),
        ({"spec": {"name": "vm1", "kernel": "/boot/vmlinuz\u0001"}}, "spec.kernel"),
    ],
    ids=["xml", "disk-path", "kernel"],
)
async def test_control_characters_in_vm_create_name_the_field(
        agent: AgentProcess, checked_client: ClientFactory,
        params: JsonObject, field: str) -> None:
    client = await checked_client(agent.unix_url)
    with pytest.raises(RemoteError) as caught:
        await client.call("VM.create", params, timeout=30)
    assert caught.value.error["code"] == -32602
    assert caught.value.error["data"]["field"] == field
    assert caught.value.reason == "control_character"
    vms = (await client.call("VM.list"))["vms"]
    assert [vm["name"] for vm in vms] == [TEST_VM]
