"""Host networking through a real agent running inside a network namespace.

The host under test is a namespace ``host`` whose NICs are veth ends ``eth0``..``eth3``;
their peers ``p0``..``p3`` sit in a namespace ``peer`` (the switch, where clients live).
Everything is read back from the kernel with ``ip``/``bridge``, and traffic is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory, missing
from tests.integration.conftest import expect_error, next_event, wait_job
from tests.integration.netns import Netns, namespaces, veth
from tests.pki import Pki, make_pki
from tests.subproc import run
from virtnode.client import Client

pytestmark = pytest.mark.integration

NICS = 4


@dataclass
class NetHost:
    host: Netns
    peer: Netns
    tmp: Path
    boot_id: Path
    agent: AgentProcess
    tls: Pki | None = None

    async def start(self) -> None:
        self.agent = await start_agent(self.tmp / "agent", wrapper=self.host.exec_prefix(),
                                       sections=self.sections(), tls=self.tls,
                                       tls_host="0.0.0.0")

    def sections(self) -> dict[str, dict[str, Any]]:
        return {"network": {"boot_id_file": str(self.boot_id)}}

    async def ping(self, address: str, *, ns: Netns | None = None) -> bool:
        ns = ns or self.peer
        out = await run("ip", "netns", "exec", ns.name, "ping", "-c", "1", "-W", "1",
                        address, timeout=10)
        return out.status == 0


@pytest.fixture
async def net_host(tmp_path: Path) -> AsyncIterator[NetHost]:
    async with _net_host(tmp_path, None) as box:
        yield box


@pytest.fixture
async def tls_net_host(tmp_path: Path) -> AsyncIterator[NetHost]:
    """A net_host whose agent also serves TLS on every address, with a server certificate
    for 10.77.1.1."""
    if shutil.which("openssl") is None:
        missing("the openssl command is not installed")
    pki = await make_pki(tmp_path / "pki", server_ips=("10.77.1.1", "127.0.0.1"))
    async with _net_host(tmp_path, pki) as box:
        yield box


@contextlib.asynccontextmanager
async def _net_host(tmp_path: Path, pki: Pki | None) -> AsyncIterator[NetHost]:
    async with namespaces(2) as (host, peer):
        for i in range(NICS):
            await veth(host, f"eth{i}", peer, f"p{i}")
        boot_id = tmp_path / "boot_id"
        boot_id.write_text("boot-1\n")
        box = NetHost(host, peer, tmp_path, boot_id, agent=None,  # type: ignore[arg-type]
                      tls=pki)
        await box.start()
        try:
            yield box
        finally:
            status = await box.agent.stop()
            # DHCP clients outlive the agent, as they should on a host: end the ones
            # this test's agent started.
            for pid in dhcp_client_pids(tmp_path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            assert status == 0, box.agent.log


def dhcp_client_pids(tmp_path: Path) -> list[int]:
    """The live dhclient processes the agent of ``tmp_path`` started (by its pid files)."""
    pids = []
    for pid_file in (tmp_path / "agent" / "state" / "dhcp").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            if os.path.basename(argv0) == b"dhclient":
                pids.append(pid)
    return pids


NO_CHECK = {"connectivity_check": False}


async def wait_link(ns: Netns, name: str, timeout: float = 10) -> None:
    """Wait until link ``name`` exists in ``ns`` (a change has been applied)."""
    async with asyncio.timeout(timeout):
        while True:
            if await _exists(ns, name):
                return
            await asyncio.sleep(0.05)


async def _exists(ns: Netns, name: str) -> bool:
    return (await run("ip", "-n", ns.name, "link", "show", "dev", name)).status == 0


async def setup(client: Client, networks: dict[str, Any], *,
                bonds: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Run Network.setup (no connectivity check unless asked) and return the ended job."""
    params = {"networks": networks, "options": {**NO_CHECK, **options}}
    if bonds is not None:
        params["bonds"] = bonds
    started = await client.call("Network.setup", params)
    return await wait_job(client, started["job_id"], timeout=60)


async def state_of(client: Client) -> dict[str, Any]:
    return dict(await client.call("Network.getState", {}))


def comparable(state: dict[str, Any]) -> dict[str, Any]:
    """Network.getState without what the kernel moves by itself (carrier/operstate of
    veth ends follow their peers; IPv6 link-local addresses come and go with links)."""
    links = [{k: v for k, v in link.items() if k not in ("carrier", "operstate")}
             for link in state["links"]]
    addresses = [a for a in state["addresses"] if a["scope"] != "link"]
    return {**state, "links": links, "addresses": addresses}


async def kernel_features(ns: Netns) -> dict[str, bool]:
    """What iproute2 finds the kernel can do, tried the same way in ``ns``."""
    async def works(*argv: str) -> bool:
        return (await run("ip", "-n", ns.name, *argv)).status == 0

    found = {"bridge": await works("link", "add", "fbr", "type", "bridge")}
    found["vlan_filtering"] = await works("link", "set", "fbr", "type", "bridge",
                                          "vlan_filtering", "1")
    found["vlan_8021q"] = await works("link", "add", "link", "fbr", "name", "fvl", "type",
                                      "vlan", "id", "5")
    found["bond"] = await works("link", "add", "fbo", "type", "bond")
    for name in ("fvl", "fbo", "fbr"):
        await run("ip", "-n", ns.name, "link", "del", name)
    return found


