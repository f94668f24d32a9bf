"""VM specs, the domain XML built from them, client XML, and the agent's metadata."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt
import pycdlib
import pytest
import yaml
from lxml import etree

from tests.conftest import missing
from virtnode.errors import InvalidArgument
from virtnode.util import safexml as xmlutil
from virtnode.vm.cloudinit import seed_image
from virtnode.vm.spec import (
    NAMESPACE,
    check_domain_xml,
    check_spec,
    device_summary,
    domain_xml,
    metadata_body,
    read_metadata,
    read_metadata_body,
    seed_element,
    with_media,
)

NS = {"v": NAMESPACE}
METADATA = {"owner": "virtnode", "created": "1700000000.000",
            "labels": {"env": "prod", "team/app": "web shop"}}


def rejected(spec: dict[str, Any]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        check_spec(spec, "kvm")
    return caught.value


def render(spec: dict[str, Any], metadata: dict[str, Any] | None = None) -> etree._Element:
    xml = domain_xml(check_spec(spec, "kvm"), METADATA if metadata is None else metadata)
    return etree.fromstring(xml)


# --- check_spec --------------------------------------------------------------------------

def test_minimal_spec_gets_defaults() -> None:
    spec = check_spec({"name": "vm1"}, "qemu")
    assert spec.name == "vm1"
    assert str(uuid.UUID(spec.uuid)) == spec.uuid
    assert spec.domain_type == "qemu"
    assert (spec.memory_mib, spec.max_memory_mib) == (512, 512)
    assert (spec.vcpus, spec.max_vcpus) == (1, 1)
    assert spec.machine == "q35"
    assert spec.firmware == "bios"
    assert spec.disks == ()
    assert spec.nics == ()
    assert spec.graphics is None
    assert spec.serial is True
    assert spec.boot == ("hd",)
    assert (spec.kernel, spec.initrd, spec.cmdline) == (None, None, None)
    assert dict(spec.labels) == {}
    assert spec.cpu_model is None


def test_every_spec_gets_its_own_uuid() -> None:
    assert check_spec({"name": "vm1"}, "kvm").uuid != check_spec({"name": "vm1"}, "kvm").uuid


def test_given_uuid_is_kept_in_canonical_form() -> None:
    given = "6F9619FF-8B86-D011-B42D-00C04FC964FF"
    assert check_spec({"name": "vm1", "uuid": given}, "kvm").uuid == given.lower()


@pytest.mark.parametrize("name", ["a", "vm-1.2_3+x", "1vm", "A" * 64])
def test_good_names(name: str) -> None:
    assert check_spec({"name": name}, "kvm").name == name


@pytest.mark.parametrize("name", [
    "a/b", "/vm", "..", "../etc", "", "a" * 65, ".hidden", "-vm", "+vm", "_vm",
    "vm\u00e9", "\u0432\u043c", "vm 1", "vm1\n", "vm\x00", "vm;rm",
])
def test_bad_names(name: str) -> None:
    error = rejected({"name": name})
    assert error.details["field"] == "spec.name"


def test_missing_name() -> None:
    assert rejected({}).details["field"] == "spec.name"


BAD_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"uuid": "not-a-uuid"}, "spec.uuid"),
    ({"uuid": ""}, "spec.uuid"),
    ({"uuid": "1234"}, "spec.uuid"),
    ({"memory_mib": 15}, "spec.memory_mib"),
    ({"memory_mib": 0}, "spec.memory_mib"),
    ({"memory_mib": -512}, "spec.memory_mib"),
    ({"memory_mib": True}, "spec.memory_mib"),
    ({"memory_mib": 512.0}, "spec.memory_mib"),
    ({"memory_mib": "512"}, "spec.memory_mib"),
    ({"memory_mib": 1024, "max_memory_mib": 512}, "spec.max_memory_mib"),
    ({"vcpus": 0}, "spec.vcpus"),
    ({"vcpus": 257}, "spec.vcpus"),
    ({"vcpus": False}, "spec.vcpus"),
    ({"vcpus": 4, "max_vcpus": 2}, "spec.max_vcpus"),
    ({"max_vcpus": 257}, "spec.max_vcpus"),
    ({"machine": "virt"}, "spec.machine"),
    ({"machine": "pc-q35-"}, "spec.machine"),
    ({"machine": "q35\n"}, "spec.machine"),
    ({"cpu_model": "Haswell; rm"}, "spec.cpu_model"),
    ({"firmware": "coreboot"}, "spec.firmware"),
    ({"domain_type": "xen"}, "spec.domain_type"),
    ({"disks": [{"path": "/img", "bus": "usb"}]}, "spec.disks.0.bus"),
    ({"disks": [{"path": "/img", "format": "vmdk"}]}, "spec.disks.0.format"),
    ({"disks": [{"path": "disk.img"}]}, "spec.disks.0.path"),
    ({"disks": [{"path": "./disk.img"}]}, "spec.disks.0.path"),
    ({"disks": [{"path": "/var/lib/../../etc/shadow"}]}, "spec.disks.0.path"),
    ({"disks": [{"path": "/images/.."}]}, "spec.disks.0.path"),
    ({"disks": [{"path": "/images/a\x00b"}]}, "spec.disks.0.path"),
    ({"disks": [{}]}, "spec.disks.0.path"),
    ({"disks": [{"path": "/a"}, {"path": "relative"}]}, "spec.disks.1.path"),
    ({"disks": [{"path": "/img", "bus": "sata", "target": "vda"}]}, "spec.disks.0.target"),
    ({"disks": [{"path": "/img", "target": "xvda"}]}, "spec.disks.0.target"),
    ({"disks": [{"path": "/img", "target": "vda\n"}]}, "spec.disks.0.target"),
    ({"disks": [{"path": "/img", "boot_order": 0}]}, "spec.disks.0.boot_order"),
    ({"disks": [{"path": "/a", "target": "vdb"}, {"path": "/b", "target": "vdb"}]},
     "spec.disks"),
    ({"nics": [{"bridge": "br0", "model": "ne2k"}]}, "spec.nics.0.model"),
    ({"nics": [{"bridge": "br0", "libvirt_network": "default"}]}, "spec.nics.0"),
    ({"nics": [{"network": "net1"}]}, "spec.nics.0.network"),  # not resolved to a bridge
    ({"nics": [{}]}, "spec.nics.0"),
    ({"nics": [{"model": "virtio"}]}, "spec.nics.0"),
    ({"nics": [{"bridge": "br0/../x"}]}, "spec.nics.0.bridge"),
    ({"nics": [{"bridge": "a-bridge-name-too-long"}]}, "spec.nics.0.bridge"),
    ({"nics": [{"libvirt_network": "net work"}]}, "spec.nics.0.libvirt_network"),
    ({"nics": [{"bridge": "br0", "mac": "52:54:00:12:34"}]}, "spec.nics.0.mac"),
    ({"nics": [{"bridge": "br0", "mac": "52:54:00:12:34:zz"}]}, "spec.nics.0.mac"),
    ({"nics": [{"bridge": "br0", "mac": "52-54-00-12-34-56"}]}, "spec.nics.0.mac"),
    ({"nics": [{"bridge": "br0", "mac": "52:54:00:12:34:56\n"}]}, "spec.nics.0.mac"),
    ({"nics": [{"bridge": "br0", "mac": "01:00:5e:00:00:01"}]}, "spec.nics.0.mac"),
    ({"nics": [{"bridge": "br0", "mac": "ff:ff:ff:ff:ff:ff"}]}, "spec.nics.0.mac"),
    ({"nics": [{"bridge": "br0", "mac": "52:54:00:AA:BB:CC"},
               {"libvirt_network": "default", "mac": "52:54:00:aa:bb:cc"}]}, "spec.nics"),
    ({"labels": {"": "x"}}, "spec.labels."),
    ({"labels": {"-key": "x"}}, "spec.labels.-key"),
    ({"labels": {"a key": "x"}}, "spec.labels.a key"),
    ({"labels": {"k" * 64: "x"}}, "spec.labels." + "k" * 64),
    ({"labels": {"k\n": "x"}}, "spec.labels.k\n"),
    ({"labels": {"k": 1}}, "spec.labels.k"),
    ({"labels": {"k": None}}, "spec.labels.k"),
    ({"labels": {"k": "v" * 257}}, "spec.labels.k"),
    ({"labels": {"k": "a\x00b"}}, "spec.labels.k"),
    ({"labels": {"k": "bell\x07"}}, "spec.labels.k"),
    ({"graphics": "rdp"}, "spec.graphics"),
    ({"boot": ["floppy"]}, "spec.boot.0"),
    ({"boot": ["hd", "usb"]}, "spec.boot.1"),
    ({"kernel": "vmlinuz"}, "spec.kernel"),
    ({"kernel": "/boot/vmlinuz", "initrd": "initrd.img"}, "spec.initrd"),
    ({"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0\x00"}, "spec.cmdline"),
    ({"kernel": "/boot/vmlinuz", "cmdline": "a\x1bb"}, "spec.cmdline"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_SPECS,
                         ids=[f"{field}-{i}" for i, (_, field) in enumerate(BAD_SPECS)])
def test_bad_spec_names_the_field(fields: dict[str, Any], field: str) -> None:
    error = rejected({"name": "vm1", **fields})
    assert error.reason == "invalid_spec"
    data = error.to_error()["data"]
    assert data["name"] == "InvalidArgument"
    assert data["field"] == field
    assert error.message.startswith(field)


@pytest.mark.parametrize(("fields", "check"), [
    ({"memory_mib": 16}, lambda s: s.memory_mib == 16),
    ({"memory_mib": 1024, "max_memory_mib": 1024}, lambda s: s.max_memory_mib == 1024),
    ({"vcpus": 256}, lambda s: s.max_vcpus == 256),
    ({"vcpus": 2, "max_vcpus": 8}, lambda s: (s.vcpus, s.max_vcpus) == (2, 8)),
    ({"machine": "pc"}, lambda s: s.machine == "pc"),
    ({"machine": "pc-q35-8.2"}, lambda s: s.machine == "pc-q35-8.2"),
    ({"machine": "pc-i440fx-7.2"}, lambda s: s.machine == "pc-i440fx-7.2"),
    ({"nics": [{"bridge": "br0", "mac": "52:54:00:AA:BB:CC"}]},
     lambda s: s.nics[0].mac == "52:54:00:aa:bb:cc"),
    ({"labels": {"team/app": "web shop", "empty": ""}},
     lambda s: dict(s.labels) == {"team/app": "web shop", "empty": ""}),
    ({"boot": []}, lambda s: s.boot == ()),
    ({"boot": ["network", "hd"]}, lambda s: s.boot == ("network", "hd")),
])
def test_good_values(fields: dict[str, Any], check: Any) -> None:
    assert check(check_spec({"name": "vm1", **fields}, "kvm"))


def targets(disks: list[dict[str, Any]]) -> list[str]:
    return [d.target for d in check_spec({"name": "vm1", "disks": disks}, "kvm").disks]


def test_automatic_disk_targets_per_bus() -> None:
    disks = [{"path": "/a"}, {"path": "/b", "bus": "virtio"}, {"path": "/c", "bus": "sata"},
             {"path": "/d", "bus": "scsi"}, {"path": "/e", "bus": "ide"}, {"path": "/f"}]
    assert targets(disks) == ["vda", "vdb", "sda", "sdb", "hda", "vdc"]


def test_automatic_targets_skip_given_ones() -> None:
    disks = [{"path": "/a"}, {"path": "/b", "target": "vda"}, {"path": "/c"},
             {"path": "/d", "bus": "scsi"}, {"path": "/e", "bus": "sata", "target": "sda"}]
    assert targets(disks) == ["vdb", "vda", "vdc", "sdb", "sda"]


def test_automatic_targets_go_on_past_z() -> None:
    names = targets([{"path": f"/d{i}"} for i in range(28)])
    assert names[0] == "vda"
    assert names[25:] == ["vdz", "vdaa", "vdab"]
    assert len(set(names)) == 28


def test_disk_and_nic_defaults() -> None:
    spec = check_spec({"name": "vm1", "disks": [{"path": "/img"}],
                       "nics": [{"libvirt_network": "default"}]}, "kvm")
    disk, nic = spec.disks[0], spec.nics[0]
    assert (disk.path, disk.format, disk.bus, disk.target) == ("/img", "raw", "virtio", "vda")
    assert (disk.readonly, disk.boot_order) == (False, None)
    assert (nic.source_type, nic.source, nic.model, nic.mac) == (
        "network", "default", "virtio", None)


# --- domain_xml --------------------------------------------------------------------------

FULL = {
    "name": "web-1",
    "uuid": "0f0e7a3c-6a39-4c1e-9f3a-8e0cbd6f5d21",
    "domain_type": "kvm",
    "memory_mib": 1024,
    "max_memory_mib": 4096,
    "vcpus": 2,
    "max_vcpus": 8,
    "cpu_model": "Haswell-noTSX",
    "machine": "pc-q35-8.2",
    "firmware": "uefi",
    "disks": [
        {"path": "/images/root.qcow2", "format": "qcow2", "boot_order": 1},
        {"path": "/images/seed.iso", "bus": "sata", "readonly": True},
    ],
    "nics": [
        {"bridge": "br0", "mac": "52:54:00:12:34:56"},
        {"libvirt_network": "default", "model": "e1000"},
    ],
    "graphics": "vnc",
    "kernel": "/boot/vmlinuz",
    "initrd": "/boot/initrd.img",
    "cmdline": "console=ttyS0 root=/dev/vda1",
    "labels": {"env": "prod"},
}


@pytest.fixture(scope="module")
def full() -> etree._Element:
    return render(FULL)


def test_domain_identity_and_size(full: etree._Element) -> None:
    assert full.tag == "domain"
    assert full.get("type") == "kvm"
    assert full.findtext("name") == "web-1"
    assert full.findtext("uuid") == FULL["uuid"]
    memory, current = full.find("memory"), full.find("currentMemory")
    assert (memory.text, memory.get("unit")) == ("4096", "MiB")
    assert (current.text, current.get("unit")) == ("1024", "MiB")
    vcpu = full.find("vcpu")
    assert (vcpu.text, vcpu.get("current")) == ("8", "2")


def test_equal_sizes_need_no_current_vcpus() -> None:
    root = render({"name": "vm1", "vcpus": 3, "memory_mib": 256})
    assert root.findtext("vcpu") == "3"
    assert root.find("vcpu").get("current") in (None, "3")
    assert root.findtext("memory") == root.findtext("currentMemory") == "256"


def test_os_with_direct_kernel_boot_and_uefi(full: etree._Element) -> None:
    os_el = full.find("os")
    assert os_el.get("firmware") == "efi"
    assert os_el.find("type").get("machine") == "pc-q35-8.2"
    assert os_el.findtext("type") == "hvm"
    assert os_el.findtext("kernel") == "/boot/vmlinuz"
    assert os_el.findtext("initrd") == "/boot/initrd.img"
    assert os_el.findtext("cmdline") == "console=ttyS0 root=/dev/vda1"
    # A per-disk boot order excludes <os><boot>: libvirt refuses both.
    assert os_el.findall("boot") == []


def test_bios_and_boot_devices() -> None:
    os_el = render({"name": "vm1", "boot": ["network", "hd"]}).find("os")
    assert os_el.get("firmware") is None
    assert [b.get("dev") for b in os_el.findall("boot")] == ["network", "hd"]
    assert os_el.find("kernel") is None


def test_cpu_model_and_mode(full: etree._Element) -> None:
    cpu = full.find("cpu")
    assert cpu.get("mode") == "custom"
    assert cpu.findtext("model") == "Haswell-noTSX"
    passthrough = render({"name": "vm1", "cpu_model": "host-passthrough"}).find("cpu")
    assert passthrough.get("mode") == "host-passthrough"
    assert passthrough.find("model") is None
    assert render({"name": "vm1"}).find("cpu") is None


def test_disks(full: etree._Element) -> None:
    root_disk, seed = full.findall("devices/disk")
    assert root_disk.find("driver").get("type") == "qcow2"
    assert root_disk.find("source").get("file") == "/images/root.qcow2"
    assert dict(root_disk.find("target").attrib) == {"dev": "vda", "bus": "virtio"}
    assert root_disk.find("boot").get("order") == "1"
    assert root_disk.find("readonly") is None
    assert seed.find("driver").get("type") == "raw"
    assert seed.find("source").get("file") == "/images/seed.iso"
    assert dict(seed.find("target").attrib) == {"dev": "sda", "bus": "sata"}
    assert seed.find("readonly") is not None
    assert seed.find("boot") is None


def test_interfaces(full: etree._Element) -> None:
    bridged, networked = full.findall("devices/interface")
    assert bridged.get("type") == "bridge"
    assert bridged.find("source").attrib == {"bridge": "br0"}
    assert bridged.find("mac").get("address") == "52:54:00:12:34:56"
    assert bridged.find("model").get("type") == "virtio"
    assert networked.get("type") == "network"
    assert networked.find("source").attrib == {"network": "default"}
    assert networked.find("mac") is None  # libvirt generates one
    assert networked.find("model").get("type") == "e1000"


def test_graphics_listen_on_loopback_with_an_expired_password(full: etree._Element) -> None:
    (graphics,) = full.findall("devices/graphics")
    assert graphics.get("type") == "vnc"
    assert [listen.get("address") for listen in graphics.findall("listen")] == ["127.0.0.1"]
    assert graphics.get("listen") in (None, "127.0.0.1")
    assert graphics.get("passwd")
    valid_to = datetime.fromisoformat(graphics.get("passwdValidTo")).replace(tzinfo=UTC)
    assert valid_to < datetime.now(UTC)


def test_graphics_passwords_differ() -> None:
    one = render({"name": "vm1", "graphics": "spice"}).find("devices/graphics")
    two = render({"name": "vm1", "graphics": "spice"}).find("devices/graphics")
    assert one.get("type") == "spice"
    assert one.get("passwd") != two.get("passwd")


def test_serial_console(full: etree._Element) -> None:
    assert full.find("devices/serial").get("type") == "pty"
    console = full.find("devices/console")
    assert console.get("type") == "pty"
    assert console.find("target").get("type") == "serial"


def test_no_serial_no_graphics() -> None:
    devices = render({"name": "vm1", "serial": False}).find("devices")
    assert devices.find("serial") is None
    assert devices.find("console") is None
    assert devices.find("graphics") is None


def test_metadata_element(full: etree._Element) -> None:
    (vm,) = full.findall("metadata/v:vm", NS)
    assert vm.get("owner") == "virtnode"
    assert vm.get("created") == "1700000000.000"
    labels = {label.get("key"): label.text for label in vm.findall("v:labels/v:label", NS)}
    assert labels == {"env": "prod", "team/app": "web shop"}


def test_domain_xml_passes_libvirts_schema() -> None:
    if not Path("/usr/share/libvirt/schemas/domain.rng").exists():
        missing("libvirt's RNG schemas are not installed")
    spec = check_spec({**FULL, "name": f"vmspec-{uuid.uuid4().hex[:8]}", "uuid": None,
                       "domain_type": "test"}, "kvm")
    xml = domain_xml(spec, METADATA)
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        try:
            assert read_metadata(dom.XMLDesc(0)) == METADATA
        finally:
            dom.undefine()
    finally:
        conn.close()


# --- metadata ----------------------------------------------------------------------------

def test_read_metadata_round_trips() -> None:
    xml = domain_xml(check_spec({"name": "vm1"}, "kvm"), METADATA)
    assert read_metadata(xml) == METADATA


def test_metadata_values_are_strings_and_none_is_left_out() -> None:
    xml = domain_xml(check_spec({"name": "vm1"}, "kvm"),
                     {"owner": "virtnode", "created": 1.5, "started": None, "labels": {}})
    assert read_metadata(xml) == {"owner": "virtnode", "created": "1.5", "labels": {}}


def test_metadata_labels_escape_markup() -> None:
    labels = {"note": '<b>&"quoted"</b>'}
    xml = domain_xml(check_spec({"name": "vm1", "labels": labels}, "kvm"), {"labels": labels})
    assert read_metadata(xml) == {"labels": labels}


@pytest.mark.parametrize("xml", [
    "<domain type='kvm'><name>vm1</name></domain>",
    "<domain type='kvm'><name>vm1</name><metadata/></domain>",
    "<domain type='kvm'><name>vm1</name><metadata>"
    "<app:vm xmlns:app='urn:other:app' owner='other'/></metadata></domain>",
    "<domain type='kvm'><name>vm1</name><vm owner='virtnode'/></domain>",
])
def test_read_metadata_without_ours(xml: str) -> None:
    assert read_metadata(xml) is None


def test_metadata_body_without_namespace() -> None:
    body = metadata_body(METADATA, namespaced=False)
    text = etree.tostring(body, encoding="unicode")
    assert body.tag == "vm"
    assert "xmlns" not in text
    assert NAMESPACE not in text
    assert all(etree.QName(el).namespace is None for el in body.iter())
    assert [el.tag for el in body.iter()] == ["vm", "labels", "label", "label"]
    assert body.get("owner") == "virtnode"


def test_metadata_body_as_libvirt_returns_it() -> None:
    text = etree.tostring(metadata_body(METADATA), encoding="unicode")
    assert read_metadata_body(text) == METADATA


# --- check_domain_xml --------------------------------------------------------------------

CLIENT_XML = """<domain type='kvm'>
  <name>imported</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>256</memory>
  <metadata>
    <app:info xmlns:app='urn:example:app'>keep me</app:info>
    {ours}
  </metadata>
  <devices/>
