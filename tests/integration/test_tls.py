"""Remote access over mutual TLS: an agent on a tls:// listener, certificates from openssl."""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.agentproc import AgentProcess, free_port, start_agent, write_config
from tests.pki import Pki
from tests.subproc import run, virtnode
from virtnode.client import Client, ConnectionLost, RemoteError, SyncClient
from virtnode.rpc.schema import ApiSchema

pytestmark = pytest.mark.integration

#: A write method: an admin gets past the access check to NotFound, a reader does not.
ADMIN_PROBE = ("Job.cancel", {"job_id": str(uuid.UUID(int=1))})


@pytest.fixture
async def tls_agent(tmp_path: Path, pki: Pki) -> AsyncIterator[AgentProcess]:
    agent = await start_agent(tmp_path, tls=pki)
    yield agent
    assert await agent.stop() == 0, agent.log


async def connect(url: str, tls: ssl.SSLContext, schema: ApiSchema) -> Client:
    return await Client.connect(url, tls=tls, timeout=5.0, result_check=schema.check_result)


async def is_admin(client: Client) -> bool:
    method, params = ADMIN_PROBE
    with pytest.raises(RemoteError) as caught:
        await client.call(method, params, timeout=10)
    assert caught.value.name in ("NotFound", "PermissionDenied"), caught.value
    return caught.value.name == "NotFound"


# -- the right certificate --------------------------------------------------------------------


async def test_engine_certificate_gets_the_admin_role(tls_agent: AgentProcess, pki: Pki,
                                                      schema: ApiSchema) -> None:
    async with await connect(tls_agent.tls_url, pki.client_tls(pki.client), schema) as client:
        assert "time" in await client.call("Host.ping", timeout=10)
        assert await is_admin(client)
    # The certificate's CN names the caller in the log.
    await tls_agent.wait_log("call Job.cancel caller=cn:engine ")
    # The same agent's plain loopback listener still gives access.tcp_role (reader).
    async with await Client.connect(tls_agent.tcp_url) as plain:
        assert not await is_admin(plain)


@pytest.mark.parametrize("form", ["tls", "wss"])
async def test_url_forms_and_the_dns_name(tls_agent: AgentProcess, pki: Pki, schema: ApiSchema,
                                          form: str) -> None:
    # "localhost" is a DNS name in the server certificate, 127.0.0.1 an IP address.
    host = "localhost" if form == "wss" else "127.0.0.1"
    url = f"{form}://{host}:{tls_agent.tls_port}" + ("/rpc" if form == "wss" else "")
    async with await connect(url, pki.client_tls(pki.client), schema) as client:
        assert "time" in await client.call("Host.ping", timeout=10)


async def test_sync_client(tls_agent: AgentProcess, pki: Pki) -> None:
    def ping() -> dict[str, Any]:
        with SyncClient(tls_agent.tls_url, tls=pki.client_tls(pki.client)) as client:
            return client.call("Host.ping")

    assert "time" in await asyncio.to_thread(ping)


async def test_healthz_and_post_over_tls(tls_agent: AgentProcess, pki: Pki) -> None:
    tls = pki.client_tls(pki.client)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{tls_agent.https_url}/healthz", ssl=tls) as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ok"
        body = {"jsonrpc": "2.0", "method": ADMIN_PROBE[0], "params": ADMIN_PROBE[1], "id": 1}
        async with http.post(f"{tls_agent.https_url}/rpc", json=body, ssl=tls) as response:
            assert (await response.json())["error"]["data"]["name"] == "NotFound"


async def test_reader_cns_get_the_reader_role(tmp_path: Path, pki: Pki,
                                              schema: ApiSchema) -> None:
    collector = await pki.issue_client("collector", "metrics collector")
    agent = await start_agent(tmp_path, tls=pki,
                              sections={"access": {"tls_reader_cns": ["metrics collector"]}})
    try:
        async with await connect(agent.tls_url, pki.client_tls(collector), schema) as client:
            assert "time" in await client.call("Host.ping", timeout=10)
            assert not await is_admin(client)
        await agent.wait_log("caller=cn:metrics collector ")
        async with await connect(agent.tls_url, pki.client_tls(pki.client), schema) as client:
            assert await is_admin(client)
    finally:
        assert await agent.stop() == 0, agent.log


# -- refused ---------------------------------------------------------------------------------


async def assert_no_http_answer(agent: AgentProcess, tls: ssl.SSLContext) -> None:
    """The handshake fails: no HTTP response of any kind comes back."""
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"{agent.https_url}/healthz", ssl=tls) as response:
                pytest.fail(f"got an HTTP answer: {response.status}")


async def test_no_client_certificate_is_refused(tls_agent: AgentProcess, pki: Pki) -> None:
    tls = pki.client_tls(None)
    with pytest.raises(ConnectionLost):
        await Client.connect(tls_agent.tls_url, tls=tls, timeout=5.0)
    await assert_no_http_answer(tls_agent, tls)


async def test_certificate_of_another_ca_is_refused(tls_agent: AgentProcess, pki: Pki) -> None:
    # Same CN as the engine's; only the CA differs.
    tls = pki.client_tls(pki.other_client)
    with pytest.raises(ConnectionLost):
        await Client.connect(tls_agent.tls_url, tls=tls, timeout=5.0)
    await assert_no_http_answer(tls_agent, tls)