async def test_bridged_networks_with_mtu_vlan_and_addresses(  # noqa: PLR0915
        net_host: NetHost, checked_client: ClientFactory) -> None:
    client = await checked_client(net_host.agent.unix_url)
    host, peer = net_host.host, net_host.peer
    before = await state_of(client)
    assert before["features"]["bridge"] is True
    assert {k: v for k, v in before["features"].items() if k != "dhcp_client"} == (
        await kernel_features(host))
    assert before["managed"] == {"networks": [], "bonds": [], "links": []}

    lan = {"ports": ["eth0"], "mtu": 1400,
           "ipv4": {"method": "static", "address": "10.77.1.1/24"},
           "ipv6": {"method": "static", "address": "fd00:77:1::1/64"}}
    tagged: dict[str, Any] = {"ports": ["eth1"], "vlan": 100,
                              "ipv4": {"method": "static", "address": "10.77.2.1/24",
                                       "gateway": "10.77.2.254"}, "default_route": True}
    vlans_here = before["features"]["vlan_filtering"] or before["features"]["vlan_8021q"]
    if not vlans_here:
        # A kernel without bridge VLAN filtering and 8021q (this one): refused up front.
        err = await expect_error(client, "Network.setup", {
            "networks": {"lan": lan, "tagged": tagged}, "options": NO_CHECK})
        assert (err.name, err.data["reason"]) == ("InvalidArgument", "unsupported")
        assert comparable(await state_of(client)) == comparable(before)
        del tagged["vlan"]
    job = await setup(client, {"lan": lan, "tagged": tagged})
    assert job["state"] == "succeeded", job
    lan_link = (await host.ip_json("-d", "link", "show", "lan"))[0]
    assert lan_link["mtu"] == 1400 and lan_link["linkinfo"]["info_kind"] == "bridge"
    assert lan_link["linkinfo"]["info_data"]["stp_state"] == 0
    eth0 = (await host.ip_json("link", "show", "eth0"))[0]
    assert (eth0["master"], eth0["mtu"]) == ("lan", 1400)
    addrs = {f"{a['local']}/{a['prefixlen']}" for a in
             (await host.ip_json("addr", "show", "lan"))[0]["addr_info"]}
    assert {"10.77.1.1/24", "fd00:77:1::1/64"} <= addrs
    routes = await host.ip_json("route", "show", "default")
    assert [(r["gateway"], r["dev"]) for r in routes] == [("10.77.2.254", "tagged")]
    await peer.ip("addr", "add", "10.77.1.2/24", "dev", "p0")
    assert await net_host.ping("10.77.1.1")
    if before["features"]["vlan_filtering"]:
        vlans = {v["ifname"]: v["vlans"] for v in await host.bridge_json("vlan", "show")}
        assert [(v["vlan"], sorted(v.get("flags", []))) for v in vlans["eth1"]] == [(100, [])]
        assert [(v["vlan"], sorted(v.get("flags", []))) for v in vlans["tagged"]] == [
            (100, ["Egress Untagged", "PVID"])]
        # Tagged 100 on the wire: the peer untags with a filtering bridge of its own.
        await peer.ip("link", "add", "pbr", "type", "bridge", "vlan_filtering", "1")
        await peer.ip("link", "set", "p1", "master", "pbr")
        await run("bridge", "-n", peer.name, "vlan", "add", "dev", "p1", "vid", "100")
        await run("bridge", "-n", peer.name, "vlan", "del", "dev", "p1", "vid", "1")
        await run("bridge", "-n", peer.name, "vlan", "add", "dev", "pbr", "vid", "100",
                  "pvid", "untagged", "self")
        await peer.ip("addr", "add", "10.77.2.2/24", "dev", "pbr")
        await peer.ip("link", "set", "pbr", "up")
    else:
        await peer.ip("addr", "add", "10.77.2.2/24", "dev", "p1")
    assert await net_host.ping("10.77.2.1")
    if before["features"]["vlan_filtering"]:
        # A VM's tap as libvirt plugs it (a port joining the bridge, nothing more) is on
        # the VLAN untagged: a "VM" namespace behind it reaches the peer over VLAN 100.
        async with namespaces(1) as (vm,):
            await veth(host, "vnet0", vm, "vmnic")
            await host.ip("link", "set", "vnet0", "master", "tagged")
            vlans = {v["ifname"]: v["vlans"] for v in await host.bridge_json("vlan", "show")}
            assert [(v["vlan"], sorted(v.get("flags", []))) for v in vlans["vnet0"]] == [
                (100, ["Egress Untagged", "PVID"])]
            await vm.ip("addr", "add", "10.77.2.3/24", "dev", "vmnic")
            assert await net_host.ping("10.77.2.2", ns=vm)

    listed = {n["name"]: n for n in (await client.call("Network.list", {}))["networks"]}
    assert sorted(listed) == ["lan", "tagged"]
    assert listed["tagged"]["config"].get("vlan") == tagged.get("vlan")
    assert not listed["tagged"]["persisted"]
    state = await state_of(client)
    assert state["managed"]["networks"] == ["lan", "tagged"]
    assert {"lan", "tagged", "eth0", "eth1"} <= set(state["managed"]["links"])
    assert "eth2" not in state["managed"]["links"]

    # A change touches only what differs: a new address, a smaller MTU, STP on.
    job = await setup(client, {"lan": {
        "ports": ["eth0"], "mtu": 1300, "stp": True,
        "ipv4": {"method": "static", "address": "10.77.3.1/24"},
        "ipv6": {"method": "static", "address": "fd00:77:1::1/64"}}})
    assert job["state"] == "succeeded", job
    addrs = {f"{a['local']}/{a['prefixlen']}" for a in
             (await host.ip_json("addr", "show", "lan"))[0]["addr_info"]}
    assert "10.77.3.1/24" in addrs and "10.77.1.1/24" not in addrs
    lan_link = (await host.ip_json("-d", "link", "show", "lan"))[0]
    assert lan_link["mtu"] == 1300 and lan_link["linkinfo"]["info_data"]["stp_state"] == 1

    job = await setup(client, {"lan": {"remove": True}, "tagged": {"remove": True}})
    assert job["state"] == "succeeded", job
    assert await host.ip_json("link", "show", "type", "bridge") == []
    eth0 = (await host.ip_json("link", "show", "eth0"))[0]
    assert "master" not in eth0
    assert await host.ip_json("route", "show", "default") == []
    assert (await client.call("Network.list", {}))["networks"] == []