</domain>"""


def test_client_xml_keeps_name_and_uuid() -> None:
    vm_id = "0F0E7A3C-6A39-4C1E-9F3A-8E0CBD6F5D21"
    name, got, xml = check_domain_xml(CLIENT_XML.format(uuid=vm_id, ours=""), METADATA)
    assert (name, got) == ("imported", vm_id.lower())
    root = etree.fromstring(xml)
    assert root.findtext("uuid") == vm_id.lower()
    assert root.findtext("memory") == "256"
    assert read_metadata(xml) == METADATA
    assert root.findtext("metadata/{urn:example:app}info") == "keep me"


def test_client_xml_without_uuid_gets_one() -> None:
    name, vm_id, xml = check_domain_xml("<domain type='kvm'><name>vm1</name></domain>", {})
    assert name == "vm1"
    assert str(uuid.UUID(vm_id)) == vm_id
    assert etree.fromstring(xml).findall("uuid")[0].text == vm_id
    assert len(etree.fromstring(xml).findall("uuid")) == 1


def test_client_xml_cannot_forge_our_metadata() -> None:
    forged = (f"<virtnode:vm xmlns:virtnode='{NAMESPACE}' owner='someone' extra='1'>"
              f"<virtnode:labels><virtnode:label key='env'>forged</virtnode:label>"
              f"</virtnode:labels></virtnode:vm>"
              f"<x:vm xmlns:x='{NAMESPACE}' owner='again'/>")
    text = CLIENT_XML.format(uuid=uuid.uuid4(), ours=forged)
    _, _, xml = check_domain_xml(text, METADATA)
    root = etree.fromstring(xml)
    assert len(root.findall("metadata/v:vm", NS)) == 1
    assert read_metadata(xml) == METADATA
    assert "forged" not in xml
    assert "someone" not in xml
    assert root.findtext("metadata/{urn:example:app}info") == "keep me"


@pytest.mark.parametrize("xml", [
    "<network><name>vm1</name></network>",
    "<domainx type='kvm'><name>vm1</name></domainx>",
    f"<domain xmlns='{NAMESPACE}'><name>vm1</name></domain>",
])
def test_client_xml_must_be_a_domain(xml: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_domain_xml(xml, {})
    assert caught.value.reason == "bad_xml"
    assert caught.value.details["field"] == "xml"


@pytest.mark.parametrize("xml", [
    "<domain><name>vm1</name>",
    "",
    "not xml",
    "<domain><name>vm1</name></domain><domain/>",
    "<domain type='kvm'><name>vm1</nam></domain>",
])
def test_malformed_client_xml(xml: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_domain_xml(xml, {})
    assert caught.value.reason == "bad_xml"
    assert caught.value.to_error()["code"] == 3


@pytest.mark.parametrize(("xml", "field"), [
    ("<domain type='kvm'><name>../../etc/passwd</name></domain>", "xml.name"),
    ("<domain type='kvm'><name>a/b</name></domain>", "xml.name"),
    ("<domain type='kvm'><name></name></domain>", "xml.name"),
    ("<domain type='kvm'></domain>", "xml.name"),
    ("<domain type='kvm'><name>.vm</name></domain>", "xml.name"),
    ("<domain type='kvm'><name>vm1</name><uuid>nope</uuid></domain>", "xml.uuid"),
])
def test_client_xml_unsafe_values(xml: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_domain_xml(xml, {})
    assert caught.value.details["field"] == field


LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE domain [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<domain type="kvm"><name>vm1</name><description>&lol9;</description></domain>"""