async def test_a_handshake_never_finished_is_cut_at_the_header_timeout(
        tmp_path: Path, pki: Pki) -> None:
    agent = await start_agent(tmp_path, tls=pki, sections={"server": {"header_timeout": 1.0}})
    try:
        reader, writer = await asyncio.open_connection(agent.tls_host, agent.tls_port)
        started = time.monotonic()
        # No ClientHello: a descriptor of the agent's is held until it gives up.
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        assert time.monotonic() - started < 5
        writer.close()
    finally:
        assert await agent.stop() == 0, agent.log


async def test_client_checks_the_agent_certificate(tls_agent: AgentProcess, pki: Pki) -> None:
    tls = pki.client_tls(pki.client, ca=pki.other_ca)
    with pytest.raises(ConnectionLost, match="certificate verify failed"):
        await Client.connect(tls_agent.tls_url, tls=tls, timeout=5.0)


async def test_hostname_is_checked_unless_told_otherwise(tmp_path: Path, pki: Pki,
                                                         schema: ApiSchema) -> None:
    # 127.0.0.2 is on the loopback but not in the certificate (127.0.0.1, localhost).
    agent = await start_agent(tmp_path, tls=pki, tls_host="127.0.0.2")
    try:
        assert agent.tls_url.startswith("tls://127.0.0.2:")
        with pytest.raises(ConnectionLost, match="certificate verify failed"):
            await Client.connect(agent.tls_url, tls=pki.client_tls(pki.client), timeout=5.0)
        chain_only = pki.client_tls(pki.client, check_hostname=False)
        async with await connect(agent.tls_url, chain_only, schema) as client:
            assert await is_admin(client)
        with pytest.raises(ConnectionLost):  # chain-only still checks the chain
            await Client.connect(agent.tls_url, timeout=5.0, tls=pki.client_tls(
                pki.client, ca=pki.other_ca, check_hostname=False))
    finally:
        assert await agent.stop() == 0, agent.log


# -- the command line ------------------------------------------------------------------------


async def test_cli_over_tls(tls_agent: AgentProcess, pki: Pki) -> None:
    files = ("--ca", pki.ca, "--cert", pki.client.cert, "--key", pki.client.key)
    done = await virtnode("call", "Host.ping", "--url", tls_agent.tls_url, *files)
    assert '"time"' in done.check()
    refused = await virtnode("call", "Host.ping", "--url", tls_agent.tls_url, "--ca", pki.ca)
    assert refused.status == 3, refused
    usage = await virtnode("call", "Host.ping", "--url", tls_agent.unix_url, *files)
    assert usage.status == 2
    assert "need a wss:// or tls:// URL" in usage.err


# -- configuration ---------------------------------------------------------------------------


async def serve(tmp_path: Path, sections: dict[str, dict[str, Any]]) -> tuple[int, str]:
    """Run ``virtnode serve`` where it cannot start; return its status and stderr."""
    config = {"server": {"listen": [f"tls://127.0.0.1:{free_port()}"]},
              "state": {"dir": str(tmp_path / "state")}}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = write_config(tmp_path / "bad.toml", config)
    done = await virtnode("serve", "--config", path, timeout=30.0)
    return done.status, done.err


@pytest.mark.parametrize("key", ["cert_file", "key_file", "ca_file"])
async def test_tls_listener_needs_its_files(tmp_path: Path, pki: Pki, key: str) -> None:
    tls = {k: v for k, v in pki.tls_section.items() if k != key}
    status, err = await serve(tmp_path, {"tls": tls})
    assert status == 2, err
    assert f"configuration error: tls.{key}: must be set" in err


@pytest.mark.parametrize(("change", "key", "why"), [
    ("missing cert", "cert_file", "cannot read"),
    ("cert is a key", "cert_file", "holds no PEM certificate"),
    ("other key", "key_file", "is not the key of the certificate"),
    ("encrypted key", "key_file", "is encrypted"),
    ("key is a cert", "key_file", "holds no PEM private key"),
    ("missing ca", "ca_file", "cannot read"),
    ("ca is a key", "ca_file", "holds no PEM certificate"),
])
async def test_unusable_tls_files_are_configuration_errors(
        tmp_path: Path, pki: Pki, change: str, key: str, why: str) -> None:
    encrypted = tmp_path / "encrypted.key"
    (await run("openssl", "pkey", "-in", pki.server.key, "-aes256", "-passout", "pass:x",
               "-out", encrypted)).check()
    value = {
        "missing cert": tmp_path / "absent.pem",
        "cert is a key": pki.server.key,
        "other key": pki.client.key,
        "encrypted key": encrypted,
        "key is a cert": pki.server.cert,
        "missing ca": tmp_path / "absent-ca.pem",
        "ca is a key": pki.ca_key,
    }[change]
    status, err = await serve(tmp_path, {"tls": {**pki.tls_section, key: str(value)}})
    assert status == 2, err
    assert f"configuration error: tls.{key}: " in err
    assert why in err
    assert "Traceback" not in err


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:{port}", "tcp://192.0.2.1:{port}"])
async def test_plain_tcp_is_still_loopback_only(tmp_path: Path, address: str) -> None:
    status, err = await serve(tmp_path, {"server": {"listen": [address.format(port=free_port())]}})
    assert status == 2, err
    assert "server.listen" in err
    assert "loopback only; use tls:// for remote access" in err
