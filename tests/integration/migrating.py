"""What the migration tests do on the lab's hosts: VMs, guests, volumes, and what each
host's libvirtd says of them."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from tests import guests
from tests.integration.lab import on_host
from virtnode.client import Client, RemoteError, tls_context


async def connect(host: dict[str, Any]) -> Client:
    tls = tls_context(host["ca"], host["cert"], host["key"])
    return await Client.connect(host["url"], tls=tls)


async def running(host: str) -> list[str]:
    listed = await asyncio.to_thread(on_host, host, "virsh", "-q", "-c", "qemu:///system",
                                     "list", "--name")
    return listed.stdout.split()


async def defined(host: str) -> list[str]:
    listed = await asyncio.to_thread(on_host, host, "virsh", "-q", "-c", "qemu:///system",
                                     "list", "--all", "--name")
    return listed.stdout.split()


async def create_vm(client: Client, **extra: Any) -> tuple[str, str]:
    name = f"mig-{uuid.uuid4().hex[:8]}"
    spec = {"name": name, "memory_mib": 64, "domain_type": "kvm", "machine": "pc", **extra}
    created = await client.call("VM.create", {"spec": spec, "start": True})
    return created["vm_id"], name


async def remove_vm(client: Client, vm_id: str) -> None:
    try:
        await client.call("VM.undefine", {"vm_id": vm_id, "force": True})
    except RemoteError as exc:
        assert exc.name == "NotFound", exc.error


async def create_guest(client: Client, variant: str = "dirty",
                       memory_mib: int = guests.MEMORY_MIB) -> tuple[str, str]:
    """A running TCG Linux guest (tests/guests.py), ready: the ``dirty`` one keeps
    rewriting 16 MiB of its memory."""
    image = await guests.guest_image(variant)
    name = f"mig-{uuid.uuid4().hex[:8]}"
    log = guests.console_log_path(name)
    log.unlink(missing_ok=True)
    xml = guests.domain_xml(image, name, str(uuid.uuid4()), log, memory_mib=memory_mib)
    created = await client.call("VM.create", {"xml": xml})
    await guests.wait_for_console(log, timeout=120)
    return created["vm_id"], name


async def state_on(host: str, name: str) -> str:
    shown = await asyncio.to_thread(on_host, host, "virsh", "-q", "-c", "qemu:///system",
                                    "domstate", name)
    return shown.stdout.strip() or shown.stderr.strip()


async def actions(client: Client, vm_id: str) -> list[str]:
    events = (await client.call("Events.get", {"topics": ["vm.migration"],
                                               "since": 0}))["events"]
    return [e["data"]["action"] for e in events
            if e["data"]["vm_id"] == vm_id and "action" in e["data"]]


async def migrate(client: Client, vm_id: str, destination: str,
                  **extra: Any) -> dict[str, Any]:
    started = await client.call("VM.migrate", {"vm_id": vm_id, "destination": destination,
                                               **extra})
    job: dict[str, Any] = (await client.call("Job.wait", {"job_id": started["job_id"],
                                                           "timeout": 120}))["job"]
    return job


async def phases(client: Client, vm_id: str) -> list[tuple[str, str]]:
    events = (await client.call("Events.get", {"topics": ["vm.migration"],
                                               "since": 0}))["events"]
    return [(e["data"]["role"], e["data"]["phase"]) for e in events
            if e["data"]["vm_id"] == vm_id and e["data"]["phase"] != "migrating"]


PATTERN = "0x5a"  # what the tests write into a disk before migrating it
REGIONS = (("0", "4M"), ("200M", "1M"))


async def volume_with_data(client: Client, host: str, sd_id: str, fmt: str = "qcow2",
                           parent: dict[str, str] | None = None) -> dict[str, Any]:
    """A 256 MiB volume with PATTERN written at REGIONS (qemu-io, on the host)."""
    request: dict[str, Any] = {"sd_id": sd_id, "format": fmt, "size": 256 << 20}
    if parent is not None:
        request["parent"] = parent
    volume: dict[str, Any] = (await client.call("Volume.create", request))["volume"]
    for offset, length in REGIONS:
        wrote = await asyncio.to_thread(on_host, host, "qemu-io", "-f", fmt, "-c",
                                        f"write -P {PATTERN} {offset} {length}",
                                        volume["path"])
        assert wrote.returncode == 0, wrote.stderr
    return volume


async def holds_data(host: str, path: str, fmt: str = "qcow2") -> bool:
    """Whether the image at path (in use or not) reads PATTERN at REGIONS."""
    for offset, length in REGIONS:
        read = await asyncio.to_thread(on_host, host, "qemu-io", "-U", "-r", "-f", fmt,
                                       "-c", f"read -P {PATTERN} {offset} {length}", path)
        if read.returncode != 0 or "Pattern verification failed" in read.stdout:
            return False
    return True


async def disk_paths(host: str, name: str) -> list[str]:
    listed = await asyncio.to_thread(on_host, host, "virsh", "-q", "-c", "qemu:///system",
                                     "domblklist", name)
    return [line.split()[1] for line in listed.stdout.splitlines() if line.strip()]


def ref(volume: dict[str, Any]) -> dict[str, str]:
    return {k: volume[k] for k in ("sd_id", "image_id", "volume_id")}


async def volumes_in(client: Client, sd_id: str) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = (await client.call("Volume.list", {"sd_id": sd_id}))[
        "volumes"]
    return listed


async def drop_volumes(client: Client, sd_id: str) -> None:
    """Every volume of a domain, leaves first."""
    for _ in range(4):
        for volume in await volumes_in(client, sd_id):
            if volume.get("role") in ("leaf", None):
                with contextlib.suppress(RemoteError):
                    await client.call("Volume.delete", ref(volume))


async def left_alone(client: Client, vm_id: str, name: str, source: str = "lab-h1",
                     destination: str = "lab-h2") -> None:
    """A refused migration changed nothing: the VM runs at the source only, with no job."""
    assert name in await running(source)
    assert name not in await defined(destination)
    jobs = (await client.call("Job.list", {"kind": "VM.migrate"}))["jobs"]
    assert [j for j in jobs if j["target"] == vm_id] == []


async def runs_only_on(host: str, name: str, other: str) -> None:
    """The VM runs on ``host`` and libvirt on ``other`` has not even a definition of it."""
    assert await state_on(host, name) == "running"
    assert name not in await defined(other)
