"""The guest agent on the test driver, which has none: the channel in the spec and the
definition, the ``guest`` section of VM.getInfo, and VM.freeze / VM.thaw refused as they
must be. What a real guest agent says (and freezing it) is in
tests/integration/test_guest_agent.py; the parsing of its answers is tested here."""

from __future__ import annotations

import pytest
from lxml import etree

from tests.unit.vm.harness import InProcessAgent
from virtnode.vm.guestagent import parse_guest_info, parse_interfaces
from virtnode.vm.spec import GUEST_AGENT_CHANNEL

UNKNOWN = "00000000-0000-4000-8000-00000000abcd"


def channels(xml: str) -> list[str | None]:
    return [t.get("name") for t in etree.fromstring(xml).iterfind(
        "devices/channel[@type='unix']/target[@type='virtio']")]


@pytest.mark.covers("VM.getInfo")
async def test_a_vm_gets_the_guest_agent_channel_unless_its_spec_says_no(
        api: InProcessAgent) -> None:
    with_agent = await api.create("with-agent")
    without = await api.create("without-agent", guest_agent=False)
    xml = (await api.call("VM.getXML", {"vm_id": with_agent}))["xml"]
    assert channels(xml) == [GUEST_AGENT_CHANNEL]
    assert channels((await api.call("VM.getXML", {"vm_id": without}))["xml"]) == []

    # The test driver runs no guest: the channel is there and nobody answers on it.
    guest = (await api.call("VM.getInfo", {"vm_id": with_agent}))["guest"]
    assert guest == {"agent": "disconnected", "fetched_at": None, "age_seconds": None,
                     "frozen": False}
    guest = (await api.call("VM.getInfo", {"vm_id": without}))["guest"]
    assert guest["agent"] == "none"
    stopped = await api.create("stopped", start=False)
    assert (await api.call("VM.getInfo", {"vm_id": stopped}))["guest"]["agent"] == "none"


@pytest.mark.covers("VM.freeze", "VM.thaw")
async def test_freeze_and_thaw_need_a_running_vm_with_a_connected_guest_agent(
        api: InProcessAgent) -> None:
    vm_id = await api.create("frosty")
    bare = await api.create("bare", guest_agent=False)
    error = await api.error("VM.freeze", {"vm_id": vm_id}, "FailedPrecondition",
                            "guest_agent_unavailable")
    assert "not connected" in error.message and error.data["id"] == vm_id
    error = await api.error("VM.freeze", {"vm_id": bare}, "FailedPrecondition",
                            "guest_agent_unavailable")
    assert "no guest agent channel" in error.message
    await api.error("VM.thaw", {"vm_id": vm_id}, "FailedPrecondition",
                    "guest_agent_unavailable")
    for timeout in (0, 601):
        await api.error("VM.freeze", {"vm_id": vm_id, "timeout": timeout}, "InvalidArgument",
                        "invalid_timeout")
    await api.error("VM.freeze", {"vm_id": vm_id, "mountpoints": [""]}, "InvalidParams")
    await api.call("VM.pause", {"vm_id": vm_id})
    await api.error("VM.freeze", {"vm_id": vm_id}, "FailedPrecondition", "vm_not_running")
    await api.error("VM.thaw", {"vm_id": vm_id}, "FailedPrecondition", "vm_not_running")
    await api.error("VM.freeze", {"vm_id": UNKNOWN}, "NotFound", "not_found")
    await api.error("VM.thaw", {"vm_id": UNKNOWN}, "NotFound", "not_found")
    assert (await api.call("VM.getInfo", {"vm_id": vm_id}))["guest"]["frozen"] is False


def test_what_the_guest_agent_reports_becomes_the_guest_section() -> None:
    # Typed parameters as libvirt 9.0 gives them for a Debian guest.
    params = {
        "user.count": 1, "user.0.name": "root", "user.0.login-time": 1765000000123,
        "os.id": "debian", "os.name": "Debian GNU/Linux", "os.version-id": "12",
        "os.kernel-release": "6.1.0-57-cloud-amd64", "os.machine": "x86_64",
        "timezone.name": "UTC", "timezone.offset": 0,
        "hostname": "guest1",
        "fs.count": 2,
        "fs.0.name": "vda", "fs.0.mountpoint": "/data", "fs.0.fstype": "ext2",
        "fs.0.total-bytes": 60000000, "fs.0.used-bytes": 1000, "fs.0.disk.count": 1,
        "fs.0.disk.0.alias": "vda", "fs.0.disk.0.serial": "x",
        "fs.1.name": "sr0", "fs.1.mountpoint": "/media", "fs.1.fstype": "iso9660",
        "fs.9.name": "beyond the count",
    }
    assert parse_guest_info(params) == {
        "os": {"id": "debian", "name": "Debian GNU/Linux", "version_id": "12",
               "kernel_release": "6.1.0-57-cloud-amd64", "machine": "x86_64"},
        "hostname": "guest1",
        "timezone": {"name": "UTC", "offset_seconds": 0},
        "users": [{"name": "root", "domain": None, "login_time": 1765000000.123}],
        "filesystems": [
            {"mountpoint": "/data", "name": "vda", "type": "ext2", "total_bytes": 60000000,
             "used_bytes": 1000, "disks": ["vda"]},
            {"mountpoint": "/media", "name": "sr0", "type": "iso9660", "total_bytes": None,
             "used_bytes": None, "disks": []},
        ],
    }
    assert parse_guest_info({}) == {}
    assert parse_guest_info({"user.count": "many", "fs.count": -1}) == {
        "users": [], "filesystems": []}


def test_interfaces_are_listed_by_name_with_their_addresses() -> None:
    answer = {
        "lo": {"hwaddr": "00:00:00:00:00:00", "addrs": [
            {"type": 0, "addr": "127.0.0.1", "prefix": 8},
            {"type": 1, "addr": "::1", "prefix": 128}]},
        "eth0": {"hwaddr": "52:54:00:12:34:56", "addrs": None},
    }
    assert parse_interfaces(answer) == [
        {"name": "eth0", "hwaddr": "52:54:00:12:34:56", "addresses": []},
        {"name": "lo", "hwaddr": "00:00:00:00:00:00", "addresses": [
            {"type": "ipv4", "address": "127.0.0.1", "prefix": 8},
            {"type": "ipv6", "address": "::1", "prefix": 128}]},
    ]