def test_billion_laughs_is_refused_unexpanded() -> None:
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as caught:
        check_domain_xml(LAUGHS, {})
    assert time.monotonic() - started < 0.2
    assert caught.value.reason == "bad_xml"
    assert "lollollol" not in caught.value.message


class RecordingResolver(etree.Resolver):
    """Records every external resource the XML parser tries to load."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def resolve(self, system_url: str, public_id: str, context: object) -> None:
        self.urls.append(system_url)


@pytest.fixture
def loads() -> Iterator[RecordingResolver]:
    resolver = RecordingResolver()
    xmlutil._PARSER.resolvers.add(resolver)
    yield resolver
    xmlutil._PARSER.resolvers.remove(resolver)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text("s3cretname")
    return path


def external_entity(secret: Path) -> list[str]:
    url = secret.as_uri()
    return [
        f'<!DOCTYPE domain [<!ENTITY xxe SYSTEM "{url}">]>'
        '<domain type="kvm"><name>&xxe;</name></domain>',
        f'<!DOCTYPE domain [<!ENTITY xxe SYSTEM "{url}">]>'
        '<domain type="kvm"><name>vm1</name><description>&xxe;</description></domain>',
        f'<!DOCTYPE domain [<!ENTITY % xxe SYSTEM "{url}"> %xxe;]>'
        '<domain type="kvm"><name>vm1</name></domain>',
        f'<!DOCTYPE domain SYSTEM "{url}"><domain type="kvm"><name>vm1</name></domain>',
    ]


@pytest.mark.parametrize("case", range(4))
def test_external_entities_are_not_read(case: int, secret: Path,
                                        loads: RecordingResolver) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_domain_xml(external_entity(secret)[case], {})
    assert caught.value.reason == "bad_xml"
    assert "s3cretname" not in caught.value.message
    assert loads.urls == []


def test_the_resolver_sees_loads_of_a_resolving_parser(secret: Path) -> None:
    # The check above can fail: a parser that resolves entities shows up in the record.
    resolver = RecordingResolver()
    parser = etree.XMLParser(resolve_entities=True, load_dtd=True)
    parser.resolvers.add(resolver)
    root = etree.fromstring(external_entity(secret)[0].encode(), parser)
    assert root.findtext("name") == "s3cretname"
    assert resolver.urls


def test_internal_entities_are_refused() -> None:
    xml = ('<!DOCTYPE domain [<!ENTITY n "vm1">]>'
           '<domain type="kvm"><name>&n;</name></domain>')
    with pytest.raises(InvalidArgument) as caught:
        check_domain_xml(xml, {})
    assert caught.value.reason == "bad_xml"


# --- device_summary ----------------------------------------------------------------------

LIVE_XML = """<domain type='kvm' id='7'>
  <name>web-1</name>
  <uuid>0f0e7a3c-6a39-4c1e-9f3a-8e0cbd6f5d21</uuid>
  <memory unit='KiB'>1048576</memory>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native'/>
      <source file='/images/root.qcow2' index='2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/data' index='1'/>
      <target dev='sda' bus='scsi'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sdb' bus='sata'/>
      <readonly/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci'/>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:56'/>
      <source bridge='br0'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:ab:cd:ef'/>
      <source network='default' portid='1c1f1e8a-2e3d-4b5c-9d0e-1f2a3b4c5d6e' bridge='virbr0'/>
      <target dev='vnet4'/>
      <model type='e1000'/>
    </interface>
    <serial type='pty'><source path='/dev/pts/3'/><target port='0'/></serial>
    <graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <graphics type='spice' autoport='yes'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
  </devices>
