"""tools/lab: hosts in namespaces on one machine, each with its own libvirtd and agent.

One lab of two hosts is brought up for the module and taken down by the last test, which
checks that nothing is left: no namespace, daemon, mount, loop device, bridge or file.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.lab import RUN, VAR, lab, on_host
from virtnode.client import Client, tls_context

pytestmark = [pytest.mark.integration, pytest.mark.qemu]

async def connect(host: dict[str, Any]) -> Client:
    tls = tls_context(host["ca"], host["cert"], host["key"])
    return await Client.connect(host["url"], tls=tls)


def test_status_names_each_host_with_its_agent_and_the_client_files(
        hosts: list[dict[str, Any]]) -> None:
    assert [(h["name"], h["address"], h["url"], h["state"]) for h in hosts] == [
        ("lab-h1", "10.77.0.11", "tls://10.77.0.11:8765", "up"),
        ("lab-h2", "10.77.0.12", "tls://10.77.0.12:8765", "up"),
    ]
    for host in hosts:
        for key in ("ca", "cert", "key"):
            assert Path(host[key]).is_file()
    text = lab("status").stdout
    assert "lab-h1" in text and "tls://10.77.0.12:8765" in text


def test_a_second_up_is_refused_while_a_lab_is_up(hosts: list[dict[str, Any]]) -> None:
    refused = lab("up", "1", check=False)
    assert refused.returncode == 1
    assert "tools/lab down" in refused.stderr
    assert json.loads(lab("status", "--json").stdout) == hosts


async def test_each_agent_is_its_own_host_over_mutual_tls(
        hosts: list[dict[str, Any]]) -> None:
    seen = []
    for host in hosts:
        async with await connect(host) as client:
            caps = await client.call("Host.getCapabilities")
            domains = (await client.call("StorageDomain.list"))["domains"]
            networks = (await client.call("Network.list"))["networks"]
        seen.append((caps["hostname"], caps["host_uuid"]))
        assert sorted((d["metadata"]["name"], d["metadata"]["type"], d["monitor"]["state"])
                      for d in domains) == [("lab-shared", "posixfs", "ok"),
                                            ("local", "localfs", "ok")]
        assert "labnet" in [n["name"] for n in networks]
        by_name = {d["metadata"]["name"]: d["sd_id"] for d in domains}
        assert (by_name["lab-shared"], by_name["local"]) == (host["sd_id"],
                                                             host["local_sd_id"])
    assert [s[0] for s in seen] == ["lab-h1", "lab-h2"]
    assert len({s[1] for s in seen}) == 2
    assert hosts[0]["sd_id"] == hosts[1]["sd_id"], "one storage domain, shared"
    assert hosts[0]["local_sd_id"] != hosts[1]["local_sd_id"], "and one of each host's own"
    # Each libvirtd has its own host UUID: libvirt refuses to migrate between equal ones.
    host_uuids = set()
    for h in hosts:
        caps_xml = (await asyncio.to_thread(on_host, h["name"], "virsh", "-q", "-c",
                                            "qemu:///system", "capabilities")).stdout
        host_uuids.add(caps_xml.split("<uuid>")[1].split("<")[0])
    assert len(host_uuids) == 2


async def test_a_vm_runs_on_its_host_only_and_libvirt_can_move_it(
        hosts: list[dict[str, Any]]) -> None:
    name = f"lab-test-{uuid.uuid4().hex[:8]}"
    spec = {"name": name, "memory_mib": 64, "domain_type": "kvm", "machine": "pc"}
    async with await connect(hosts[0]) as client:
        created = await client.call("VM.create", {"spec": spec, "start": True})
    assert created["state"] == "running"

    async def running(host: str) -> list[str]:
        listed = await asyncio.to_thread(on_host, host, "virsh", "-q", "-c",
                                         "qemu:///system", "list", "--name")
        return listed.stdout.split()

    assert name in await running("lab-h1")
    assert name not in await running("lab-h2")
    machine = await asyncio.to_thread(
        subprocess.run, ["virsh", "-q", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True, text=True, check=False)
    assert name not in machine.stdout.split()
    # The lab's daemons can migrate between each other (distinct host UUIDs, their own
    # migration ports): what the agents' migration builds on.
    moved = await asyncio.to_thread(
        on_host, "lab-h1", "virsh", "-c", "qemu:///system", "migrate", "--live", "--p2p",
        "--persistent", "--undefinesource", name, "qemu+tcp://10.77.0.12/system")
    assert moved.returncode == 0, moved.stderr
    assert name in await running("lab-h2")
    assert name not in await running("lab-h1")


def test_down_leaves_nothing(hosts: list[dict[str, Any]]) -> None:
    pids = [int((RUN / h["name"] / f"{what}.pid").read_text())
            for h in hosts for what in ("libvirtd", "agent")]
    loop = json.loads((VAR / "lab.json").read_text())["loop_device"]
    assert lab("down").stdout.strip() == "lab is down"
    assert not [p for p in pids if _alive(p)]
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if n.startswith("vnlab-")]
    assert not Path("/sys/class/net/vnlab0").exists()
    assert "virtnode-lab" not in Path("/proc/self/mountinfo").read_text()
    backing = subprocess.run(["losetup", "--noheadings", "--output", "BACK-FILE", loop],
                             capture_output=True, text=True, check=False).stdout
    assert "virtnode-lab" not in backing
    assert not RUN.exists() and not VAR.exists()
    qemus = subprocess.run(["pgrep", "-af", "lab-test-"], capture_output=True, text=True,
                           check=False).stdout
    assert "qemu" not in qemus
    assert lab("status", check=False).returncode == 1


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