async def test_bad_requests_change_nothing(net_host: NetHost,
                                           checked_client: ClientFactory) -> None:
    client = await checked_client(net_host.agent.unix_url)
    await setup(client, {"lan": {"ports": ["eth0"],
                                 "ipv4": {"method": "static", "address": "10.77.1.1/24"}}})
    await net_host.host.ip("addr", "add", "10.88.0.1/24", "dev", "eth3")
    before = await state_of(client)
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"bad/name": {"ports": ["eth1"]}}, "InvalidArgument", "bad_name"),
        ({"has space": {"ports": ["eth1"]}}, "InvalidArgument", "bad_name"),
        ({"eth2": {"ports": ["eth1"]}}, "InvalidArgument", "name_in_use"),
        ({"net2": {"ports": ["eth9"]}}, "InvalidArgument", "unknown_nic"),
        ({"net2": {"ports": ["lo"]}}, "InvalidArgument", "bad_port"),
        ({"net2": {"ports": ["eth0"]}}, "InvalidArgument", "nic_in_use"),
        ({"net2": {"ports": ["eth1", "eth2"]}}, "InvalidArgument", "too_many_ports"),
        ({"net2": {"ports": ["eth3"]}}, "InvalidArgument", "port_has_addresses"),
        ({"net2": {"ports": ["eth1"], "ipv4": {"method": "static",
                                                "address": "10.77.1.9/24"}}},
         "InvalidArgument", "address_overlap"),
        ({"net2": {"ports": ["eth1"], "ipv4": {"method": "static",
                                                "address": "10.88.0.7/16"}}},
         "InvalidArgument", "address_overlap"),
        ({"net2": {"ports": ["eth1"], "ipv4": {"method": "static", "address": "10.9.0.1/24",
                                                "gateway": "10.10.0.1"}}},
         "InvalidArgument", "bad_address"),
        ({"net2": {"ports": ["eth1"], "ipv4": {"method": "static", "address": "300.1.1.1/24"}}},
         "InvalidArgument", "bad_address"),
        ({"net2": {"ports": ["eth1"], "default_route": True}}, "InvalidArgument", "bad_route"),
        ({"nope": {"remove": True}}, "NotFound", "no_network"),
    ]
    for networks, name, reason in cases:
        err = await expect_error(client, "Network.setup", {"networks": networks,
                                                           "options": NO_CHECK})
        assert (err.name, err.data.get("reason")) == (name, reason), (networks, err)
    err = await expect_error(client, "Network.setup", {
        "networks": {"n" * 16: {"ports": ["eth1"]}}})
    assert (err.name, err.data["reason"]) == ("InvalidArgument", "bad_name")
    err = await expect_error(client, "Network.setup", {
        "networks": {"net2": {"ports": ["eth1"], "vlan": 4095}}})
    assert err.name == "InvalidParams"
    assert comparable(await state_of(client)) == comparable(before)
    assert [j for j in (await client.call("Job.list", {"kind": "Network.setup"}))["jobs"]
            if j["state"] != "succeeded"] == []


async def test_a_failed_step_rolls_back_every_network_of_the_change(
        net_host: NetHost, checked_client: ClientFactory) -> None:
    client = await checked_client(net_host.agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["network.config"]})
    await setup(client, {"keep": {"ports": ["eth0"], "mtu": 1400,
                                  "ipv4": {"method": "static", "address": "10.77.1.1/24"}}})
    before = await state_of(client)
    # New devices of this namespace refuse IPv6: the checks pass, the kernel says no when
    # the address is added, after other steps of the change were applied.
    await run("ip", "netns", "exec", net_host.host.name, "sysctl", "-q", "-w",
              "net.ipv6.conf.default.disable_ipv6=1")
    job = await setup(client, {
        "keep": {"ports": ["eth0"], "mtu": 1500,
                 "ipv4": {"method": "static", "address": "10.77.5.1/24"}},
        "a-new": {"ports": ["eth1"], "stp": True,
                  "ipv4": {"method": "static", "address": "10.77.6.1/24"}},
        "b-v6": {"ports": ["eth2"],
                 "ipv6": {"method": "static", "address": "fd00:77:7::1/64"}},
    })
    assert job["state"] == "failed", job
    assert job["error"]["data"]["reason"] == "rolled_back"
    assert job["error"]["data"]["trigger"] == "step_failed"
    event = await next_event(client, "network.config", lambda d: d["event"] == "rolled_back")
    assert event["job_id"] == job["job_id"]
    assert comparable(await state_of(client)) == comparable(before)
    assert [b["ifname"] for b in await net_host.host.ip_json(
        "link", "show", "type", "bridge")] == ["keep"]
    listed = (await client.call("Network.list", {}))["networks"]
    assert [(n["name"], n["config"]["mtu"]) for n in listed] == [("keep", 1400)]


