"""The VM lifecycle methods through the dispatcher, on libvirt's test driver in this process.

What only QEMU shows is in tests/integration/test_vm_lifecycle.py: a guest that powers off
on an ACPI request or through its guest agent (the test driver refuses both requests, so
``VM.shutdown`` ends here only by its fallback), a reboot the guest carries out, a start
that fails and is rolled back, UEFI NVRAM.
"""

from __future__ import annotations

import asyncio
import uuid

import libvirt
import pytest
from lxml import etree

from tests.unit.vm.conftest import AgentFactory
from tests.unit.vm.harness import DEFAULT_VM, DEFAULT_VM_ID, READER, InProcessAgent
from virtnode.hypervisor import constants as vc
from virtnode.vm.spec import NAMESPACE

UNKNOWN = "00000000-0000-4000-8000-00000000abcd"
NS = {"v": NAMESPACE}


def metadata(xml: str) -> dict[str, str]:
    vm = etree.fromstring(xml).find("metadata/v:vm", NS)
    assert vm is not None, xml
    return dict(vm.attrib)


# --- VM.list ---------------------------------------------------------------------------------


@pytest.mark.covers("VM.list")
async def test_list_shows_every_vm_sorted_by_name_and_filters_by_state(
        api: InProcessAgent) -> None:
    b = await api.create("b-running")
    a = await api.create("a-defined", start=False)
    listed = (await api.call("VM.list"))["vms"]
    assert listed == [
        {"vm_id": a, "name": "a-defined", "state": "defined"},
        {"vm_id": b, "name": "b-running", "state": "running"},
        {"vm_id": DEFAULT_VM_ID, "name": DEFAULT_VM, "state": "running"},
    ]
    running = (await api.call("VM.list", {"state": "running"}))["vms"]
    assert [vm["name"] for vm in running] == ["b-running", DEFAULT_VM]
    assert (await api.call("VM.list", {"state": "crashed"}))["vms"] == []
    await api.error("VM.list", {"state": "asleep"}, "InvalidParams")


@pytest.mark.covers("VM.list")
async def test_a_reader_may_list_but_not_change(api: InProcessAgent) -> None:
    assert (await api.call("VM.list", caller=READER))["vms"]
    error = await api.error("VM.pause", {"vm_id": DEFAULT_VM_ID}, "PermissionDenied", "role",
                            caller=READER)
    assert error.data["method"] == "VM.pause"
    assert await api.state(DEFAULT_VM_ID) == "running"


# --- VM.create -------------------------------------------------------------------------------


@pytest.mark.covers("VM.create", "VM.getInfo")
async def test_create_defines_and_starts_a_vm_from_a_spec(api: InProcessAgent) -> None:
    result = await api.call("VM.create", {"spec": {
        "name": "web1", "domain_type": "test", "memory_mib": 64, "max_memory_mib": 128,
        "vcpus": 1, "max_vcpus": 2, "labels": {"env": "prod"}}})
    vm_id = result["vm_id"]
    assert result == {"vm_id": vm_id, "name": "web1", "state": "running"}
    # Defaults: persistent and started.
    assert await api.events.lifecycle(vm_id, 2) == [
        ("defined", "added", "defined"), ("started", "booted", "running")]
    info = await api.call("VM.getInfo", {"vm_id": vm_id})
    assert info["persistent"] is True
    assert (info["owner"], info["labels"]) == ("virtnode", {"env": "prod"})
    assert (info["memory_mib"], info["max_memory_mib"], info["vcpus"]) == (64, 128, 1)


@pytest.mark.covers("VM.create", "VM.list")
async def test_create_without_start_only_defines(api: InProcessAgent) -> None:
    vm_id = await api.create("cold", start=False)
    assert await api.state(vm_id) == "defined"
    assert await api.events.lifecycle(vm_id, 1) == [("defined", "added", "defined")]
    assert [vm["vm_id"] for vm in (await api.call("VM.list", {"state": "defined"}))["vms"]] \
        == [vm_id]


@pytest.mark.covers("VM.create", "VM.destroy", "VM.getInfo")
async def test_a_transient_vm_runs_and_is_gone_once_destroyed(api: InProcessAgent) -> None:
    vm_id = await api.create("brief", persistent=False)
    info = await api.call("VM.getInfo", {"vm_id": vm_id})
    assert (info["state"], info["persistent"]) == ("running", False)
    assert await api.call("VM.destroy", {"vm_id": vm_id}) == {}
    await api.error("VM.getInfo", {"vm_id": vm_id}, "NotFound", "not_found")


