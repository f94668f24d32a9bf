"""Live changes to VMs through the dispatcher, on libvirt's test driver in this process.

The test driver changes memory and vCPUs, but plugs and unplugs no device and updates no
graphics: it answers those calls Unimplemented. For them these tests check what the agent
does up to libvirt (its checks, the errors it answers, the XML and flags it sends).
tests/integration/test_vm_devices.py shows on QEMU what only QEMU shows: the device in
the guest and in the definition, the guest releasing it (or not, and the unplug timing
out), the console password taking effect, memory changing on a running persistent VM.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
from lxml import etree

from tests.unit.vm.harness import DomainCalls, InProcessAgent
from virtnode.hypervisor import constants as vc

UNKNOWN = "00000000-0000-4000-8000-00000000abcd"
MAC = "52:54:00:aa:bb:01"
LIVE, CONFIG = vc.DOMAIN_AFFECT_LIVE, vc.DOMAIN_AFFECT_CONFIG


async def running_vm(api: InProcessAgent, *, persistent: bool = True, **spec: object) -> str:
    """A running VM with one disk (vda), one NIC (MAC) and a VNC console."""
    return await api.create(
        "dev1", persistent=persistent, max_memory_mib=256, vcpus=1, max_vcpus=4,
        disks=[{"path": api.image("root.img")}],
        nics=[{"libvirt_network": "default", "mac": MAC}], graphics="vnc", **spec)


def sent(calls: DomainCalls, method: str) -> tuple[etree._Element, int]:
    """The one device XML the agent sent with ``method``, parsed, and its flags."""
    (args,) = calls.of(method)
    xml, flags = args
    return etree.fromstring(xml), flags


async def unimplemented(api: InProcessAgent, method: str, params: dict[str, object]) -> None:
    """The call gets as far as libvirt, whose test driver does not do it."""
    await api.error(method, params, "Unimplemented", "unsupported_by_hypervisor",
                    undeclared="Unimplemented")


# --- VM.hotplugDisk --------------------------------------------------------------------------


@pytest.mark.covers("VM.hotplugDisk")
async def test_hotplug_disk_sends_the_next_free_target_and_the_checked_path(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await running_vm(api)
    data = api.image("data.img")
    link = api.images / "data-link.img"
    os.symlink(data, link)
    calls = api.record_domain_calls(monkeypatch)
    await unimplemented(api, "VM.hotplugDisk", {"vm_id": vm_id, "disk": {"path": str(link)}})
    disk, flags = sent(calls, "attachDeviceFlags")
    assert flags == LIVE | CONFIG, "a persistent VM's definition gets the disk too"
    assert disk.find("target").attrib == {"dev": "vdb", "bus": "virtio"}
    assert disk.find("source").get("file") == data, "the path as checked, not the link"
    assert disk.find("driver").get("type") == "raw"
    below = disk.find("backingStore")
    assert below is not None and len(below) == 0, "the image is used alone"


@pytest.mark.covers("VM.hotplugDisk")
async def test_hotplug_disk_on_a_transient_vm_is_live_only(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await running_vm(api, persistent=False)
    calls = api.record_domain_calls(monkeypatch)
    await unimplemented(api, "VM.hotplugDisk", {"vm_id": vm_id, "disk": {
        "path": api.image("cd.iso"), "bus": "sata", "readonly": True}})
    disk, flags = sent(calls, "attachDeviceFlags")
    assert flags == LIVE
    assert disk.find("target").attrib == {"dev": "sda", "bus": "sata"}
    assert disk.find("readonly") is not None


@pytest.mark.covers("VM.hotplugDisk")
@pytest.mark.parametrize(("disk", "refusal"), [
    ({"path": "/etc/passwd"}, ("PermissionDenied", "path_not_allowed", "disk.path")),
    ({"path": "relative.img"}, ("InvalidArgument", "invalid_spec", "disk.path")),
    ({"path": "{images}/missing.img"}, ("NotFound", "no_such_file", None)),
    ({"path": "{images}/root.img", "target": "vda"}, ("AlreadyExists", "target_taken", None)),
    ({"path": "{images}/root.img", "target": "sdb"},
     ("InvalidArgument", "invalid_spec", "disk.target")),
    ({"path": "{images}/root.img", "format": "vmdk"},
     ("InvalidArgument", "invalid_spec", "disk.format")),
    ({"path": "{images}/root.img", "volume": {}}, ("InvalidParams", None, None)),
    ({"bus": "virtio"}, ("InvalidParams", None, None)),
])
async def test_a_refused_hotplug_disk_does_not_reach_libvirt(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch, disk: dict[str, object],
        refusal: tuple[str, str | None, str | None]) -> None:
    name, reason, field = refusal
    vm_id = await running_vm(api)
    calls = api.record_domain_calls(monkeypatch)
    given = {k: v.format(images=api.images) if isinstance(v, str) else v
             for k, v in disk.items()}
    error = await api.error("VM.hotplugDisk", {"vm_id": vm_id, "disk": given}, name, reason)
    if field is not None:
        assert error.data["field"] == field, error.error
    assert calls.of("attachDeviceFlags") == []


@pytest.mark.covers("VM.hotplugDisk")
async def test_hotplug_disk_needs_a_running_vm(api: InProcessAgent,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await api.create(start=False)
    calls = api.record_domain_calls(monkeypatch)
    disk = {"path": api.image()}
    await api.error("VM.hotplugDisk", {"vm_id": vm_id, "disk": disk}, "FailedPrecondition",
                    "vm_not_running")
    error = await api.error("VM.hotplugDisk", {"vm_id": UNKNOWN, "disk": disk}, "NotFound",
                            "not_found")
    assert (error.data["object"], error.data["id"]) == ("vm", UNKNOWN)
    assert calls.of("attachDeviceFlags") == []


# --- VM.hotunplugDisk ------------------------------------------------------------------------


@pytest.mark.covers("VM.hotunplugDisk")
async def test_hotunplug_disk_sends_the_live_disk(api: InProcessAgent,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await running_vm(api)
    calls = api.record_domain_calls(monkeypatch)
    # Whether the guest then releases the disk, or the call times out, only QEMU shows.
    await unimplemented(api, "VM.hotunplugDisk", {"vm_id": vm_id, "target": "vda"})
    disk, flags = sent(calls, "detachDeviceFlags")
    assert flags == LIVE | CONFIG
    assert disk.find("target").get("dev") == "vda"
    assert disk.find("source").get("file") == str(api.images / "root.img")
    assert [d["target"] for d in (await api.call(
        "VM.getInfo", {"vm_id": vm_id}))["devices"]["disks"]] == ["vda"]


@pytest.mark.covers("VM.hotunplugDisk")
async def test_a_refused_hotunplug_disk_does_not_reach_libvirt(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await running_vm(api)
    stopped = await api.create("off", start=False, disks=[{"path": api.image()}])
    calls = api.record_domain_calls(monkeypatch)
    error = await api.error("VM.hotunplugDisk", {"vm_id": vm_id, "target": "vdz"},
                            "NotFound", "no_such_device")
    assert (error.data["object"], error.data["id"]) == ("disk", "vdz")
    await api.error("VM.hotunplugDisk", {"vm_id": stopped, "target": "vda"},
                    "FailedPrecondition", "vm_not_running")
    await api.error("VM.hotunplugDisk", {"vm_id": UNKNOWN, "target": "vda"}, "NotFound",
                    "not_found")
    for bad in ({"target": "VDA"}, {"target": "vda1"}, {"target": "vda", "timeout": 0}):
        await api.error("VM.hotunplugDisk", {"vm_id": vm_id, **bad}, "InvalidParams")
    assert calls.of("detachDeviceFlags") == []


# --- VM.hotplugNic ---------------------------------------------------------------------------


@pytest.mark.covers("VM.hotplugNic")
async def test_hotplug_nic_sends_an_interface_on_the_bridge(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await running_vm(api)
    calls = api.record_domain_calls(monkeypatch)
    await unimplemented(api, "VM.hotplugNic", {"vm_id": vm_id, "nic": {
        "bridge": "br-test", "model": "e1000", "mac": "52:54:00:AA:BB:02"}})
    await unimplemented(api, "VM.hotplugNic", {"vm_id": vm_id, "nic": {"bridge": "br-test"}})
    (given, _), (generated, _) = calls.of("attachDeviceFlags")
    nic = etree.fromstring(given)
    assert nic.get("type") == "bridge"
    assert nic.find("source").attrib == {"bridge": "br-test"}
    assert nic.find("mac").get("address") == "52:54:00:aa:bb:02"
    assert nic.find("model").get("type") == "e1000"
    assert etree.fromstring(generated).find("mac") is None, "libvirt picks the MAC"
    assert calls.of("attachDeviceFlags")[0][1] == LIVE | CONFIG


@pytest.mark.covers("VM.hotplugNic")
@pytest.mark.parametrize(("nic", "refusal"), [
    ({"bridge": "br0", "mac": MAC.upper()}, ("AlreadyExists", "mac_taken", None)),
    ({"bridge": "br0", "mac": "01:00:5e:00:00:01"},
     ("InvalidArgument", "invalid_spec", "nic.mac")),
    ({"bridge": "br0", "libvirt_network": "default"},
     ("InvalidArgument", "invalid_spec", "nic")),
    ({}, ("InvalidArgument", "invalid_spec", "nic")),
    ({"bridge": "br0; reboot"}, ("InvalidArgument", "invalid_spec", "nic.bridge")),
    ({"bridge": "br0", "model": "ne2k"}, ("InvalidArgument", "invalid_spec", "nic.model")),
    ({"bridge": "br0", "vlan": 5}, ("InvalidParams", None, None)),
])
async def test_a_refused_hotplug_nic_does_not_reach_libvirt(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch, nic: dict[str, object],
        refusal: tuple[str, str | None, str | None]) -> None:
    name, reason, field = refusal
    vm_id = await running_vm(api)
    calls = api.record_domain_calls(monkeypatch)
    error = await api.error("VM.hotplugNic", {"vm_id": vm_id, "nic": nic}, name, reason)
    if field is not None:
        assert error.data["field"] == field, error.error
    assert calls.of("attachDeviceFlags") == []


@pytest.mark.covers("VM.hotplugNic")
async def test_hotplug_nic_needs_a_running_vm(api: InProcessAgent) -> None:
    vm_id = await api.create(start=False)
    nic = {"bridge": "br0"}
    await api.error("VM.hotplugNic", {"vm_id": vm_id, "nic": nic}, "FailedPrecondition",
                    "vm_not_running")
    await api.error("VM.hotplugNic", {"vm_id": UNKNOWN, "nic": nic}, "NotFound", "not_found")


# --- VM.hotunplugNic -------------------------------------------------------------------------


@pytest.mark.covers("VM.hotunplugNic")
async def test_hotunplug_nic_finds_the_nic_by_mac_in_any_case(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await running_vm(api)
    calls = api.record_domain_calls(monkeypatch)
    await unimplemented(api, "VM.hotunplugNic", {"vm_id": vm_id, "mac": MAC.upper()})
    nic, flags = sent(calls, "detachDeviceFlags")
    assert flags == LIVE | CONFIG
    assert nic.find("mac").get("address") == MAC
    assert nic.find("source").get("network") == "default"


@pytest.mark.covers("VM.hotunplugNic")
async def test_a_refused_hotunplug_nic_does_not_reach_libvirt(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await running_vm(api)
    stopped = await api.create("off", start=False, nics=[{"bridge": "br0", "mac": MAC}])
    calls = api.record_domain_calls(monkeypatch)
    other = "52:54:00:00:00:99"
    error = await api.error("VM.hotunplugNic", {"vm_id": vm_id, "mac": other}, "NotFound",
                            "no_such_device")
    assert (error.data["object"], error.data["id"]) == ("nic", other)
    await api.error("VM.hotunplugNic", {"vm_id": stopped, "mac": MAC}, "FailedPrecondition",
                    "vm_not_running")
    await api.error("VM.hotunplugNic", {"vm_id": UNKNOWN, "mac": MAC}, "NotFound",
                    "not_found")
    await api.error("VM.hotunplugNic", {"vm_id": vm_id, "mac": "52-54-00-aa-bb-01"},
                    "InvalidParams")
    assert calls.of("detachDeviceFlags") == []


# --- VM.setTicket ----------------------------------------------------------------------------


@pytest.mark.covers("VM.setTicket")
async def test_set_ticket_sends_the_password_and_when_it_expires(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await running_vm(api)
    calls = api.record_domain_calls(monkeypatch)
    before = time.time()
    # The console's answer (host, port) and the password taking effect: QEMU only.
    await unimplemented(api, "VM.setTicket", {"vm_id": vm_id, "protocol": "vnc",
                                              "password": "s3cret"})
    graphics, flags = sent(calls, "updateDeviceFlags")
    assert flags == LIVE, "a password is for the running console, never the definition"
    assert (graphics.tag, graphics.get("type")) == ("graphics", "vnc")
    assert graphics.get("passwd") == "s3cret"
    valid_to = datetime.datetime.strptime(graphics.get("passwdValidTo"), "%Y-%m-%dT%H:%M:%S")
    expires = valid_to.replace(tzinfo=datetime.UTC).timestamp()
    assert before + 120 - 1 <= expires <= time.time() + 120, "expires_in defaults to 120 s"


@pytest.mark.covers("VM.setTicket")
async def test_a_refused_ticket_does_not_reach_libvirt(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await running_vm(api)
    plain = await api.create("plain")
    stopped = await api.create("off", start=False, graphics="vnc")
    calls = api.record_domain_calls(monkeypatch)
    error = await api.error("VM.setTicket", {"vm_id": vm_id, "protocol": "vnc",
                                             "password": "123456789"},
                            "InvalidArgument", "too_long")
    assert error.data["field"] == "password"
    # SPICE takes long passwords, but this VM's console is VNC.
    await api.error("VM.setTicket", {"vm_id": vm_id, "protocol": "spice",
                                     "password": "a much longer password"},
                    "FailedPrecondition", "no_graphics")
    await api.error("VM.setTicket", {"vm_id": plain, "protocol": "vnc", "password": "pw"},
                    "FailedPrecondition", "no_graphics")
    await api.error("VM.setTicket", {"vm_id": stopped, "protocol": "vnc", "password": "pw"},
                    "FailedPrecondition", "vm_not_running")
    await api.error("VM.setTicket", {"vm_id": UNKNOWN, "protocol": "vnc", "password": "pw"},
                    "NotFound", "not_found")
    for bad in ({"password": ""}, {"password": "pw", "expires_in": 0},
                {"password": "pw", "protocol": "rdp"}):
        await api.error("VM.setTicket", {"vm_id": vm_id, "protocol": "vnc", **bad},
                        "InvalidParams")
    assert calls.of("updateDeviceFlags") == []


# --- VM.setMemory ----------------------------------------------------------------------------


async def memory(api: InProcessAgent, vm_id: str) -> tuple[int, int]:
    """The memory (MiB) the VM has now, and what its definition says it starts with."""
    info = await api.call("VM.getInfo", {"vm_id": vm_id})
    defined = (await api.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
    kib = etree.fromstring(defined).find("currentMemory")
    assert kib is not None and kib.get("unit") == "KiB"
    return info["memory_mib"], int(kib.text or "0") // 1024


@pytest.mark.covers("VM.setMemory")
async def test_set_memory_of_a_stopped_vm_changes_its_definition(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await api.create(start=False, max_memory_mib=256)
    calls = api.record_domain_calls(monkeypatch)
    assert await api.call("VM.setMemory", {"vm_id": vm_id, "memory_mib": 200}) == {
        "memory_mib": 200}
    assert calls.of("setMemoryFlags") == [(200 * 1024, CONFIG)]
    assert await memory(api, vm_id) == (200, 200)
    await api.call("VM.start", {"vm_id": vm_id})
    assert (await api.call("VM.getInfo", {"vm_id": vm_id}))["memory_mib"] == 200


@pytest.mark.covers("VM.setMemory")
async def test_set_memory_of_a_running_transient_vm_is_live(api: InProcessAgent) -> None:
    vm_id = await api.create(persistent=False, max_memory_mib=256)
    assert await api.call("VM.setMemory", {"vm_id": vm_id, "memory_mib": 128}) == {
        "memory_mib": 128}
    assert (await api.call("VM.getInfo", {"vm_id": vm_id}))["memory_mib"] == 128


@pytest.mark.covers("VM.setMemory")
async def test_set_memory_of_a_running_persistent_vm_asks_for_both(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await running_vm(api)
    calls = api.record_domain_calls(monkeypatch)
    # QEMU changes both at once; the test driver changes one at a time, and refuses.
    error = await api.error("VM.setMemory", {"vm_id": vm_id, "memory_mib": 128},
                            "FailedPrecondition", "not_changeable")
    assert calls.of("setMemoryFlags") == [(128 * 1024, LIVE | CONFIG)]
    assert "refused" in error.message
    assert await memory(api, vm_id) == (64, 64)


@pytest.mark.covers("VM.setMemory")
async def test_set_memory_stays_within_the_maximum(api: InProcessAgent,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await api.create(start=False, max_memory_mib=256)
    calls = api.record_domain_calls(monkeypatch)
    error = await api.error("VM.setMemory", {"vm_id": vm_id, "memory_mib": 257},
                            "FailedPrecondition", "above_maximum")
    assert "256 MiB" in error.message
    await api.error("VM.setMemory", {"vm_id": vm_id, "memory_mib": 15}, "InvalidParams")
    await api.error("VM.setMemory", {"vm_id": UNKNOWN, "memory_mib": 64}, "NotFound",
                    "not_found")
    assert calls.of("setMemoryFlags") == []
    assert await memory(api, vm_id) == (64, 64)


# --- VM.setVcpus -----------------------------------------------------------------------------


async def vcpus(api: InProcessAgent, vm_id: str) -> tuple[int, int]:
    """The vCPUs the VM has now, and how many its definition starts it with."""
    info = await api.call("VM.getInfo", {"vm_id": vm_id})
    defined = (await api.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
    vcpu = etree.fromstring(defined).find("vcpu")
    assert vcpu is not None
    return info["vcpus"], int(vcpu.get("current", vcpu.text or "0"))


@pytest.mark.covers("VM.setVcpus")
async def test_set_vcpus_of_a_running_vm_changes_it_and_its_definition(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await running_vm(api)
    calls = api.record_domain_calls(monkeypatch)
    assert await api.call("VM.setVcpus", {"vm_id": vm_id, "vcpus": 3}) == {"vcpus": 3}
    assert calls.of("setVcpusFlags") == [(3, LIVE | CONFIG)]
    assert await vcpus(api, vm_id) == (3, 3)


@pytest.mark.covers("VM.setVcpus")
async def test_set_vcpus_of_a_stopped_vm_changes_its_definition(api: InProcessAgent) -> None:
    vm_id = await api.create(start=False, max_vcpus=4)
    assert await api.call("VM.setVcpus", {"vm_id": vm_id, "vcpus": 2}) == {"vcpus": 2}
    assert (await vcpus(api, vm_id))[1] == 2
    await api.call("VM.start", {"vm_id": vm_id})
    assert (await vcpus(api, vm_id))[0] == 2


@pytest.mark.covers("VM.setVcpus")
async def test_set_vcpus_above_the_maximum_is_refused(api: InProcessAgent) -> None:
    vm_id = await running_vm(api)
    error = await api.error("VM.setVcpus", {"vm_id": vm_id, "vcpus": 5}, "FailedPrecondition",
                            "not_changeable")
    assert (error.data["object"], error.data["id"]) == ("vm", vm_id)
    assert await vcpus(api, vm_id) == (1, 1)
    for bad in (0, 257):
        await api.error("VM.setVcpus", {"vm_id": vm_id, "vcpus": bad}, "InvalidParams")
    await api.error("VM.setVcpus", {"vm_id": UNKNOWN, "vcpus": 2}, "NotFound", "not_found")


# --- VM.changeMedia --------------------------------------------------------------------------


@pytest.mark.covers("VM.changeMedia")
async def test_change_media_inserts_and_ejects_live_and_in_the_definition(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    iso = api.image("installer.iso")
    link = api.images / "installer-link.iso"
    os.symlink(iso, link)
    vm_id = await running_vm(api, cdroms=[{"bus": "sata"}])
    calls = api.record_domain_calls(monkeypatch)
    # Media changes (the tray, the guest seeing it, the definition): QEMU only.
    await unimplemented(api, "VM.changeMedia", {"vm_id": vm_id, "drive": "sda",
                                                "media": {"path": str(link)}})
    drive, flags = sent(calls, "updateDeviceFlags")
    assert flags == LIVE | CONFIG, "a persistent VM's definition gets the media too"
    assert drive.get("device") == "cdrom"
    assert drive.find("target").attrib == {"dev": "sda", "bus": "sata"}
    assert drive.find("source").get("file") == iso, "the path as checked, not the link"
    assert drive.find("readonly") is not None
    calls = api.record_domain_calls(monkeypatch)
    await unimplemented(api, "VM.changeMedia", {"vm_id": vm_id, "drive": "sda",
                                                "media": None, "force": True})
    drive, flags = sent(calls, "updateDeviceFlags")
    assert drive.find("source") is None, "ejected: no media"
    assert flags == LIVE | CONFIG | vc.DOMAIN_DEVICE_MODIFY_FORCE


@pytest.mark.covers("VM.changeMedia")
async def test_change_media_of_a_stopped_vm_changes_its_definition(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    iso = api.image("installer.iso")
    vm_id = await api.create("off", start=False, cdroms=[{"bus": "ide"}])
    calls = api.record_domain_calls(monkeypatch)
    await unimplemented(api, "VM.changeMedia", {"vm_id": vm_id, "drive": "hda",
                                                "media": {"path": iso}})
    drive, flags = sent(calls, "updateDeviceFlags")
    assert flags == CONFIG
    assert drive.find("target").attrib == {"dev": "hda", "bus": "ide"}
    assert drive.find("source").get("file") == iso


@pytest.mark.covers("VM.changeMedia")
@pytest.mark.parametrize(("drive", "media", "refusal"), [
    ("sda", {"path": "/etc/shadow"}, ("PermissionDenied", "path_not_allowed", "media.path")),
    ("sda", {"path": "relative.iso"}, ("InvalidArgument", "invalid_spec", "media.path")),
    ("sda", {"path": "{images}/missing.iso"}, ("NotFound", "no_such_file", None)),
    ("sda", {}, ("InvalidArgument", "invalid_media", "media")),
    ("sda", {"path": "{images}/cd.iso", "volume": {"sd_id": UNKNOWN, "image_id": UNKNOWN,
                                                   "volume_id": UNKNOWN}},
     ("InvalidArgument", "invalid_spec", "media")),
    ("vda", {"path": "{images}/cd.iso"}, ("FailedPrecondition", "not_cdrom", None)),
    ("sdq", {"path": "{images}/cd.iso"}, ("NotFound", "no_such_device", None)),
    ("sda", {"volume": {"sd_id": UNKNOWN, "image_id": UNKNOWN, "volume_id": UNKNOWN}},
     ("Unavailable", "no_volumes", None)),
])
async def test_a_refused_media_change_does_not_reach_libvirt(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch, drive: str,
        media: dict[str, object], refusal: tuple[str, str, str | None]) -> None:
    name, reason, field = refusal
    api.image("cd.iso")
    vm_id = await running_vm(api, cdroms=[{}])
    calls = api.record_domain_calls(monkeypatch)
    given = {k: v.format(images=api.images) if isinstance(v, str) else v
             for k, v in media.items()}
    error = await api.error("VM.changeMedia", {"vm_id": vm_id, "drive": drive,
                                               "media": given}, name, reason)
    if field is not None:
        assert error.data["field"] == field, error.error
    assert calls.of("updateDeviceFlags") == []