async def bond_link(ns: Netns, name: str) -> dict[str, Any]:
    return dict((await ns.ip_json("-d", "link", "show", name))[0])


async def test_bonds(net_host: NetHost, checked_client: ClientFactory) -> None:  # noqa: PLR0915
    client = await checked_client(net_host.agent.unix_url)
    host, peer = net_host.host, net_host.peer
    before = await state_of(client)
    assert before["features"]["bond"] == (await kernel_features(host))["bond"]
    bond = {"slaves": ["eth1", "eth2"]}
    lan = {"ports": ["bond0"], "mtu": 1400,
           "ipv4": {"method": "static", "address": "10.77.5.1/24"}}
    if not before["features"]["bond"]:
        # A kernel without bonding (this one): refused up front, nothing changes.
        err = await expect_error(client, "Network.setup", {
            "networks": {"lan": lan}, "bonds": {"bond0": bond}, "options": NO_CHECK})
        assert (err.name, err.data["reason"], err.data["field"]) == (
            "InvalidArgument", "unsupported", "bonds.bond0")
        assert comparable(await state_of(client)) == comparable(before)
        return

    # A failed step rolls the bond back too: its slaves leave it and are up again.
    await run("ip", "netns", "exec", host.name, "sysctl", "-q", "-w",
              "net.ipv6.conf.default.disable_ipv6=1")
    job = await setup(client, {
        "lan": {**lan, "ipv6": {"method": "static", "address": "fd00:77:5::1/64"}}},
        bonds={"bond0": bond})
    assert (job["state"], job["error"]["data"]["trigger"]) == ("failed", "step_failed"), job
    assert comparable(await state_of(client)) == comparable(before)
    assert not await _exists(host, "bond0")
    await run("ip", "netns", "exec", host.name, "sysctl", "-q", "-w",
              "net.ipv6.conf.default.disable_ipv6=0")

    job = await setup(client, {"lan": lan}, bonds={"bond0": bond})
    assert job["state"] == "succeeded", job
    assert job["result"] == {"networks": ["lan"], "bonds": ["bond0"]}
    found = await bond_link(host, "bond0")
    assert found["linkinfo"]["info_kind"] == "bond"
    assert (found["linkinfo"]["info_data"]["mode"], found["linkinfo"]["info_data"]["miimon"]) \
        == ("active-backup", 100)
    assert (found["master"], found["mtu"]) == ("lan", 1400)
    for nic in ("eth1", "eth2"):
        slave = (await host.ip_json("link", "show", nic))[0]
        assert (slave["master"], slave["mtu"], "UP" in slave["flags"]) == ("bond0", 1400, True)
    state = await state_of(client)
    assert state["bonds"] == [{"name": "bond0", "slaves": ["eth1", "eth2"],
                               "mode": "active-backup", "miimon": 100}]
    assert state["managed"]["bonds"] == ["bond0"]
    assert {"lan", "bond0", "eth1", "eth2"} <= set(state["managed"]["links"])
    listed = (await client.call("Network.list", {}))["bonds"]
    assert listed == [{"name": "bond0", "persisted": False, "config": {
        "slaves": ["eth1", "eth2"], "mode": "active-backup", "miimon": 100}}]

    # Traffic crosses the bond, and keeps crossing when its active slave loses carrier.
    await peer.ip("link", "add", "pbr", "type", "bridge")
    for port in ("p1", "p2"):
        await peer.ip("link", "set", port, "master", "pbr")
    await peer.ip("addr", "add", "10.77.5.2/24", "dev", "pbr")
    await peer.ip("link", "set", "pbr", "up")
    assert await ping_soon(net_host, "10.77.5.1")
    await peer.ip("link", "set", "p1", "down")
    assert await ping_soon(net_host, "10.77.5.1")
    await peer.ip("link", "set", "p1", "up")

    # A slave leaves; then a new mode, which the kernel takes only from a bond without
    # slaves: the bond stays in its bridge with its slave.
    job = await setup(client, {}, bonds={"bond0": {"slaves": ["eth1"]}})
    assert job["state"] == "succeeded", job
    eth2 = (await host.ip_json("link", "show", "eth2"))[0]
    assert ("master" in eth2, "UP" in eth2["flags"]) == (False, True)  # up, as it was
    job = await setup(client, {}, bonds={"bond0": {"slaves": ["eth1"], "mode": "balance-rr",
                                                   "miimon": 50}})
    assert job["state"] == "succeeded", job
    found = await bond_link(host, "bond0")
    assert (found["linkinfo"]["info_data"]["mode"], found["linkinfo"]["info_data"]["miimon"],
            found["master"], "UP" in found["flags"]) == ("balance-rr", 50, "lan", True)
    assert (await host.ip_json("link", "show", "eth1"))[0]["master"] == "bond0"
    assert await ping_soon(net_host, "10.77.5.1")

    # The boot config holds the bond; after a boot it is made again under its network.
    assert await client.call("Network.persist", {}) == {"networks": ["lan"],
                                                        "bonds": ["bond0"]}
    configured = await state_of(client)
    assert await net_host.agent.stop() == 0
    for name in ("lan", "bond0"):
        await host.ip("link", "del", name)
    await host.ip("link", "set", "eth1", "up")
    net_host.boot_id.write_text("boot-2\n")
    await net_host.start()
    client = await checked_client(net_host.agent.unix_url)
    restored = await state_of(client)
    assert restored["bonds"] == configured["bonds"]
    assert restored["managed"] == configured["managed"]
    found = await bond_link(host, "bond0")
    assert (found["linkinfo"]["info_data"]["mode"], found["master"], found["mtu"]) == (
        "balance-rr", "lan", 1400)
    assert [b["persisted"] for b in (await client.call("Network.list", {}))["bonds"]] == [True]

    # A bond a network keeps cannot go; with its network it can.
    err = await expect_error(client, "Network.setup", {
        "networks": {}, "bonds": {"bond0": {"remove": True}}, "options": NO_CHECK})
    assert (err.name, err.data["reason"]) == ("InvalidArgument", "bond_in_use")
    err = await expect_error(client, "Network.setup", {
        "networks": {"other": {"ports": ["eth1"]}}, "options": NO_CHECK})
    assert (err.name, err.data["reason"]) == ("InvalidArgument", "nic_in_use")
    job = await setup(client, {"lan": {"remove": True}}, bonds={"bond0": {"remove": True}})
    assert job["state"] == "succeeded", job
    assert not await _exists(host, "bond0") and not await _exists(host, "lan")
    eth1 = (await host.ip_json("link", "show", "eth1"))[0]
    assert ("master" in eth1, "UP" in eth1["flags"]) == (False, True)
    listed = await client.call("Network.list", {})
    assert (listed["networks"], listed["bonds"]) == ([], [])


