"""OVF descriptors and OVA packages read as hostile input: what virtnode writes reads
back the same, a VMware-style descriptor is understood, and what is unsafe or absurd is
refused by name."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from virtnode.vm import ovf

VMWARE = b"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References><ovf:File ovf:href="web-disk1.vmdk" ovf:id="file1" ovf:size="1234"/></References>
  <DiskSection><Info>Virtual disk information</Info>
    <Disk ovf:capacity="2" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1"
          ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection><Info>The list of logical networks</Info>
    <Network ovf:name="VM Network"><Description>The VM Network network</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="web">
    <Info>A virtual machine</Info><Name>web</Name>
    <VirtualHardwareSection><Info>Virtual hardware requirements</Info>
      <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>4 virtual CPU(s)</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>4</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>2048MB of memory</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>2048</rasd:VirtualQuantity></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"""


def test_what_virtnode_writes_reads_back_the_same() -> None:
    system = ovf.OvfSystem("db", 2, 512, "efi", "pc-q35-7.2",
                           [ovf.OvfDisk("vda", "virtio", 1 << 30, "db-vda.qcow2", 1000),
                            ovf.OvfDisk("sda", "sata", 1 << 20, "db-sda.qcow2", 10)],
                           [ovf.OvfNic("virtio", "52:54:00:aa:bb:cc", "default")],
                           {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0"}, "qemu")
    read, disks = ovf.read_system(ovf.descriptor(system, "qcow2"))
    assert (read.name, read.vcpus, read.memory_mib, read.firmware, read.machine) == (
        "db", 2, 512, "efi", "pc-q35-7.2")
    assert read.nics == system.nics
    assert read.kernel == {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0"}
    assert read.domain_type == "qemu"
    assert [(d.file, d.capacity, d.bus) for d in disks] == [
        ("db-vda.qcow2", 1 << 30, "virtio"), ("db-sda.qcow2", 1 << 20, "sata")]


def test_a_vmware_descriptor_is_understood() -> None:
    system, disks = ovf.read_system(VMWARE)
    assert (system.name, system.vcpus, system.memory_mib, system.firmware) == (
        "web", 4, 2048, "efi")
    assert [(d.file, d.capacity, d.bus) for d in disks] == [("web-disk1.vmdk", 2 << 30,
                                                              "scsi")]
    assert system.nics == [ovf.OvfNic("e1000", None, "VM Network")]


@pytest.mark.parametrize(("change", "reason"), [
    ((b'encoding="UTF-8"?>', b'encoding="UTF-8"?><!DOCTYPE x [<!ENTITY a "aaaa">'
      b'<!ENTITY b "&a;&a;&a;">]>'), "xml_entities"),
    ((b'ovf:capacity="2"', b'ovf:capacity="1099511627776"'), "absurd_size"),
    ((b"<rasd:VirtualQuantity>4<", b"<rasd:VirtualQuantity>100000<"), "absurd_size"),
    ((b"<rasd:VirtualQuantity>2048<", b"<rasd:VirtualQuantity>-1<"), "absurd_size"),
    ((b'"byte * 2^30"', b'"furlongs"'), "invalid_ova"),
    ((b"ovf:/disk/vmdisk1", b"ovf:/disk/elsewhere"), "invalid_ova"),
    ((b"</Envelope>", b""), "bad_xml"),
    ((b"<VirtualSystem ovf:id", b"<Other ovf:id"), "bad_xml"),
    ((b"</VirtualSystem>", b"</VirtualSystem><VirtualSystem ovf:id='x'/>"), "invalid_ova"),
])
def test_a_hostile_descriptor_is_refused(change: tuple[bytes, bytes], reason: str) -> None:
    old, new = change
    text = VMWARE.replace(old, new)
    assert text != VMWARE
    with pytest.raises(ovf.Refused) as refused:
        ovf.read_system(text)
    assert refused.value.reason == reason


def package(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]],
            mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_package_is_indexed_not_extracted(tmp_path: Path) -> None:
    ova = package(tmp_path / "ok.ova", [("web.ovf", VMWARE), ("web.mf", b"SHA256(web-disk1."
                                         b"vmdk)= " + b"ab" * 32 + b"\n"),
                                        ("web-disk1.vmdk", b"x" * 1000)])
    read = ovf.read_package(str(ova))
    assert read.descriptor == VMWARE
    assert read.digests == {"web-disk1.vmdk": ("sha256", "ab" * 32)}
    member = read.members["web-disk1.vmdk"]
    assert ova.read_bytes()[member.offset:member.offset + member.size] == b"x" * 1000
    with pytest.raises(ovf.Refused) as refused:
        ovf.verify_member(str(ova), "web-disk1.vmdk", member, read.digests["web-disk1.vmdk"])
    assert refused.value.reason == "manifest_mismatch"


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(("members", "mode", "reason"), [
    ([("web.ovf", VMWARE), ("../escape.vmdk", b"x")], "w", "unsafe_member"),
    ([("web.ovf", VMWARE), ("/etc/cron.d/x", b"x")], "w", "unsafe_member"),
    ([("web.ovf", VMWARE), ("dir/disk.vmdk", b"x")], "w", "unsafe_member"),
    ([("web.ovf", VMWARE), link("web-disk1.vmdk", "/etc/shadow")], "w", "unsafe_member"),
    ([("web.ovf", VMWARE), link("web-disk1.vmdk", "web.ovf", tarfile.LNKTYPE)], "w",
     "unsafe_member"),
    ([("web.ovf", VMWARE), ("web.ovf", VMWARE)], "w", "unsafe_member"),
    ([("web-disk1.vmdk", b"x"), ("web.ovf", VMWARE)], "w", "invalid_ova"),
    ([("web.ovf", VMWARE)], "w:gz", "invalid_ova"),
])
def test_an_unsafe_package_is_refused(tmp_path: Path, members: list[tarfile.TarInfo | tuple[
        str, bytes]], mode: str, reason: str) -> None:
    ova = package(tmp_path / "bad.ova", members, mode)
    with pytest.raises(ovf.Refused) as refused:
        ovf.read_package(str(ova))
    assert refused.value.reason == reason


def test_a_descriptor_too_big_is_not_read(tmp_path: Path) -> None:
    ova = package(tmp_path / "big.ova", [("web.ovf", b" " * (ovf.MAX_DESCRIPTOR + 1))])
    with pytest.raises(ovf.Refused) as refused:
        ovf.read_package(str(ova))
    assert refused.value.reason == "too_big"