@pytest.mark.covers("VM.create")
async def test_create_from_domain_xml_adds_the_agents_metadata(api: InProcessAgent) -> None:
    xml = ("<domain type='test'><name>fromxml</name><memory unit='MiB'>64</memory>"
           "<os><type arch='x86_64'>hvm</type></os></domain>")
    result = await api.call("VM.create", {"xml": xml})
    assert (result["name"], result["state"]) == ("fromxml", "running")
    uuid.UUID(result["vm_id"])  # one was given to it
    live = (await api.call("VM.getXML", {"vm_id": result["vm_id"]}))["xml"]
    assert metadata(live)["owner"] == "virtnode"


@pytest.mark.covers("VM.create")
async def test_a_q35_vm_gets_the_configured_spare_pcie_ports(
        start_agent: AgentFactory) -> None:
    async def root_ports(spare: int) -> int:
        api = await start_agent({"vm": {"hotplug_ports": spare}})
        try:
            vm_id = await api.create("q35", start=False, machine="q35",
                                     nics=[{"libvirt_network": "default"}])
            xml = (await api.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
        finally:
            await api.stop()  # one agent at a time: they would share the test driver's host
        return len(etree.fromstring(xml).findall(
            "devices/controller[@model='pcie-root-port']"))

    assert await root_ports(5) - await root_ports(0) == 5


@pytest.mark.covers("VM.create", "VM.list")
async def test_a_taken_name_or_uuid_already_exists(api: InProcessAgent) -> None:
    vm_id = await api.create("dup")
    error = await api.error("VM.create", {"spec": {"name": "dup", "domain_type": "test"}},
                            "AlreadyExists", "name_taken")
    assert error.data["id"] == "dup"
    await api.error("VM.create", {"spec": {"name": DEFAULT_VM, "domain_type": "test"}},
                    "AlreadyExists", "name_taken")
    await api.error("VM.create", {"spec": {"name": "other", "uuid": vm_id,
                                           "domain_type": "test"}},
                    "AlreadyExists", "uuid_taken")
    names = [vm["name"] for vm in (await api.call("VM.list"))["vms"]]
    assert names == ["dup", DEFAULT_VM]


@pytest.mark.covers("VM.create")
async def test_two_creates_of_one_name_make_one_vm(api: InProcessAgent) -> None:
    params = {"spec": {"name": "twin", "domain_type": "test", "memory_mib": 64}}
    answers = await asyncio.gather(api.answer("VM.create", params),
                                   api.answer("VM.create", params))
    assert sorted("result" in answer for answer in answers) == [False, True]
    (refused,) = [answer["error"] for answer in answers if "error" in answer]
    assert (refused["data"]["name"], refused["data"]["reason"]) == ("AlreadyExists",
                                                                    "name_taken")


@pytest.mark.covers("VM.create")
@pytest.mark.parametrize(("params", "name", "reason", "field"), [
    ({}, "InvalidArgument", "invalid_spec", "spec"),
    ({"spec": {"name": "x"}, "xml": "<domain/>"}, "InvalidArgument", "invalid_spec", "spec"),
    ({"spec": {"name": "x"}, "persistent": False, "start": False},
     "InvalidArgument", "invalid_spec", "start"),
    ({"spec": {"name": "-bad"}}, "InvalidArgument", "invalid_spec", "spec.name"),
    ({"spec": {"name": "x", "memory_mib": 8}}, "InvalidArgument", "invalid_spec",
     "spec.memory_mib"),
    ({"spec": {"name": "x", "disks": [{"path": "/etc/shadow"}]}}, "PermissionDenied",
     "path_not_allowed", "spec.disks.0.path"),
    ({"xml": "<domain type='test'><name>x</name><memory>65536</memory>"
             "<os><type>hvm</type><kernel>/boot/vmlinuz</kernel></os></domain>"},
     "PermissionDenied", "path_not_allowed", "xml.os.kernel"),
    ({"xml": "<domain type='lxc'><name>x</name></domain>"}, "PermissionDenied",
     "domain_type_refused", "xml"),
    ({"xml": "<network><name>x</name></network>"}, "InvalidArgument", "bad_xml", "xml"),
])
async def test_a_refused_create_defines_nothing(api: InProcessAgent, params: dict[str, object],
                                                name: str, reason: str, field: str) -> None:
    error = await api.error("VM.create", params, name, reason)
    assert error.data.get("field") == field, error.error
    assert [vm["name"] for vm in (await api.call("VM.list"))["vms"]] == [DEFAULT_VM]


@pytest.mark.covers("VM.create")
@pytest.mark.parametrize("params", [
    {"spec": {}},
    {"spec": {"name": "x", "colour": "blue"}},
    {"spec": {"name": "x"}, "start": "yes"},
    {"spec": {"name": "x", "memory_mib": "64"}},
])
async def test_params_that_do_not_match_the_schema_are_invalid(
        api: InProcessAgent, params: dict[str, object]) -> None:
    await api.error("VM.create", params, "InvalidParams")


@pytest.mark.covers("VM.create")
async def test_disk_images_must_exist_and_be_used_alone(api: InProcessAgent) -> None:
    missing = str(api.images / "missing.img")
    error = await api.error("VM.create", {"spec": {"name": "x", "disks": [{"path": missing}]}},
                            "NotFound", "no_such_file")
    assert error.data["id"] == missing
    # A qcow2 header naming a backing file at offset 8.
    layered = api.image("layer.qcow2", b"QFI\xfb" + (3).to_bytes(4, "big")
                        + (512).to_bytes(8, "big") + b"\0" * 496)
    error = await api.error("VM.create", {"spec": {"name": "x", "disks": [
        {"path": layered, "format": "qcow2"}]}}, "InvalidArgument", "has_backing_file")
    assert error.data["field"] == "spec.disks.0.path"
    disk = api.image()
    vm_id = await api.create("withdisk", disks=[{"path": disk}])
    (summary,) = (await api.call("VM.getInfo", {"vm_id": vm_id}))["devices"]["disks"]
    assert (summary["target"], summary["path"], summary["format"]) == ("vda", disk, "raw")


# --- VM.start --------------------------------------------------------------------------------


@pytest.mark.covers("VM.start", "VM.getInfo")
async def test_start_runs_a_defined_vm_and_records_when(api: InProcessAgent) -> None:
    vm_id = await api.create("later", start=False)
    before = await api.call("VM.getInfo", {"vm_id": vm_id})
    assert before["uptime_seconds"] is None
    assert await api.call("VM.start", {"vm_id": vm_id}) == {"state": "running"}
    assert await api.events.lifecycle(vm_id, 2) == [
        ("defined", "added", "defined"), ("started", "booted", "running")]
    info = await api.call("VM.getInfo", {"vm_id": vm_id})
    assert (info["state"], info["reason"]) == ("running", "booted")
    assert info["uptime_seconds"] is not None and info["uptime_seconds"] >= 0


@pytest.mark.covers("VM.start")
async def test_start_refuses_a_running_or_unknown_vm(api: InProcessAgent) -> None:
    vm_id = await api.create()
    error = await api.error("VM.start", {"vm_id": vm_id}, "FailedPrecondition", "vm_running")
    assert (error.data["object"], error.data["id"]) == ("vm", vm_id)
    error = await api.error("VM.start", {"vm_id": UNKNOWN}, "NotFound", "not_found")
    assert (error.data["object"], error.data["id"]) == ("vm", UNKNOWN)
    await api.error("VM.start", {"vm_id": "not-a-uuid"}, "InvalidParams")
    await api.error("VM.start", {}, "InvalidParams")


# --- VM.destroy ------------------------------------------------------------------------------


@pytest.mark.covers("VM.destroy")
async def test_destroy_stops_a_vm_at_once_and_keeps_its_definition(
        api: InProcessAgent) -> None:
    vm_id = await api.create()
    assert await api.call("VM.destroy", {"vm_id": vm_id}) == {}
    assert await api.state(vm_id) == "shutoff"
    assert (await api.events.lifecycle(vm_id, 3))[2] == ("stopped", "destroyed", "shutoff")
    await api.error("VM.destroy", {"vm_id": vm_id}, "FailedPrecondition", "vm_not_running")
    await api.error("VM.destroy", {"vm_id": UNKNOWN}, "NotFound", "not_found")


# --- VM.pause, VM.resume ---------------------------------------------------------------------


@pytest.mark.covers("VM.pause", "VM.resume")
async def test_pause_and_resume(api: InProcessAgent) -> None:
    vm_id = await api.create()
    assert await api.call("VM.pause", {"vm_id": vm_id}) == {"state": "paused"}
    info = await api.call("VM.getInfo", {"vm_id": vm_id})
    assert (info["state"], info["reason"]) == ("paused", "user")
    assert await api.call("VM.resume", {"vm_id": vm_id}) == {"state": "running"}
    assert (await api.events.lifecycle(vm_id, 4))[2:] == [
        ("suspended", "paused", "paused"), ("resumed", "unpaused", "running")]


@pytest.mark.covers("VM.pause", "VM.resume")
async def test_pause_and_resume_need_the_state_they_change(api: InProcessAgent) -> None:
    vm_id = await api.create(start=False)
    error = await api.error("VM.pause", {"vm_id": vm_id}, "FailedPrecondition",
                            "vm_not_running")
    assert "defined" in error.message
    await api.error("VM.resume", {"vm_id": vm_id}, "FailedPrecondition", "vm_not_paused")
    await api.call("VM.start", {"vm_id": vm_id})
    await api.error("VM.resume", {"vm_id": vm_id}, "FailedPrecondition", "vm_not_paused")
    await api.call("VM.pause", {"vm_id": vm_id})
    await api.error("VM.pause", {"vm_id": vm_id}, "FailedPrecondition", "vm_not_running")
    assert await api.state(vm_id) == "paused"
    await api.error("VM.pause", {"vm_id": UNKNOWN}, "NotFound", "not_found")
    await api.error("VM.resume", {"vm_id": UNKNOWN}, "NotFound", "not_found")


# --- VM.reset, VM.reboot ---------------------------------------------------------------------


@pytest.mark.covers("VM.reset")
async def test_reset_needs_a_running_vm(api: InProcessAgent, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    vm_id = await api.create()
    calls = api.record_domain_calls(monkeypatch)
    assert await api.call("VM.reset", {"vm_id": vm_id}) == {"state": "running"}
    await api.call("VM.pause", {"vm_id": vm_id})
    await api.error("VM.reset", {"vm_id": vm_id}, "FailedPrecondition", "vm_not_running")
    await api.call("VM.destroy", {"vm_id": vm_id})
    await api.error("VM.reset", {"vm_id": vm_id}, "FailedPrecondition", "vm_not_running")
    await api.error("VM.reset", {"vm_id": UNKNOWN}, "NotFound", "not_found")
    assert calls.of("reset") == [(0,)], "only the running VM is reset"


@pytest.mark.covers("VM.reboot")
async def test_reboot_asks_the_guest_in_the_way_requested(
        api: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    # The test driver takes any request; that the guest restarts only QEMU shows.
    vm_id = await api.create()
    calls = api.record_domain_calls(monkeypatch)
    for method in (None, "default", "acpi", "agent"):
        params = {"vm_id": vm_id} if method is None else {"vm_id": vm_id, "method": method}
        assert await api.call("VM.reboot", params) == {"state": "running"}
    assert calls.of("reboot") == [(0,), (0,), (libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN,),
                                  (libvirt.VIR_DOMAIN_REBOOT_GUEST_AGENT,)]
    await api.error("VM.reboot", {"vm_id": vm_id, "method": "kick"}, "InvalidParams")
    await api.call("VM.destroy", {"vm_id": vm_id})
    await api.error("VM.reboot", {"vm_id": vm_id}, "FailedPrecondition", "vm_not_running")
    await api.error("VM.reboot", {"vm_id": UNKNOWN}, "NotFound", "not_found")
    assert len(calls.of("reboot")) == 4


# --- VM.shutdown -----------------------------------------------------------------------------


@pytest.mark.covers("VM.shutdown")
async def test_shutdown_falls_back_to_destroy(api: InProcessAgent,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = await api.create()
    calls = api.record_domain_calls(monkeypatch)
    result = await api.call("VM.shutdown", {"vm_id": vm_id, "fallback": "destroy"})
    # No guest agent is connected, so libvirt is not even asked through it; the test
    # driver refuses the ACPI request. Both are skipped at once.
    assert (result["stopped_by"], result["tried"]) == ("destroy", ["destroy"])
    assert calls.of("shutdownFlags") == [(vc.DOMAIN_SHUTDOWN_ACPI_POWER_BTN,)]
    assert await api.state(vm_id) == "shutoff"
    assert (await api.events.lifecycle(vm_id, 3))[2] == ("stopped", "destroyed", "shutoff")
    error = await api.error("VM.shutdown", {"vm_id": vm_id}, "FailedPrecondition",
                            "vm_not_running")
    assert (error.data["object"], error.data["id"]) == ("vm", vm_id)
    error = await api.error("VM.shutdown", {"vm_id": UNKNOWN}, "NotFound", "not_found")
    assert (error.data["object"], error.data["id"]) == ("vm", UNKNOWN)


@pytest.mark.covers("VM.shutdown")
async def test_shutdown_without_fallback_leaves_the_vm_running(api: InProcessAgent) -> None:
    vm_id = await api.create()
    # The test driver takes no ACPI request: nothing is tried, and nothing stops the VM.
    error = await api.error("VM.shutdown", {"vm_id": vm_id, "methods": ["acpi"]},
                            "DeadlineExceeded", "shutdown_timeout")
    assert error.data["tried"] == []
    assert await api.state(vm_id) == "running"


@pytest.mark.covers("VM.shutdown")
async def test_a_paused_vm_goes_straight_to_the_fallback(api: InProcessAgent) -> None:
    vm_id = await api.create()
    await api.call("VM.pause", {"vm_id": vm_id})
    await api.error("VM.shutdown", {"vm_id": vm_id}, "FailedPrecondition", "vm_paused")
    assert await api.state(vm_id) == "paused"
    result = await api.call("VM.shutdown", {"vm_id": vm_id, "fallback": "destroy"})
    assert (result["stopped_by"], result["tried"]) == ("destroy", ["destroy"])
    assert await api.state(vm_id) == "shutoff"


@pytest.mark.covers("VM.shutdown")
@pytest.mark.parametrize(("params", "name", "reason"), [
    ({"methods": []}, "InvalidArgument", "invalid_spec"),
    ({"request_key": "k1"}, "InvalidArgument", "request_key_needs_async"),
    ({"methods": ["magic"]}, "InvalidParams", None),
    ({"timeout": 0}, "InvalidParams", None),
    ({"fallback": "pray"}, "InvalidParams", None),
])
async def test_shutdown_params_are_checked_before_anything_happens(
        api: InProcessAgent, params: dict[str, object], name: str, reason: str | None) -> None:
    await api.error("VM.shutdown", {"vm_id": DEFAULT_VM_ID, **params}, name, reason)
    assert await api.state(DEFAULT_VM_ID) == "running"


@pytest.mark.covers("VM.shutdown")
async def test_an_async_shutdown_runs_as_a_job(api: InProcessAgent) -> None:
    vm_id = await api.create()
    started = await api.call("VM.shutdown", {"vm_id": vm_id, "async": True,
                                             "fallback": "destroy", "request_key": "off-1"})
    job_id = started["job_id"]
    assert (started["job"]["kind"], started["job"]["target"]) == ("VM.shutdown", vm_id)
    job = (await api.call("Job.wait", {"job_id": job_id, "timeout": 5}))["job"]
    assert job["state"] == "succeeded", job
    assert job["result"]["stopped_by"] == "destroy"
    assert await api.state(vm_id) == "shutoff"
    await api.events.first("job.state", lambda d: d["job_id"] == job_id
                           and d["state"] == "succeeded", "the job's succeeded event")
    again = await api.call("VM.shutdown", {"vm_id": vm_id, "async": True,
                                           "fallback": "destroy", "request_key": "off-1"})
    assert again["job_id"] == job_id, "the same request key gives back the same job"


@pytest.mark.covers("VM.shutdown")
async def test_an_async_shutdown_of_a_stopped_vm_makes_no_job(api: InProcessAgent) -> None:
    vm_id = await api.create(start=False)
    await api.error("VM.shutdown", {"vm_id": vm_id, "async": True}, "FailedPrecondition",
                    "vm_not_running")
    await api.error("VM.shutdown", {"vm_id": UNKNOWN, "async": True}, "NotFound", "not_found")
    assert (await api.call("Job.list", {}))["jobs"] == []


# --- VM.undefine -----------------------------------------------------------------------------


@pytest.mark.covers("VM.undefine")
async def test_undefine_removes_a_stopped_vm(api: InProcessAgent) -> None:
    vm_id = await api.create(start=False)
    assert await api.call("VM.undefine", {"vm_id": vm_id}) == {}
    await api.error("VM.getInfo", {"vm_id": vm_id}, "NotFound", "not_found")
    assert (await api.events.lifecycle(vm_id, 2))[1] == ("undefined", "removed", "removed")
    await api.error("VM.undefine", {"vm_id": vm_id}, "NotFound", "not_found")


@pytest.mark.covers("VM.undefine")
async def test_undefine_refuses_a_running_vm_unless_forced(api: InProcessAgent) -> None:
    vm_id = await api.create()
    await api.error("VM.undefine", {"vm_id": vm_id}, "FailedPrecondition", "vm_running")
    assert await api.state(vm_id) == "running"
    assert await api.call("VM.undefine", {"vm_id": vm_id, "force": True}) == {}
    assert (await api.events.lifecycle(vm_id, 4))[2:] == [
        ("stopped", "destroyed", "shutoff"), ("undefined", "removed", "removed")]
    assert [vm["name"] for vm in (await api.call("VM.list"))["vms"]] == [DEFAULT_VM]


@pytest.mark.covers("VM.undefine")
async def test_forced_undefine_of_a_transient_vm(api: InProcessAgent) -> None:
    vm_id = await api.create(persistent=False)
    await api.error("VM.undefine", {"vm_id": vm_id}, "FailedPrecondition", "vm_running")
    assert await api.call("VM.undefine", {"vm_id": vm_id, "force": True}) == {}
    await api.error("VM.getInfo", {"vm_id": vm_id}, "NotFound")


# --- VM.getInfo, VM.getXML -------------------------------------------------------------------


@pytest.mark.covers("VM.getInfo")
async def test_info_of_a_vm_virtnode_did_not_create(api: InProcessAgent) -> None:
    info = await api.call("VM.getInfo", {"vm_id": DEFAULT_VM_ID})
    assert (info["name"], info["owner"], info["labels"]) == (DEFAULT_VM, "external", {})
    assert info["uptime_seconds"] is None, "no start time recorded by virtnode"
    assert info["devices"]["disks"][0]["path"] == "/guest/diskimage1"
    assert info["devices"]["nics"][0]["mac"] == "aa:bb:cc:dd:ee:ff"
    assert info["operation"] is None


@pytest.mark.covers("VM.getInfo")
async def test_info_names_the_call_holding_the_vm(api: InProcessAgent) -> None:
    vm_id = await api.create()
    async with api.vms.locks.hold(vm_id, "VM.hotplugDisk"):
        info = await api.call("VM.getInfo", {"vm_id": vm_id})
        assert info["operation"]["method"] == "VM.hotplugDisk"
        pausing = asyncio.create_task(api.call("VM.pause", {"vm_id": vm_id}))
        # A round trip through the pool: the pause has meanwhile come to the VM's lock.
        assert await api.state(vm_id) == "running"
        assert not pausing.done()
    assert await pausing == {"state": "paused"}, "the pause ran once the VM was free"
    assert (await api.call("VM.getInfo", {"vm_id": vm_id}))["operation"] is None
    await api.error("VM.getInfo", {"vm_id": UNKNOWN}, "NotFound", "not_found")


@pytest.mark.covers("VM.pause")
async def test_a_call_that_waits_too_long_for_the_vm_is_aborted(
        start_agent: AgentFactory) -> None:
    api = await start_agent({"vm": {"lock_wait": 0.05}})
    vm_id = await api.create()
    async with api.vms.locks.hold(vm_id, "VM.shutdown"):
        error = await api.error("VM.pause", {"vm_id": vm_id}, "Aborted", "vm_busy")
    assert error.data["operation"]["method"] == "VM.shutdown"
    assert await api.state(vm_id) == "running"


@pytest.mark.covers("VM.getXML")
async def test_xml_live_or_as_defined_and_without_secrets(api: InProcessAgent) -> None:
    vm_id = await api.create(graphics="vnc", labels={"tier": "db"})
    live = (await api.call("VM.getXML", {"vm_id": vm_id}))["xml"]
    defined = (await api.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
    assert etree.fromstring(live).get("id") is not None
    assert etree.fromstring(defined).get("id") is None
    assert "started" in metadata(live), "the start time is kept in the live XML"
    assert "started" not in metadata(defined)
    for xml in (live, defined):
        graphics = etree.fromstring(xml).find("devices/graphics")
        assert graphics is not None and graphics.get("type") == "vnc"
        assert graphics.get("passwd") is None, "the console password must not leak"
    await api.error("VM.getXML", {"vm_id": UNKNOWN}, "NotFound", "not_found")


# --- before the first view of the VMs --------------------------------------------------------


@pytest.mark.covers("VM.pause", "VM.list")
async def test_without_a_hypervisor_calls_are_unavailable(start_agent: AgentFactory) -> None:
    api = await start_agent(connect=False)
    await api.error("VM.pause", {"vm_id": DEFAULT_VM_ID}, "Unavailable", "recovering")
    await api.error("VM.list", {}, "Unavailable", "hypervisor_disconnected")