async def ping_soon(box: NetHost, address: str, tries: int = 10) -> bool:
    """Whether ``address`` answers within ``tries`` pings (a bond fails over in its
    miimon interval; the peer's bridge learns the MAC again)."""
    for _ in range(tries):
        if await box.ping(address):
            return True
    return False


async def test_one_change_at_a_time_and_confirm(net_host: NetHost,
                                                checked_client: ClientFactory) -> None:
    client = await checked_client(net_host.agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["network.config"]})
    started = await client.call("Network.setup", {
        "networks": {"lan": {"ports": ["eth0"],
                             "ipv4": {"method": "static", "address": "10.77.1.1/24"}}},
        "options": {"connectivity_timeout": 30}})
    job_id = started["job_id"]
    busy = await expect_error(client, "Network.setup", {
        "networks": {"other": {"ports": ["eth1"]}}})
    assert (busy.name, busy.data["reason"], busy.data["job_id"]) == ("Aborted", "busy", job_id)
    # Applied, waiting (progress 50): the bridge exists, the job runs.
    async with asyncio.timeout(10):
        while True:
            if (await client.call("Job.get", {"job_id": job_id}))["job"]["progress"] >= 50:
                break
            await asyncio.sleep(0.02)
    assert (await client.call("Job.get", {"job_id": job_id}))["job"]["state"] == "running"
    assert await _exists(net_host.host, "lan")
    confirmed = (await client.call("Network.confirm", {"job_id": job_id}))["job"]
    assert confirmed["state"] == "succeeded", confirmed
    event = await next_event(client, "network.config", lambda d: d["event"] == "committed")
    assert (event["job_id"], event["networks"]) == (job_id, ["lan"])
    late = await expect_error(client, "Network.confirm", {"job_id": job_id})
    assert (late.name, late.data["reason"]) == ("FailedPrecondition", "not_pending")
    assert await net_host.ping("10.77.1.1") is False  # the peer has no address yet
    await net_host.peer.ip("addr", "add", "10.77.1.2/24", "dev", "p0")
    assert await net_host.ping("10.77.1.1")


async def test_cancel_and_timeout_put_the_previous_state_back(
        net_host: NetHost, checked_client: ClientFactory) -> None:
    client = await checked_client(net_host.agent.unix_url)
    before = await state_of(client)
    started = await client.call("Network.setup", {
        "networks": {"lan": {"ports": ["eth0"], "mtu": 1280}},
        "options": {"connectivity_timeout": 60}})
    await wait_link(net_host.host, "lan")
    cancelled = (await client.call("Job.cancel", {"job_id": started["job_id"]}))["job"]
    assert cancelled["state"] == "cancelled"
    assert comparable(await state_of(client)) == comparable(before)

    started = await client.call("Network.setup", {
        "networks": {"lan": {"ports": ["eth0"]}}, "options": {"connectivity_timeout": 1}})
    job = await wait_job(client, started["job_id"], timeout=30)
    assert (job["state"], job["error"]["data"]["trigger"]) == ("failed", "connectivity_timeout")
    assert comparable(await state_of(client)) == comparable(before)
    assert (await client.call("Network.list", {}))["networks"] == []