</domain>"""


def test_device_summary_of_live_xml() -> None:
    assert device_summary(LIVE_XML) == {
        "disks": [
            {"target": "vda", "bus": "virtio", "device": "disk",
             "path": "/images/root.qcow2", "format": "qcow2"},
            {"target": "sda", "bus": "scsi", "device": "disk",
             "path": "/dev/vg0/data", "format": "raw"},
            {"target": "sdb", "bus": "sata", "device": "cdrom", "path": "", "format": "raw"},
        ],
        "nics": [
            {"mac": "52:54:00:12:34:56", "model": "virtio", "type": "bridge",
             "source": "br0", "device": "vnet3"},
            {"mac": "52:54:00:ab:cd:ef", "model": "e1000", "type": "network",
             "source": "default", "device": "vnet4"},
        ],
        "graphics": [
            {"type": "vnc", "port": 5901, "listen": "127.0.0.1"},
            {"type": "spice", "port": -1, "listen": ""},
        ],
    }


def test_device_summary_of_a_stopped_vm_built_here() -> None:
    summary = device_summary(domain_xml(check_spec(FULL, "kvm"), METADATA))
    assert [d["target"] for d in summary["disks"]] == ["vda", "sda"]
    assert [n["device"] for n in summary["nics"]] == ["", ""]
    assert summary["graphics"] == [{"type": "vnc", "port": -1, "listen": ""}]


@pytest.mark.parametrize(("spec", "field"), [
    ({"name": "vm1", "initrd": "/boot/initrd.img"}, "spec.kernel"),
    ({"name": "vm1", "cmdline": "console=ttyS0"}, "spec.kernel"),
    ({"name": "vm1", "disks": [{"path": "/a", "boot_order": 1},
                               {"path": "/b", "boot_order": 1}]}, "spec.disks"),
    ({"name": "vm1", "boot": ["network"], "disks": [{"path": "/a", "boot_order": 1}]},
     "spec.boot"),
])
def test_boot_settings_that_libvirt_would_drop_or_refuse(spec: dict[str, Any],
                                                          field: str) -> None:
    assert rejected(spec).details["field"] == field


def test_a_volume_disk_carries_its_backing_chain() -> None:
    from virtnode.vm.spec import check_disk, disk_element, with_chain

    raw = with_chain({"volume": {}, "bus": "virtio"},
                     [("/sd/i/leaf", "qcow2"), ("/sd/i/mid", "qcow2"), ("/sd/t/base", "raw")])
    disk = check_disk(raw, "disk", "vda")
    assert (disk.path, disk.format) == ("/sd/i/leaf", "qcow2")
    element = disk_element(disk)
    stores = element.findall(".//backingStore")
    assert len(stores) == 3
    assert [s.find("source").get("file") for s in stores[:2]] == ["/sd/i/mid", "/sd/t/base"]
    assert [s.find("format").get("type") for s in stores[:2]] == ["qcow2", "raw"]
    assert len(stores[2]) == 0  # an empty element ends the chain


def test_a_disk_given_by_path_ends_its_chain_at_once() -> None:
    """libvirt must not follow a backing file named inside the image: whoever wrote the
    image (a guest, through its own disk) would choose what the next guest opens."""
    from virtnode.vm.spec import check_disk, disk_element

    element = disk_element(check_disk({"path": "/img/a.qcow2", "format": "qcow2"}, "disk",
                                      "vda"))
    stores = element.findall(".//backingStore")
    assert len(stores) == 1 and len(stores[0]) == 0 and not stores[0].attrib


def test_a_volume_disk_without_parent_still_ends_its_chain() -> None:
    """Without the empty element libvirt would read the qcow2 header, and QEMU open
    whatever backing file the header names."""
    from virtnode.vm.spec import check_disk, disk_element, with_chain

    disk = check_disk(with_chain({"volume": {}}, [("/sd/i/leaf", "qcow2")]), "disk", "vda")
    element = disk_element(disk)
    [store] = element.findall(".//backingStore")
    assert store.getparent() is element and len(store) == 0 and not store.attrib


def test_an_unresolved_volume_disk_is_refused() -> None:
    from virtnode.vm.spec import check_disk

    with pytest.raises(InvalidArgument):
        check_disk({"volume": {"sd_id": "x"}, "path": "/x"}, "disk", "vda")


def test_image_files_of_a_domain() -> None:
    from virtnode.vm.spec import image_files

    raw = {"name": "vm1", "kernel": "/k", "initrd": "/i",
           "disks": [{"path": "/a.qcow2", "format": "qcow2"}, {"path": "/b.raw"}]}
    root = etree.fromstring(domain_xml(check_spec(raw, "kvm"), {}))
    assert image_files(root, "xml") == [
        ("/a.qcow2", "xml.devices.disk[1].source", True),
        ("/b.raw", "xml.devices.disk[2].source", False),
        ("/k", "xml.os.kernel", False), ("/i", "xml.os.initrd", False)]
    chained = etree.fromstring(
        "<disk><driver type='qcow2'/><source file='/top'/><backingStore type='file'>"
        "<format type='raw'/><source file='/base'/><backingStore/></backingStore></disk>")
    assert image_files(chained, "disk") == [("/top", "disk.source", False),
                                            ("/base", "disk.source", False)]


def test_written_files_are_the_writable_file_disks() -> None:
    from virtnode.vm.spec import written_files

    raw = {"name": "vm1", "kernel": "/k",
           "disks": [{"path": "/a.qcow2", "format": "qcow2"},
                     {"path": "/ro.raw", "readonly": True}, {"path": "/b.raw"}]}
    root = etree.fromstring(domain_xml(check_spec(raw, "kvm"), {}))
    devices = root.find("devices")
    assert devices is not None
    devices.append(etree.fromstring("<disk device='cdrom'><source file='/iso'/></disk>"))
    devices.append(etree.fromstring("<disk type='block'><source dev='/dev/sdz'/></disk>"))
    assert written_files(root) == ["/a.qcow2", "/b.raw"]
    assert written_files(devices[0]) == ["/a.qcow2"]
    assert written_files(devices[1]) == []


@pytest.mark.parametrize(("field", "expected"), [
    ("xml.devices.disk[1].source", "spec.disks.0.path"),
    ("xml.devices.disk[2].backingStore.source", "spec.disks.1.volume"),
    ("xml.devices.disk[3].source", "xml.devices.disk[3].source"),
    ("xml.os.kernel", "spec.kernel"),
    ("xml.os.initrd", "spec.initrd"),
    ("xml.devices.interface[1]", "xml.devices.interface[1]"),
])
def test_spec_field_of_a_refused_element(field: str, expected: str) -> None:
    from virtnode.vm.spec import spec_field

    assert spec_field(field, [{"path": "/a"}, {"volume": {}}]) == expected


def test_disk_field_of_a_refused_element() -> None:
    from virtnode.vm.spec import disk_field

    assert disk_field("disk.source", {"path": "/a"}) == "disk.path"
    assert disk_field("disk.backingStore.source", {"volume": {}}) == "disk.volume"


# --- CD-ROMs -------------------------------------------------------------------------------

def test_cdroms_empty_or_with_media_are_read_only_raw_drives() -> None:
    root = render({"name": "vm1", "cdroms": [{"path": "/isos/debian.iso", "boot_order": 1},
                                             {}]})
    first, empty = root.findall("devices/disk")
    assert first.get("device") == "cdrom" and empty.get("device") == "cdrom"
    assert first.find("source").get("file") == "/isos/debian.iso"
    assert first.find("driver").get("type") == "raw"
    assert first.find("readonly") is not None and empty.find("readonly") is not None
    assert empty.find("source") is None, "an empty drive has no media"
    assert first.find("target").attrib == {"dev": "sda", "bus": "sata"}
    assert empty.find("target").attrib == {"dev": "sdb", "bus": "sata"}
    assert first.find("boot").get("order") == "1"
    assert root.find("os/boot") is None, "per-device boot order replaces os/boot"


def test_cdroms_and_disks_share_device_names() -> None:
    root = render({"name": "vm1", "disks": [{"path": "/a", "bus": "sata"}],
                   "cdroms": [{"path": "/b.iso"}, {"bus": "ide"}]})
    targets = [t.attrib for t in root.iterfind("devices/disk/target")]
    assert targets == [{"dev": "sda", "bus": "sata"}, {"dev": "sdb", "bus": "sata"},
                       {"dev": "hda", "bus": "ide"}]


def test_a_scsi_drive_gets_a_virtio_scsi_controller() -> None:
    assert render({"name": "vm1", "cdroms": [{"bus": "sata"}]}).find(
        "devices/controller[@type='scsi']") is None
    root = render({"name": "vm1", "cdroms": [{"path": "/b.iso", "bus": "scsi"}]})
    [controller] = root.findall("devices/controller[@type='scsi']")
    assert controller.get("model") == "virtio-scsi"


@pytest.mark.parametrize(("spec", "field"), [
    ({"cdroms": [{"bus": "virtio"}]}, "spec.cdroms.0.bus"),
    ({"cdroms": [{"path": "relative.iso"}]}, "spec.cdroms.0.path"),
    ({"cdroms": [{"path": "/a/../etc/shadow"}]}, "spec.cdroms.0.path"),
    ({"cdroms": [{"target": "vda"}]}, "spec.cdroms.0.target"),
    ({"cdroms": [{"volume": {}}]}, "spec.cdroms.0.volume"),
    ({"disks": [{"path": "/a", "bus": "sata", "target": "sda"}],
      "cdroms": [{"target": "sda"}]}, "spec.disks"),
    ({"disks": [{"path": "/a", "boot_order": 1}], "cdroms": [{"boot_order": 1}]},
     "spec.disks"),
    ({"boot": ["cdrom"], "cdroms": [{"boot_order": 1}]}, "spec.boot"),
    ({"cdroms": [{"boot_order": 0}]}, "spec.cdroms.0.boot_order"),
])
def test_bad_cdroms_name_the_field(spec: dict[str, Any], field: str) -> None:
    assert rejected({"name": "vm1", **spec}).details["field"] == field


def test_cdrom_media_from_a_volume_is_one_raw_image() -> None:
    assert with_media({"volume": {}, "bus": "scsi"}, [("/sd/iso", "raw")],
                      "spec.cdroms.0") == {"path": "/sd/iso", "bus": "scsi"}
    for chain in ([("/sd/top", "qcow2")], [("/sd/top", "raw"), ("/sd/base", "raw")]):
        with pytest.raises(InvalidArgument) as caught:
            with_media({"volume": {}}, chain, "spec.cdroms.0")
        assert caught.value.reason == "invalid_media"
        assert caught.value.details["field"] == "spec.cdroms.0.volume"


def test_cdroms_pass_libvirts_schema() -> None:
    if not Path("/usr/share/libvirt/schemas/domain.rng").exists():
        missing("libvirt's RNG schemas are not installed")
    spec = check_spec({"name": f"vmspec-{uuid.uuid4().hex[:8]}", "domain_type": "test",
                       "cdroms": [{"path": "/isos/a.iso", "bus": "scsi", "boot_order": 1},
                                  {"bus": "sata"}],
                       "disks": [{"path": "/a.img", "boot_order": 2}]}, "kvm")
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXMLFlags(domain_xml(spec, METADATA),
                                  libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        dom.undefine()
    finally:
        conn.close()


# --- cloud-init ----------------------------------------------------------------------------

USER_DATA = "#cloud-config\npassword: secret\nruncmd:\n  - [touch, /tmp/done]\n"


def test_cloud_init_gets_a_drive_after_every_other_and_its_meta_data() -> None:
    spec = check_spec({"name": "web1", "uuid": "6c0f7c5e-0a8e-4b8a-9a51-0f4b3c1e2d10",
                       "cdroms": [{"path": "/i.iso", "bus": "scsi"}],
                       "cloud_init": {"user_data": USER_DATA,
                                      "meta_data": {"local-hostname": "web"},
                                      "network_config": {"version": 2, "ethernets": {}}}},
                      "kvm")
    seed = spec.cloud_init
    assert seed is not None
    assert (seed.bus, seed.target) == ("scsi", "sdb"), "the first CD-ROM's bus, next name"
    assert seed.user_data == USER_DATA, "user data goes into the seed as given"
    assert yaml.safe_load(seed.meta_data) == {
        "instance-id": "6c0f7c5e-0a8e-4b8a-9a51-0f4b3c1e2d10", "local-hostname": "web"}
    assert yaml.safe_load(seed.network_config or "") == {"version": 2, "ethernets": {}}
    drive = seed_element(spec, "/sd/seed")
    assert drive.find("source").get("file") == "/sd/seed"
    assert drive.find("target").attrib == {"dev": "sdb", "bus": "scsi"}
    assert drive.find("readonly") is not None


@pytest.mark.parametrize(("cloud_init", "field", "says"), [
    ({"user_data": "hello"}, "spec.cloud_init.user_data", "#cloud-config"),
    ({"user_data": "#cloud-config\nruncmd: [a\n"}, "spec.cloud_init.user_data", "line 3"),
    ({"user_data": "#cloud-config\n- a\n- b\n"}, "spec.cloud_init.user_data", "mapping"),
    ({"user_data": "#cloud-config\na: !!python/object:os.system x\n"},
     "spec.cloud_init.user_data", "python/object"),
    ({"user_data": "#!/bin/sh\n", "meta_data": {"instance-id": 5}},
     "spec.cloud_init.meta_data.instance-id", "string"),
    ({"user_data": "#!/bin/sh\n", "network_config": {"version": 3}},
     "spec.cloud_init.network_config.version", "1 or 2"),
    ({"user_data": "#!/bin/sh\n", "bus": "virtio"}, "spec.cloud_init.bus", "virtio"),
])
def test_bad_cloud_init_is_refused_before_anything_is_made(
        cloud_init: dict[str, Any], field: str, says: str) -> None:
    error = rejected({"name": "vm1", "cloud_init": cloud_init})
    assert error.details["field"] == field
    assert says in error.message


def test_the_seed_is_an_iso_labelled_cidata_with_the_nocloud_files() -> None:
    spec = check_spec({"name": "web1", "cloud_init": {
        "user_data": USER_DATA, "network_config": {"version": 1, "config": []}}}, "kvm")
    assert spec.cloud_init is not None
    data = seed_image(spec.cloud_init)
    assert len(data) % 2048 == 0
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"cidata"
        files = {}
        for name in ("user-data", "meta-data", "network-config"):
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue().decode()
    finally:
        iso.close()
    assert files["user-data"] == USER_DATA
    assert yaml.safe_load(files["meta-data"])["local-hostname"] == "web1"
    assert yaml.safe_load(files["network-config"]) == {"version": 1, "config": []}
