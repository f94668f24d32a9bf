"""VM lifecycle through the agent on qemu:///system with firmware-only KVM guests."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.agentproc import IMAGE_ROOT, AgentProcess
from tests.conftest import ClientFactory
from tests.integration.conftest import expect_error, next_event, virt, vm_name
from virtnode.client import Client, RemoteError

pytestmark = [pytest.mark.integration, pytest.mark.qemu,
              pytest.mark.usefixtures("libvirtd", "cleanup_vms")]


def firmware_spec(name: str, **extra: Any) -> dict[str, Any]:
    """A guest with no disk and no kernel: SeaBIOS runs and waits; enough for lifecycle."""
    return {"name": name, "memory_mib": 64, "domain_type": "kvm", "machine": "pc", **extra}


async def libvirt_state(name: str) -> int | None:
    import libvirt

    def state(conn: Any) -> int | None:
        try:
            return int(conn.lookupByName(name).state()[0])
        except libvirt.libvirtError:
            return None

    return await virt(state)


async def create(client: Client, name: str, **params: Any) -> str:
    spec = params.pop("spec", None) or firmware_spec(name)
    result = await client.call("VM.create", {"spec": spec, **params})
    assert result["name"] == name
    return str(result["vm_id"])


async def wait_for_operation(client: Client, vm_id: str) -> dict[str, Any]:
    """Poll VM.getInfo until a mutating call holds the VM; returns that operation."""
    async with asyncio.timeout(5):
        while True:
            operation = (await client.call("VM.getInfo", {"vm_id": vm_id}))["operation"]
            if operation is not None:
                return dict(operation)
            await asyncio.sleep(0.05)


async def test_persistent_vm_through_its_whole_life(qemu_agent: AgentProcess,
                                                    checked_client: ClientFactory) -> None:
    import libvirt

    client = await checked_client(qemu_agent.unix_url)
    name = vm_name()
    vm_id = await create(client, name, spec=firmware_spec(name, labels={"team": "blue"}))
    assert await libvirt_state(name) == libvirt.VIR_DOMAIN_RUNNING

    info = await client.call("VM.getInfo", {"vm_id": vm_id})
    assert info["state"] == "running" and info["reason"] == "booted"
    assert info["persistent"] is True and info["owner"] == "virtnode"
    assert info["labels"] == {"team": "blue"} and info["memory_mib"] == 64
    assert info["uptime_seconds"] is not None and info["uptime_seconds"] >= 0
    listed = {vm["vm_id"]: vm for vm in (await client.call("VM.list"))["vms"]}
    assert listed[vm_id] == {"vm_id": vm_id, "name": name, "state": "running"}

    assert (await client.call("VM.pause", {"vm_id": vm_id}))["state"] == "paused"
    assert await libvirt_state(name) == libvirt.VIR_DOMAIN_PAUSED
    await expect_error(client, "VM.pause", {"vm_id": vm_id}, "FailedPrecondition",
                       "vm_not_running")
    assert (await client.call("VM.resume", {"vm_id": vm_id}))["state"] == "running"
    assert (await client.call("VM.reset", {"vm_id": vm_id}))["state"] == "running"

    await client.call("VM.destroy", {"vm_id": vm_id})
    assert await libvirt_state(name) == libvirt.VIR_DOMAIN_SHUTOFF
    assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["uptime_seconds"] is None
    await expect_error(client, "VM.destroy", {"vm_id": vm_id}, "FailedPrecondition",
                       "vm_not_running")
    assert (await client.call("VM.start", {"vm_id": vm_id}))["state"] == "running"
    await expect_error(client, "VM.start", {"vm_id": vm_id}, "FailedPrecondition", "vm_running")

    await expect_error(client, "VM.undefine", {"vm_id": vm_id}, "FailedPrecondition",
                       "vm_running")
    assert await libvirt_state(name) == libvirt.VIR_DOMAIN_RUNNING, "refused means untouched"
    await client.call("VM.undefine", {"vm_id": vm_id, "force": True})
    assert await libvirt_state(name) is None
    error = await expect_error(client, "VM.getInfo", {"vm_id": vm_id}, "NotFound")
    assert error.data["object"] == "vm" and error.data["id"] == vm_id


async def test_defined_but_not_started(qemu_agent: AgentProcess,
                                       checked_client: ClientFactory) -> None:
    client = await checked_client(qemu_agent.unix_url)
    name = vm_name()
    result = await client.call("VM.create", {"spec": firmware_spec(name), "start": False})
    assert result["state"] == "defined"
    defined = (await client.call("VM.list", {"state": "defined"}))["vms"]
    assert name in [vm["name"] for vm in defined]
    xml = (await client.call("VM.getXML", {"vm_id": result["vm_id"], "inactive": True}))["xml"]
    assert etree.fromstring(xml.encode()).findtext("name") == name
    await client.call("VM.undefine", {"vm_id": result["vm_id"]})
    assert await libvirt_state(name) is None


async def test_transient_vm_is_gone_once_destroyed(qemu_agent: AgentProcess,
                                                   checked_client: ClientFactory) -> None:
    client = await checked_client(qemu_agent.unix_url)
    name = vm_name()
    vm_id = await create(client, name, persistent=False)
    assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["persistent"] is False
    await client.call("VM.destroy", {"vm_id": vm_id})
    assert await libvirt_state(name) is None
    await expect_error(client, "VM.create",
                       {"spec": firmware_spec(vm_name()), "persistent": False, "start": False},
                       "InvalidArgument")


async def test_duplicate_name_or_uuid_already_exists(qemu_agent: AgentProcess,
                                                     checked_client: ClientFactory) -> None:
    client = await checked_client(qemu_agent.unix_url)
    name = vm_name()
    vm_id = await create(client, name)
    error = await expect_error(client, "VM.create", {"spec": firmware_spec(name)},
                               "AlreadyExists", "name_taken")
    assert error.data["id"] == name
    other = vm_name()
    await expect_error(client, "VM.create", {"spec": firmware_spec(other, uuid=vm_id)},
                       "AlreadyExists", "uuid_taken")
    assert await libvirt_state(other) is None


BAD_INPUT = [
    pytest.param({"xml": "<domain type='kvm'><name>x</name"}, "InvalidArgument",
                 id="malformed-xml"),
    pytest.param({"xml": "<domain type='kvm'><name>{name}</name><memory>65536</memory>"
                         "<os><type>hvm</type></os><devices><video><model type='bogus'/>"
                         "</video></devices></domain>"}, "InvalidArgument",
                 id="unknown-device-model-in-xml"),
    pytest.param({"spec": {"name": "{name}", "nics": [{"bridge": "virbr0",
                                                        "model": "bogus"}]}},
                 "InvalidArgument", id="unknown-nic-model"),
    pytest.param({"spec": {"name": "{name}", "memory_mib": -64}}, "InvalidArgument",
                 id="negative-memory"),
    pytest.param({"spec": {"name": "a/b"}}, "InvalidArgument", id="name-with-slash"),
    pytest.param({"spec": {"name": "{name}",
                           "disks": [{"path": f"{IMAGE_ROOT}/nonexistent/disk.qcow2",
                                      "format": "qcow2"}]}},
                 "NotFound", id="missing-disk"),
    pytest.param({"spec": {"name": "{name}", "machine": "pc-bogus-1.0"}}, "InvalidArgument",
                 id="unknown-machine"),
]


@pytest.mark.parametrize(("params", "error"), BAD_INPUT)
async def test_bad_input_is_refused_and_nothing_is_defined(
    qemu_agent: AgentProcess, checked_client: ClientFactory, params: dict[str, Any],
    error: str,
) -> None:
    import json

    client = await checked_client(qemu_agent.unix_url)
    name = vm_name()
    params = json.loads(json.dumps(params).replace("{name}", name))
    await expect_error(client, "VM.create", params, error)
    names = await virt(lambda conn: [d.name() for d in conn.listAllDomains()])
    assert name not in names and "a/b" not in names


async def test_a_start_that_fails_leaves_nothing_defined(
    qemu_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    name = vm_name()
    # A file that is not a qcow2 image: libvirt accepts the definition, QEMU fails to open it.
    bogus = image_dir / "not-an-image.qcow2"
    bogus.write_bytes(b"this is not qcow2")
    spec = firmware_spec(name, disks=[{"path": str(bogus), "format": "qcow2"}])
    with pytest.raises(RemoteError):
        await client.call("VM.create", {"spec": spec})
    assert await libvirt_state(name) is None


async def test_lifecycle_events_follow_the_vm(qemu_agent: AgentProcess,
                                              checked_client: ClientFactory) -> None:
    client = await checked_client(qemu_agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["vm.lifecycle"]})
    name = vm_name()
    vm_id = await create(client, name)

    def of_vm(event: str) -> Any:
        return lambda data: data["vm_id"] == vm_id and data["event"] == event

    before: list[str] = []

    def start_seen(data: dict[str, Any]) -> bool:
        if data["vm_id"] == vm_id:
            before.append(data["event"])
        return bool(of_vm("started")(data))

    started = await next_event(client, "vm.lifecycle", start_seen)
    assert started["state"] == "running" and started["name"] == name
    # libvirt starts QEMU paused and resumes its CPUs before it reports the start: that is
    # no resume of a paused VM, and subscribers are not told of one.
    assert before == ["defined", "started"], before
    await client.call("VM.pause", {"vm_id": vm_id})
    paused = await next_event(client, "vm.lifecycle", of_vm("suspended"))
    assert paused["state"] == "paused" and paused["previous_state"] == "running"
    await client.call("VM.resume", {"vm_id": vm_id})
    resumed = await next_event(client, "vm.lifecycle", of_vm("resumed"))
    assert resumed["state"] == "running" and resumed["previous_state"] == "paused"
    await client.call("VM.pause", {"vm_id": vm_id})
    await next_event(client, "vm.lifecycle", of_vm("suspended"))
    await client.call("VM.destroy", {"vm_id": vm_id})
    stopped = await next_event(client, "vm.lifecycle", of_vm("stopped"))
    assert stopped["state"] == "shutoff" and stopped["detail"] == "destroyed"
    # QEMU reports the host's kill as a shutdown first, so libvirt may say so in between.
    assert stopped["previous_state"] in ("paused", "shutting_down")
    await client.call("VM.undefine", {"vm_id": vm_id})
    removed = await next_event(client, "vm.lifecycle", of_vm("undefined"))
    assert removed["state"] == "removed"


async def test_shutdown_of_a_guest_without_acpi_handler(
    qemu_agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    """SeaBIOS has no power-button handler: the fallback decides."""
    client = await checked_client(qemu_agent.unix_url)
    vm_id = await create(client, vm_name())
    started = time.monotonic()
    error = await expect_error(client, "VM.shutdown",
                               {"vm_id": vm_id, "timeout": 1.5, "fallback": "none"},
                               "DeadlineExceeded", "shutdown_timeout")
    assert error.data["tried"] == ["acpi"], "no guest agent: skipped without waiting"
    assert 1.4 < time.monotonic() - started < 4
    assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["state"] == "running"
    result = await client.call("VM.shutdown",
                               {"vm_id": vm_id, "timeout": 1.0, "fallback": "destroy"})
    assert result["stopped_by"] == "destroy" and result["tried"] == ["acpi", "destroy"]
    assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["state"] == "shutoff"
    await expect_error(client, "VM.shutdown", {"vm_id": vm_id}, "FailedPrecondition",
                       "vm_not_running")


async def test_paused_vm_goes_straight_to_the_fallback(
    qemu_agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    vm_id = await create(client, vm_name())
    await client.call("VM.pause", {"vm_id": vm_id})
    await expect_error(client, "VM.shutdown", {"vm_id": vm_id, "fallback": "none"},
                       "FailedPrecondition", "vm_paused")
    started = time.monotonic()
    result = await client.call("VM.shutdown",
                               {"vm_id": vm_id, "timeout": 30, "fallback": "destroy"})
    assert result["stopped_by"] == "destroy"
    assert time.monotonic() - started < 10, "the 30 s timeout must not be waited out"


async def test_two_clients_on_one_vm_are_serialised(
    qemu_agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    first = await checked_client(qemu_agent.unix_url)
    second = await checked_client(qemu_agent.tcp_url)  # a reader may watch
    admin_second = await checked_client(qemu_agent.unix_url)
    vm_id = await create(first, vm_name())
    shutdown = asyncio.create_task(first.call(
        "VM.shutdown", {"vm_id": vm_id, "timeout": 1.0, "fallback": "destroy"}))
    # While the shutdown holds the VM, readers see it and a second change waits its turn.
    assert (await wait_for_operation(second, vm_id))["method"] == "VM.shutdown"
    start = await admin_second.call("VM.start", {"vm_id": vm_id})
    assert (await shutdown)["stopped_by"] == "destroy"
    assert start["state"] == "running", "the start ran after the shutdown, in arrival order"


async def test_a_call_that_would_wait_too_long_is_aborted(
    tmp_path: Path, checked_client: ClientFactory,
) -> None:
    from tests.agentproc import start_agent
    from tests.integration import libvirtd as daemon

    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI,
                              sections={"vm": {"lock_wait": 0.5}})
    try:
        client = await checked_client(agent.unix_url)
        other = await checked_client(agent.unix_url)
        vm_id = await create(client, vm_name())
        shutdown = asyncio.create_task(client.call(
            "VM.shutdown", {"vm_id": vm_id, "timeout": 2.0, "fallback": "destroy"}))
        await wait_for_operation(other, vm_id)
        error = await expect_error(other, "VM.pause", {"vm_id": vm_id}, "Aborted", "vm_busy")
        assert error.data["operation"]["method"] == "VM.shutdown"
        assert uuid.UUID(error.data["operation"]["id"])
        assert (await shutdown)["stopped_by"] == "destroy"
    finally:
        assert await agent.stop() == 0


async def test_concurrent_creates_of_one_name_make_one_vm(
    qemu_agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    clients = [await checked_client(qemu_agent.unix_url) for _ in range(3)]
    name = vm_name()
    results = await asyncio.gather(
        *(c.call("VM.create", {"spec": firmware_spec(name)}) for c in clients),
        return_exceptions=True)
    made = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, RemoteError)]
    assert len(made) == 1 and len(refused) == 2, results
    assert all(r.name == "AlreadyExists" for r in refused)
    names = await virt(lambda conn: [d.name() for d in conn.listAllDomains()])
    assert names.count(name) == 1


async def test_uefi_guest_gets_and_loses_its_nvram(
    qemu_agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    name = vm_name()
    vm_id = await create(client, name, spec=firmware_spec(name, firmware="uefi", machine="q35",
                                                          memory_mib=256))
    xml = (await client.call("VM.getXML", {"vm_id": vm_id}))["xml"]
    root = etree.fromstring(xml.encode())
    loader = root.findtext("os/loader") or ""
    nvram = root.findtext("os/nvram") or ""
    assert "OVMF" in loader and nvram
    assert await virt(lambda _conn: Path(nvram).exists())
    await client.call("VM.undefine", {"vm_id": vm_id, "force": True})
    assert not await virt(lambda _conn: Path(nvram).exists()), "undefine removes the NVRAM"