async def test_a_crash_while_waiting_for_confirm_is_rolled_back_at_start(
        net_host: NetHost, checked_client: ClientFactory) -> None:
    client = await checked_client(net_host.agent.unix_url)
    before = await state_of(client)
    started = await client.call("Network.setup", {
        "networks": {"lan": {"ports": ["eth0"],
                             "ipv4": {"method": "static", "address": "10.77.1.1/24"}}},
        "options": {"connectivity_timeout": 120}})
    await wait_link(net_host.host, "lan")
    await client.close()
    os.kill(net_host.agent.pid, signal.SIGKILL)
    await net_host.agent.stop()
    assert await net_host.host.ip_json("link", "show", "lan")  # the kernel kept it
    await net_host.start()
    client = await checked_client(net_host.agent.unix_url)
    assert comparable(await state_of(client)) == comparable(before)
    job = (await client.call("Job.get", {"job_id": started["job_id"]}))["job"]
    assert (job["state"], job["error"]["data"]["reason"]) == ("failed", "interrupted")
    assert "rolled back (interrupted)" in net_host.agent.log


async def test_persist_then_restore_after_a_boot(net_host: NetHost,
                                                 checked_client: ClientFactory) -> None:
    client = await checked_client(net_host.agent.unix_url)
    kept = {"ports": ["eth0"], "stp": True, "mtu": 1400,
            "ipv4": {"method": "static", "address": "10.77.1.1/24"},
            "ipv6": {"method": "static", "address": "fd00:77:1::1/64"}}
    await setup(client, {"kept": kept, "gone": {"ports": ["eth1"]}})
    assert (await client.call("Network.persist", {}))["networks"] == ["gone", "kept"]
    await setup(client, {"late": {"ports": ["eth2"]}})  # after persist: not in the boot config
    listed = {n["name"]: n["persisted"] for n in
              (await client.call("Network.list", {}))["networks"]}
    assert listed == {"gone": True, "kept": True, "late": False}
    configured = await state_of(client)
    assert await net_host.agent.stop() == 0

    # A boot: the kernel forgets the networks, a NIC is gone, the boot id changes.
    for name in ("kept", "gone", "late"):
        await net_host.host.ip("link", "del", name)
    await net_host.host.ip("link", "del", "eth1")
    await net_host.host.ip("link", "set", "eth0", "mtu", "1500")
    net_host.boot_id.write_text("boot-2\n")
    await net_host.start()
    client = await checked_client(net_host.agent.unix_url)
    state = await state_of(client)
    assert state["managed"]["networks"] == ["kept"]
    kept_before = [link for link in comparable(configured)["links"]
                   if link["name"] in ("kept", "eth0")]
    kept_after = [link for link in comparable(state)["links"] if link["name"] in ("kept", "eth0")]
    assert [{k: v for k, v in link.items() if k != "mac"} for link in kept_after] == [
        {k: v for k, v in link.items() if k != "mac"} for link in kept_before]
    assert [a for a in comparable(state)["addresses"] if a["link"] == "kept"] == [
        a for a in comparable(configured)["addresses"] if a["link"] == "kept"]
    assert "boot config of gone not restored: no such NIC: eth1" in net_host.agent.log
    listed = {n["name"]: n["persisted"] for n in
              (await client.call("Network.list", {}))["networks"]}
    assert listed == {"kept": True}

    # A restart without a boot changes nothing.
    assert await net_host.agent.stop() == 0
    await net_host.start()
    client = await checked_client(net_host.agent.unix_url)
    assert comparable(await state_of(client)) == comparable(state)


async def test_link_events(net_host: NetHost, checked_client: ClientFactory) -> None:
    client = await checked_client(net_host.agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["network.link"]})
    await state_of(client)  # answers once host networking (and its monitor) is ready
    await net_host.host.ip("link", "set", "eth3", "down")
    event = await next_event(client, "network.link",
                             lambda d: d["link"] == "eth3" and "up" in d["changes"])
    assert event["up"] is False and event["event"] == "changed"
    await net_host.host.ip("link", "set", "eth3", "mtu", "1400")
    event = await next_event(client, "network.link",
                             lambda d: d["link"] == "eth3" and "mtu" in d["changes"])
    assert event["mtu"] == 1400
    await net_host.host.ip("addr", "add", "10.99.0.1/24", "dev", "eth3")
    event = await next_event(client, "network.link",
                             lambda d: d["link"] == "eth3" and "address_added" in d["changes"])
    assert event["address"] == "10.99.0.1/24"


