"""The VM host-access policy through a real agent: hostile domain XML and specs are refused.

Each case is something an API caller could use to reach the host through libvirt, which
runs as root: a host file as a disk, a console writing to a host file, a script run at
NIC set-up, a host device, a network disk, a weakened security label. On
``test:///default`` (fast, nothing runs) the agent must answer ``PermissionDenied`` naming
the element, and nothing may be defined afterwards. On ``qemu:///system`` the ethernet
script case also shows that the script never ran.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory
from tests.integration.conftest import expect_error, virt, vm_name
from tests.integration.test_volumes import new_domain
from tests.subproc import run
from virtnode.client import Client, RemoteError

pytestmark = pytest.mark.integration


def domain(name: str, devices: str = "", os_extra: str = "", top: str = "",
           domain_type: str = "test") -> str:
    return (f"<domain type='{domain_type}'><name>{name}</name><memory unit='MiB'>64</memory>"
            f"{top}<os><type arch='x86_64'>hvm</type>{os_extra}</os>"
            f"<devices>{devices}</devices></domain>")


def file_disk(path: str, fmt: str = "raw") -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source file='{path}'/><target dev='vda' bus='virtio'/></disk>")


#: (id, what goes into the XML (devices, os_extra, top), reason, field)
XML_ATTACKS: list[tuple[str, dict[str, str], str, str]] = [
    ("ethernet-script", {"devices": "<interface type='ethernet'><script path='/tmp/evil.sh'/>"
                                    "</interface>"},
     "script_refused", "xml.devices.interface[1].script"),
    ("disk-etc-shadow", {"devices": file_disk("/etc/shadow")},
     "path_not_allowed", "xml.devices.disk[1].source"),
    ("disk-host-block-device", {"devices": "<disk type='block' device='disk'>"
                                           "<driver name='qemu' type='raw'/>"
                                           "<source dev='/dev/vda'/>"
                                           "<target dev='vda' bus='virtio'/></disk>"},
     "path_not_allowed", "xml.devices.disk[1].source"),
    ("filesystem-host-root", {"devices": "<filesystem type='mount' accessmode='passthrough'>"
                                         "<source dir='/'/><target dir='root'/>"
                                         "</filesystem>"},
     "path_not_allowed", "xml.devices.filesystem[1].source"),
    ("serial-file-etc-shadow", {"devices": "<serial type='file'>"
                                           "<source path='/etc/shadow'/><target port='0'/>"
                                           "</serial>"},
     "path_not_allowed", "xml.devices.serial[1].source"),
    ("kernel-etc-shadow", {"os_extra": "<kernel>/etc/shadow</kernel>"},
     "path_not_allowed", "xml.os.kernel"),
    ("initrd-etc-shadow", {"os_extra": "<kernel>/etc/shadow</kernel>"
                                       "<initrd>/etc/shadow</initrd>"},
     "path_not_allowed", "xml.os.kernel"),
    ("loader-etc-shadow", {"os_extra": "<loader readonly='yes' type='pflash'>/etc/shadow"
                                       "</loader>"},
     "path_not_allowed", "xml.os.loader"),
    ("nvram-etc-shadow", {"os_extra": "<loader readonly='yes' type='pflash'>"
                                      "/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
                                      "<nvram>/etc/shadow</nvram>"},
     "path_not_allowed", "xml.os.nvram"),
    ("hostdev-pci", {"devices": "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
                                "<address domain='0x0000' bus='0x00' slot='0x01' "
                                "function='0x0'/></source></hostdev>"},
     "hostdev_refused", "xml.devices.hostdev[1]"),
    ("seclabel-none", {"top": "<seclabel type='none'/>"},
     "seclabel_refused", "xml.seclabel"),
    ("network-disk", {"devices": "<disk type='network' device='disk'>"
                                 "<driver name='qemu' type='raw'/>"
                                 "<source protocol='nbd' name='x'>"
                                 "<host name='attacker.example' port='10809'/></source>"
                                 "<target dev='vda' bus='virtio'/></disk>"},
     "network_disk_refused", "xml.devices.disk[1]"),
]


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    agent = await start_agent(tmp_path)
    yield agent
    assert await agent.stop() == 0, agent.log


async def defined_names(client: Client) -> set[str]:
    return {vm["name"] for vm in (await client.call("VM.list"))["vms"]}


async def refused(client: Client, params: dict[str, Any], reason: str, field: str,
                  name: str) -> None:
    error = await expect_error(client, "VM.create", params, "PermissionDenied", reason)
    assert error.data["field"] == field, error.error
    assert name not in await defined_names(client)


@pytest.mark.parametrize(("parts", "reason", "field"),
                         [pytest.param(p, r, f, id=i) for i, p, r, f in XML_ATTACKS])
async def test_hostile_domain_xml_is_refused_and_nothing_is_defined(
        agent: AgentProcess, checked_client: ClientFactory, parts: dict[str, str],
        reason: str, field: str) -> None:
    client = await checked_client(agent.unix_url)
    name = vm_name()
    await refused(client, {"xml": domain(name, **parts)}, reason, field, name)


@pytest.mark.parametrize(("spec", "field"), [
    pytest.param({"disks": [{"path": "/etc/shadow"}]}, "spec.disks.0.path", id="etc-shadow"),
    pytest.param({"disks": [{"path": "/dev/vda"}]}, "spec.disks.0.path", id="host-disk"),
    pytest.param({"kernel": "/etc/shadow"}, "spec.kernel", id="kernel"),
])
async def test_hostile_spec_paths_are_refused(agent: AgentProcess,
                                              checked_client: ClientFactory,
                                              spec: dict[str, Any], field: str) -> None:
    client = await checked_client(agent.unix_url)
    name = vm_name()
    params = {"spec": {"name": name, "domain_type": "test", **spec}}
    await refused(client, params, "path_not_allowed", field, name)


async def test_escapes_from_a_storage_domain_are_refused(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    """A symlink and a .. inside a storage domain lead out of it: resolved, then refused."""
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd", name="policy")
    images = tmp_path / "sd" / sd_id / "images"
    link = images / "shadow.img"
    await asyncio.to_thread(os.symlink, "/etc/shadow", link)
    escape = f"{images}/../../../../../../../../etc/shadow"
    for path in (str(link), escape):
        name = vm_name()
        await refused(client, {"xml": domain(name, file_disk(path))}, "path_not_allowed",
                      "xml.devices.disk[1].source", name)
    name = vm_name()
    await refused(client, {"spec": {"name": name, "domain_type": "test",
                                    "disks": [{"path": str(link)}]}},
                  "path_not_allowed", "spec.disks.0.path", name)


async def test_a_qcow2_disk_must_spell_out_its_backing_chain(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    """Without an explicit chain libvirt follows the backing file named inside the image,
    which whoever wrote the image (a guest, through its own disk) chooses."""
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd", name="chains")
    image = tmp_path / "sd" / sd_id / "images" / "overlay.qcow2"
    await asyncio.to_thread(image.write_bytes, b"")
    name = vm_name()
    await refused(client, {"xml": domain(name, file_disk(str(image), "qcow2"))},
                  "backing_chain_required", "xml.devices.disk[1].source", name)


async def test_a_disk_given_by_path_is_used_alone(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    """A path disk's chain ends at once; one whose image names a backing file is refused
    rather than shown to its guest with holes."""
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd", name="paths")
    images = tmp_path / "sd" / sd_id / "images"
    base, top, alone = images / "base.raw", images / "top.qcow2", images / "alone.qcow2"
    (await run("qemu-img", "create", "-q", "-f", "raw", base, "1M")).check()
    (await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)).check()
    (await run("qemu-img", "create", "-q", "-f", "qcow2", alone, "1M")).check()
    name = vm_name()
    error = await expect_error(client, "VM.create", {"spec": {
        "name": name, "domain_type": "test", "disks": [{"path": str(top), "format": "qcow2"}]}},
        "InvalidArgument", "has_backing_file")
    assert error.data["field"] == "spec.disks.0.path"
    link = images / "link.qcow2"
    await asyncio.to_thread(os.symlink, alone, link)
    created = await client.call("VM.create", {"spec": {
        "name": name, "domain_type": "test", "disks": [{"path": str(link), "format": "qcow2"}]},
        "start": False})
    xml = etree.fromstring((await client.call("VM.getXML", {"vm_id": created["vm_id"],
                                                            "inactive": True}))["xml"].encode())
    disk = xml.find("devices/disk")
    assert disk is not None
    assert disk.find("source").get("file") == str(alone)  # type: ignore[union-attr]
    assert disk.find("backingStore") is not None
    await client.call("VM.undefine", {"vm_id": created["vm_id"]})


@pytest.mark.qemu
async def test_an_ethernet_script_never_runs(
        tmp_path: Path, libvirtd: None, cleanup_vms: None,
        checked_client: ClientFactory) -> None:
    from tests.integration import libvirtd as daemon

    marker = tmp_path / "script-ran"
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    agent = await start_agent(tmp_path / "agent", hypervisor=daemon.QEMU_URI)
    try:
        client = await checked_client(agent.unix_url)
        name = vm_name()
        nic = (f"<interface type='ethernet'><script path='{script}'/>"
               f"<target dev='vnp{uuid.uuid4().hex[:8]}'/><model type='virtio'/></interface>")
        xml = domain(name, nic, domain_type="kvm").replace(
            "<type arch='x86_64'>", "<type arch='x86_64' machine='pc'>")
        error: RemoteError | None = None
        try:
            await client.call("VM.create", {"xml": xml})
        except RemoteError as exc:
            error = exc
        assert not await asyncio.to_thread(marker.exists), "the script ran (as root)"
        assert error is not None and error.name == "PermissionDenied", error
        assert error.reason == "script_refused" and error.data["field"] == (
            "xml.devices.interface[1].script")
        assert name not in await virt(lambda conn: [d.name() for d in conn.listAllDomains()])
    finally:
        assert await agent.stop() == 0, agent.log
