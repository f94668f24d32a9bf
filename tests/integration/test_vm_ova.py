"""OVA export of a real guest's disks: the package's order, its manifest, and disks
that show exactly what the VM's chain shows, in qcow2 and in streamOptimized vmdk."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory
from tests.integration import libvirtd as daemon
from tests.integration.conftest import expect_error, vm_name, wait_job
from tests.integration.serialshell import serial_shell
from tests.integration.test_vm_snapshots import (
    agent_vm,
    domain_and_disk,
    snapshot,
    volume_info,
)
from tests.subproc import run
from virtnode.vm import ovf

pytestmark = [pytest.mark.integration, pytest.mark.qemu,
              pytest.mark.usefixtures("libvirtd", "cleanup_vms")]

NS = {"ovf": ovf.OVF, "rasd": ovf.RASD}


@pytest.fixture
async def ova_agent(tmp_path: Path, libvirtd: None) -> AsyncIterator[AgentProcess]:
    (tmp_path / "exports").mkdir()
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI, sections={
        "storage": {"export_paths": [str(tmp_path / "exports")],
                    "import_paths": [str(tmp_path / "exports")]}})
    yield agent
    await agent.stop()


def unpack(ova: Path, into: Path) -> tuple[list[str], dict[str, str]]:
    """The members' names in order, and the manifest's digests checked against them."""
    with tarfile.open(ova) as tar:
        names = tar.getnames()
        tar.extractall(into, filter="data")
    digests = {}
    for line in (into / names[1]).read_text().splitlines():
        name, digest = line.removeprefix("SHA256(").split(")= ")
        assert hashlib.sha256((into / name).read_bytes()).hexdigest() == digest, name
        digests[name] = digest
    return names, digests


async def test_an_ova_holds_what_the_vm_disk_shows(
        ova_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
        tmp_path: Path) -> None:
    client = await checked_client(ova_agent.unix_url)
    _sd_id, disk = await domain_and_disk(client, image_dir)
    vm_id = await agent_vm(client, disk)
    async with serial_shell(ova_agent, client, vm_id) as shell:
        assert (await shell.run("datadisk && echo 1 > /data/one && sync"))[0] == 0
        await snapshot(client, vm_id, name="before-two", quiesce="off")
        assert (await shell.run("echo 2 > /data/two && sync"))[0] == 0
    await client.call("VM.destroy", {"vm_id": vm_id})
    name = (await client.call("VM.getInfo", {"vm_id": vm_id}))["name"]
    xml = (await client.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
    leaf = etree.fromstring(xml).find("devices/disk/source").get("file")

    for fmt in ("qcow2", "vmdk"):
        ova = tmp_path / "exports" / f"{name}-{fmt}.ova"
        job = await client.call("VM.export", {"vm_id": vm_id, "path": str(ova),
                                              "disk_format": fmt})
        done = await wait_job(client, job["job_id"])
        assert (done["state"], done["progress"]) == ("succeeded", 100), done
        into = tmp_path / fmt
        names, digests = await asyncio.to_thread(unpack, ova, into)
        assert names == [f"{name}.ovf", f"{name}.mf", f"{name}-vda.{fmt}"]
        assert set(digests) == {names[0], names[2]}
        info = (await run("qemu-img", "info", "--output=json", into / names[2])).check()
        assert f'"format": "{fmt}"' in info
        if fmt == "vmdk":
            assert "streamOptimized" in info
        compared = await run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", fmt, leaf,
                             into / names[2])
        assert compared.status == 0, compared.out + compared.err
        root = etree.fromstring((into / names[0]).read_bytes())
        [disk_element] = root.iterfind(".//ovf:DiskSection/ovf:Disk", NS)
        capacity = (await volume_info(client, **disk))["virtual_size"]
        assert disk_element.get(f"{{{ovf.OVF}}}capacity") == str(capacity)
        assert disk_element.get(f"{{{ovf.OVF}}}format") == ovf.DISK_FORMATS[fmt]
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == [
        f"{name}-qcow2.ova", f"{name}-vmdk.ova"], "no parts left"


VMWARE_OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References><File ovf:href="{disk}" ovf:id="file1" ovf:size="{size}"/></References>
  <DiskSection><Info>Virtual disk information</Info>
    <Disk ovf:capacity="64" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1"
      ovf:fileRef="file1"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="{name}"><Info>A virtual machine</Info><Name>{name}</Name>
    <VirtualHardwareSection><Info>Virtual hardware requirements</Info>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>256</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>lsilogic
        </rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:Connection>VM Network</rasd:Connection><rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def pack(ova: Path, files: list[tuple[str, bytes | Path]]) -> None:
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            if isinstance(data, Path):
                tar.add(data, arcname=name)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


async def test_ovas_are_imported_and_hostile_ones_leave_nothing(
        ova_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
        tmp_path: Path) -> None:
    client = await checked_client(ova_agent.unix_url)
    _sd_id, disk = await domain_and_disk(client, image_dir)
    vm_id = await agent_vm(client, disk)
    async with serial_shell(ova_agent, client, vm_id) as shell:
        assert (await shell.run("datadisk && echo 1 > /data/marker && sync"))[0] == 0
    await client.call("VM.destroy", {"vm_id": vm_id})
    source = (await volume_info(client, **disk))["path"]
    exports = tmp_path / "exports"
    ova = exports / "source.ova"
    job = await client.call("VM.export", {"vm_id": vm_id, "path": str(ova)})
    assert (await wait_job(client, job["job_id"]))["state"] == "succeeded"
    second = (await client.call("StorageDomain.create", {
        "type": "localfs", "name": "imports", "path": str(image_dir / "sd2")}))["domain"]
    sd2 = second["sd_id"]

    # virtnode's own OVA, on the second domain: the VM boots with its file.
    name = vm_name()
    job = await client.call("VM.import", {"path": str(ova), "sd_id": sd2, "name": name,
                                          "network": {"libvirt_network": "default"}})
    done = await wait_job(client, job["job_id"])
    assert done["state"] == "succeeded", done
    imported = done["result"]["vm_id"]
    info = await client.call("VM.getInfo", {"vm_id": imported})
    assert (info["name"], info["state"], info["memory_mib"]) == (name, "defined", 256)
    [volume] = done["result"]["disks"]
    assert volume["sd_id"] == sd2
    await client.call("VM.start", {"vm_id": imported})
    async with serial_shell(ova_agent, client, imported) as shell:
        status, out = await shell.run("dmesg -n 1 && datadisk && ls /data")
        assert (status, sorted(out.split())) == (0, ["lost+found", "marker"]), out
    await client.call("VM.destroy", {"vm_id": imported})

    # A VMware-style OVA written by hand, its disk a streamOptimized vmdk.
    vmdk = tmp_path / "disk1.vmdk"
    (await run("qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", "-o",
               "subformat=streamOptimized", source, vmdk)).check()
    vmware = exports / "vmware.ova"
    name = vm_name()
    descriptor = VMWARE_OVF.format(disk="disk1.vmdk", size=vmdk.stat().st_size, name=name)
    await asyncio.to_thread(pack, vmware, [(f"{name}.ovf", descriptor.encode()),
                                           ("disk1.vmdk", vmdk)])
    job = await client.call("VM.import", {"path": str(vmware), "sd_id": sd2})
    done = await wait_job(client, job["job_id"])
    assert done["state"] == "succeeded", done
    assert done["result"]["nics_left_out"] == 1
    [volume] = done["result"]["disks"]
    path = (await volume_info(client, **volume))["path"]
    compared = await run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", source, path)
    assert compared.status == 0, compared.out + compared.err
    xml = (await client.call("VM.getXML", {"vm_id": done["result"]["vm_id"],
                                           "inactive": True}))["xml"]
    target = etree.fromstring(xml).find("devices/disk/target")
    assert target.get("bus") == "scsi"



async def test_a_hostile_ova_is_refused_and_leaves_nothing(
        ova_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
        tmp_path: Path) -> None:
    client = await checked_client(ova_agent.unix_url)
    sd2, _disk = await domain_and_disk(client, image_dir)
    exports = tmp_path / "exports"
    before = {v["volume_id"] for v in (await client.call(
        "Volume.list", {"sd_id": sd2}))["volumes"]}
    vmdk = tmp_path / "disk1.vmdk"
    (await run("qemu-img", "create", "-f", "vmdk", "-o", "subformat=streamOptimized", vmdk,
               "64M")).check()
    # A disk naming a backing file on the host; a manifest that does not match.
    sneaky = tmp_path / "sneaky.qcow2"
    (await run("qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd",
               sneaky)).check()
    bad = exports / "sneaky.ova"
    await asyncio.to_thread(pack, bad, [("x.ovf", VMWARE_OVF.format(
        disk="d.qcow2", size=sneaky.stat().st_size, name="x").encode()), ("d.qcow2", sneaky)])
    job = await client.call("VM.import", {"path": str(bad), "sd_id": sd2, "name": vm_name()})
    done = await wait_job(client, job["job_id"])
    assert (done["state"], done["error"]["data"]["reason"]) == ("failed", "backing_file")
    lying = exports / "lying.ova"
    await asyncio.to_thread(pack, lying, [
        ("x.ovf", VMWARE_OVF.format(disk="disk1.vmdk", size=vmdk.stat().st_size,
                                    name="x").encode()),
        ("x.mf", b"SHA256(disk1.vmdk)= " + b"00" * 32 + b"\n"), ("disk1.vmdk", vmdk)])
    job = await client.call("VM.import", {"path": str(lying), "sd_id": sd2,
                                          "name": vm_name()})
    done = await wait_job(client, job["job_id"])
    assert (done["state"], done["error"]["data"]["reason"]) == ("failed", "manifest_mismatch")
    # Its disks imported, then the VM refused: a kernel outside the allowed paths.
    shadow = VMWARE_OVF.format(disk="disk1.vmdk", size=vmdk.stat().st_size, name="x").replace(
        "</VirtualSystem>", '<virtnode:PlatformSection xmlns:virtnode="https://virtnode.dev/'
        'xmlns/ovf/1" ovf:required="false"><Info>x</Info><virtnode:Kernel>/etc/shadow'
        "</virtnode:Kernel></virtnode:PlatformSection></VirtualSystem>")
    stolen = exports / "stolen.ova"
    await asyncio.to_thread(pack, stolen, [("x.ovf", shadow.encode()), ("disk1.vmdk", vmdk)])
    job = await client.call("VM.import", {"path": str(stolen), "sd_id": sd2,
                                          "name": vm_name()})
    done = await wait_job(client, job["job_id"])
    assert (done["state"], done["error"]["data"]["reason"]) == ("failed", "path_not_allowed")
    after = {v["volume_id"] for v in (await client.call(
        "Volume.list", {"sd_id": sd2}))["volumes"]}
    assert after == before, "a refused import leaves nothing"
    await expect_error(client, "VM.import", {"path": "/etc/passwd", "sd_id": sd2},
                       "PermissionDenied", "path_not_allowed")
