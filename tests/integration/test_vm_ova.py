"""OVA export of a real guest's disks: the package's order, its manifest, and disks
that show exactly what the VM's chain shows, in qcow2 and in streamOptimized vmdk."""

from __future__ import annotations

import asyncio
import hashlib
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory
from tests.integration import libvirtd as daemon
from tests.integration.conftest import wait_job
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
        "storage": {"export_paths": [str(tmp_path / "exports")]}})
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