#: Run in the peer namespace: a client that reaches the agent over TLS on the bridge's
#: address, moves that address away, cannot confirm, and reconnects after the rollback.
CLIENT = """
import asyncio, json, sys, time
from urllib.parse import urlsplit
from virtnode.client import Client, tls_context

async def answers(address):
    ping = await asyncio.create_subprocess_exec(
        "ping", "-c", "1", "-W", "1", address,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    return await ping.wait() == 0

async def main():
    url, ca, cert, key = sys.argv[1:5]
    tls = tls_context(ca, cert, key)
    client = await Client.connect(url, tls=tls)
    started = await client.call("Network.setup", {"networks": {"lan": {
        "ports": ["eth0"], "ipv4": {"method": "static", "address": "10.77.9.1/24"}}},
        "options": {"connectivity_timeout": 4}})
    job_id = started["job_id"]
    print(json.dumps({"job_id": job_id}), flush=True)
    # Applied once the address this client uses is gone (it comes back with the rollback,
    # 4 s later).
    deadline = time.monotonic() + 10
    while await answers(urlsplit(url).hostname):
        if time.monotonic() > deadline:
            raise AssertionError("the change never took the address away")
        await asyncio.sleep(0.05)
    try:
        async with asyncio.timeout(2):
            await client.call("Network.confirm", {"job_id": job_id})
        print(json.dumps({"confirmed": True}), flush=True)
    except Exception as exc:
        print(json.dumps({"confirm_failed": type(exc).__name__}), flush=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            async with asyncio.timeout(2):
                again = await Client.connect(url, tls=tls)
                await again.call("Host.ping", {})
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    job = (await again.call("Job.wait", {"job_id": job_id, "timeout": 30}))["job"]
    print(json.dumps({"reconnected": True, "job": job}), flush=True)

asyncio.run(main())
"""


async def test_a_client_cut_off_by_its_change_gets_the_previous_state_back(
        tls_net_host: NetHost, checked_client: ClientFactory) -> None:
    box = tls_net_host
    assert box.tls is not None
    client = await checked_client(box.agent.unix_url)
    await setup(client, {"lan": {"ports": ["eth0"],
                                 "ipv4": {"method": "static", "address": "10.77.1.1/24"}}})
    await box.peer.ip("addr", "add", "10.77.1.2/24", "dev", "p0")
    assert await box.ping("10.77.1.1")
    before = await state_of(client)
    script = box.tmp / "client.py"
    script.write_text(CLIENT)
    url = f"tls://10.77.1.1:{box.agent.tls_port}"
    out = await run("ip", "netns", "exec", box.peer.name, sys.executable, script, url,
                    str(box.tls.ca), str(box.tls.client.cert), str(box.tls.client.key),
                    timeout=90)
    assert out.status == 0, out.err
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert "confirm_failed" in lines[1], lines
    job = lines[2]["job"]
    assert lines[2]["reconnected"] and job["job_id"] == lines[0]["job_id"]
    assert (job["state"], job["error"]["data"]["reason"], job["error"]["data"]["trigger"]) == (
        "failed", "rolled_back", "connectivity_timeout")
    assert comparable(await state_of(client)) == comparable(before)
    listed = (await client.call("Network.list", {}))["networks"]
    assert listed[0]["config"]["ipv4"]["address"] == "10.77.1.1/24"


@contextlib.asynccontextmanager
async def dhcp_server(peer: Netns, tmp: Path, *subnets: tuple[str, str],
                      v6: tuple[str, str] | None = None) -> AsyncIterator[Path]:
    """dnsmasq in ``peer`` serving DHCP (no DNS) on each (peer device, 10.77.N) subnet:
    the peer end gets 10.77.N.1/24 and hands out 10.77.N.100-150 with router 10.77.N.1
    and DNS server 10.77.N.53. With ``v6`` (peer device, fd00:77:N), DHCPv6 too: the
    peer end gets fd00:77:N::1/64, advertises the prefix and hands out
    fd00:77:N::100-150. Yields its lease file."""
    dnsmasq = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if dnsmasq is None:
        missing("dnsmasq (Debian's dnsmasq-base) is not installed")
    leases = tmp / "dnsmasq.leases"
    argv = [dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            "--bind-interfaces", "--user=root", f"--dhcp-leasefile={leases}",
            "--log-dhcp", "--log-facility=-"]
    for dev, net in subnets:
        await peer.ip("addr", "add", f"{net}.1/24", "dev", dev)
        argv += [f"--interface={dev}", f"--dhcp-range={dev},{net}.100,{net}.150,255.255.255.0,1h",
                 f"--dhcp-option={dev},option:router,{net}.1",
                 f"--dhcp-option={dev},option:dns-server,{net}.53"]
    if v6 is not None:
        dev, net = v6
        await peer.ip("addr", "add", f"{net}::1/64", "dev", dev, "nodad")
        # Router advertisements tell the host that the prefix is on-link (a DHCPv6 lease
        # is a /128 and says nothing of routes).
        argv += [f"--interface={dev}", f"--dhcp-range={dev},{net}::100,{net}::150,64,1h",
                 "--enable-ra"]
    log = (tmp / "dnsmasq.log").open("wb")
    proc = await asyncio.create_subprocess_exec(*peer.exec_prefix(), *argv,
                                                stdout=log, stderr=log)
    try:
        yield leases
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


async def leased(ns: Netns, dev: str, net: str, timeout: float = 30) -> str:
    """Wait for an address from 10.77.N.100-150 (or fd00:77:N::100-150) on ``dev``;
    return it."""
    family, first = ("-6", f"{net}::1") if ":" in net else ("-4", f"{net}.1")
    async with asyncio.timeout(timeout):
        while True:
            for found in await ns.ip_json(family, "addr", "show", "dev", dev):
                for a in found["addr_info"]:
                    if a["local"].startswith(first) and a["local"] != first:
                        return f"{a['local']}/{a['prefixlen']}"
            await asyncio.sleep(0.1)


