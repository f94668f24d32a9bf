"""A KVM guest's NIC on a managed network: its tap joins the network's bridge and VLAN.

libvirtd makes taps in the host's own namespace, so this test manages a network there:
one whose name and uplink (a veth pair) it made itself, and nothing else is touched.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.agentproc import AgentProcess
from tests.conftest import ClientFactory
from tests.integration.conftest import expect_error, vm_name, wait_job
from tests.integration.netns import require_netns
from tests.integration.test_vm_lifecycle import create, firmware_spec
from tests.subproc import run

pytestmark = [pytest.mark.integration, pytest.mark.qemu,
              pytest.mark.usefixtures("libvirtd", "cleanup_vms")]


@pytest.fixture
async def uplink() -> AsyncIterator[str]:
    """A veth pair in the host namespace; the end it yields is the network's NIC."""
    require_netns()
    name = f"vnu{uuid.uuid4().hex[:8]}"
    (await run("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p")).check()
    try:
        yield name
    finally:
        await run("ip", "link", "del", name)


async def test_a_vm_nic_joins_the_network_bridge_and_vlan(
        qemu_agent: AgentProcess, checked_client: ClientFactory, uplink: str) -> None:
    client = await checked_client(qemu_agent.unix_url)
    net = f"vnn{uuid.uuid4().hex[:8]}"
    features = (await client.call("Network.getState", {}))["features"]
    filtering = features["vlan_filtering"]
    spec: dict[str, Any] = {"ports": [uplink], "vlan": 42}
    if not filtering:
        # This kernel cannot tag a bridge port; the network is made without a VLAN.
        await expect_error(client, "Network.setup", {
            "networks": {net: spec}, "options": {"connectivity_check": False}},
            "InvalidArgument", "unsupported")
        del spec["vlan"]
    started = await client.call("Network.setup", {
        "networks": {net: spec}, "options": {"connectivity_check": False}})
    try:
        job = await wait_job(client, started["job_id"], timeout=60)
        assert job["state"] == "succeeded", job
        name = vm_name()
        vm_id = await create(client, name, spec=firmware_spec(name, nics=[{"network": net}]))
        nics = (await client.call("VM.getInfo", {"vm_id": vm_id}))["devices"]["nics"]
        assert nics[0]["source"] == net
        tap = nics[0]["device"]
        link = json.loads((await run("ip", "-j", "link", "show", tap)).check())[0]
        assert link["master"] == net
        if filtering:
            vlans = json.loads((await run("bridge", "-j", "vlan", "show", "dev", tap)).check())
            assert [(v["vlan"], sorted(v.get("flags", []))) for v in vlans[0]["vlans"]] == [
                (42, ["Egress Untagged", "PVID"])]
            uplink_vlans = json.loads((await run("bridge", "-j", "vlan", "show", "dev",
                                                 uplink)).check())
            assert [(v["vlan"], v.get("flags", []))
                    for v in uplink_vlans[0]["vlans"]] == [(42, [])]

        # A hotplugged NIC lands there too; unknown and bridgeless networks are refused.
        mac = (await client.call("VM.hotplugNic", {"vm_id": vm_id,
                                                   "nic": {"network": net}}))["mac"]
        nics = (await client.call("VM.getInfo", {"vm_id": vm_id}))["devices"]["nics"]
        assert [n["source"] for n in nics if n["mac"] == mac] == [net]
        await expect_error(client, "VM.hotplugNic", {"vm_id": vm_id,
                                                     "nic": {"network": "nonet"}},
                           "NotFound", "no_network")
        await expect_error(client, "VM.create", {"spec": firmware_spec(
            vm_name(), nics=[{"network": net, "bridge": net}])}, "InvalidArgument")
        await client.call("VM.destroy", {"vm_id": vm_id})
    finally:
        removed = await client.call("Network.setup", {
            "networks": {net: {"remove": True}}, "options": {"connectivity_check": False}})
        await wait_job(client, removed["job_id"], timeout=60)