async def restart_without_dhcp_clients(net_host: NetHost,
                                       checked_client: ClientFactory) -> Client:
    """Stop the agent, kill its DHCP clients, start it again; a client once it is ready."""
    assert await net_host.agent.stop() == 0
    for pid in dhcp_client_pids(net_host.tmp):
        os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(10):
        while True:
            if not dhcp_client_pids(net_host.tmp):
                break
            await asyncio.sleep(0.05)
    await net_host.start()
    client = await checked_client(net_host.agent.unix_url)
    await state_of(client)  # ready
    return client


async def test_dhcp_networks(net_host: NetHost, checked_client: ClientFactory) -> None:
    client = await checked_client(net_host.agent.unix_url)
    host, peer = net_host.host, net_host.peer
    before = await state_of(client)
    if not before["features"]["dhcp_client"]:
        missing("no DHCP client (isc-dhcp-client) is installed")
    async with dhcp_server(peer, net_host.tmp, ("p0", "10.77.9"), ("p1", "10.77.8"),
                           v6=("p3", "fd00:77:10")):
        job = await setup(client, {
            "lan": {"ports": ["eth0"], "ipv4": {"method": "dhcp"}, "default_route": True},
            "side": {"ports": ["eth1"], "ipv4": {"method": "dhcp"}},
            "six": {"ports": ["eth3"], "ipv6": {"method": "dhcp"}},
        })
        assert job["state"] == "succeeded", job["error"]
        lan = await leased(host, "lan", "10.77.9")
        side = await leased(host, "side", "10.77.8")
        six = await leased(host, "six", "fd00:77:10")
        # The prefix's route comes with an advertisement, and the address is usable once
        # its duplicate address detection is over: try for a while.
        async with asyncio.timeout(30):
            while True:
                if await net_host.ping(six.split("/")[0]):
                    break
                await asyncio.sleep(0.2)
        assert await net_host.ping(lan.split("/")[0])
        # The lease's router is the default route only where the network says so.
        routes = await host.ip_json("route", "show", "default")
        assert [(r["gateway"], r["dev"]) for r in routes] == [("10.77.9.1", "lan")]
        # The lease's DNS server is not taken: the host's DNS stays as it was.
        state = await state_of(client)
        assert state["dns"] == before["dns"]
        assert {(a["link"], a["address"], a["dynamic"]) for a in state["addresses"]
                if a["family"] == 4} >= {("lan", lan, True), ("side", side, True)}
        listed = {n["name"]: n["config"] for n in
                  (await client.call("Network.list", {}))["networks"]}
        assert listed["lan"]["ipv4"]["method"] == "dhcp"
        assert (await state_of(client))["addresses"].count(
            {"link": "six", "address": six, "family": 6, "scope": "global", "dynamic": True}) == 1
        assert len(dhcp_client_pids(net_host.tmp)) == 3
        job = await setup(client, {"six": {"remove": True}})
        assert job["state"] == "succeeded", job

        # To static: the client goes, and so does its lease (released, not left behind).
        job = await setup(client, {"lan": {"ports": ["eth0"], "ipv4": {
            "method": "static", "address": "10.77.9.5/24", "gateway": "10.77.9.1"},
            "default_route": True}})
        assert job["state"] == "succeeded", job
        shown = {f"{a['local']}/{a['prefixlen']}" for found in await host.ip_json(
            "-4", "addr", "show", "dev", "lan") for a in found["addr_info"]}
        assert shown == {"10.77.9.5/24"}
        routes = await host.ip_json("route", "show", "default")
        assert [(r["gateway"], r["dev"]) for r in routes] == [("10.77.9.1", "lan")]
        assert len(dhcp_client_pids(net_host.tmp)) == 1

        # A change that fails rolls its DHCP clients back too: the one it started stops,
        # the one it stopped runs again.
        await run("ip", "netns", "exec", host.name, "sysctl", "-q", "-w",
                  "net.ipv6.conf.default.disable_ipv6=1")
        job = await setup(client, {
            "lan": {"ports": ["eth0"], "ipv4": {"method": "dhcp"}, "default_route": True},
            "side": {"remove": True},
            "v6": {"ports": ["eth2"], "ipv6": {"method": "static", "address": "fd00:77:7::1/64"}},
        })
        assert job["state"] == "failed", job
        assert job["error"]["data"]["reason"] == "rolled_back"
        assert len(dhcp_client_pids(net_host.tmp)) == 1
        assert await leased(host, "side", "10.77.8")
        routes = await host.ip_json("route", "show", "default")
        assert [(r["gateway"], r["dev"]) for r in routes] == [("10.77.9.1", "lan")]

        # A client that died while the agent was away is started again when it starts.
        client = await restart_without_dhcp_clients(net_host, checked_client)
        assert len(dhcp_client_pids(net_host.tmp)) == 1

        job = await setup(client, {"lan": {"remove": True}, "side": {"remove": True}})
        assert job["state"] == "succeeded", job
        assert dhcp_client_pids(net_host.tmp) == []
    # pyroute2's per-message debug lines stay out of the agent's debug log.
    assert "DEBUG pyroute2" not in net_host.agent.log
