"""Install media and cloud-init on real guests: CD-ROMs the guest mounts, media changed
and ejected live, a NoCloud seed the guest reads, ISO images as volumes."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pycdlib
import pytest
from lxml import etree

from tests import guests
from tests.agentproc import AgentProcess
from tests.conftest import ClientFactory
from tests.integration.conftest import expect_error, vm_name
from tests.integration.serialshell import serial_shell
from tests.subproc import run
from virtnode.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.qemu,
              pytest.mark.usefixtures("libvirtd", "cleanup_vms")]

USER_DATA = "#cloud-config\nhostname: media-test\nruncmd:\n  - [echo, hello]\n"


def make_iso(path: Path, label: str, files: dict[str, str]) -> Path:
    """An ISO 9660 image labelled ``label`` holding ``files`` (Rock Ridge names)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, rock_ridge="1.09", vol_ident=label)
    for number, (name, text) in enumerate(sorted(files.items())):
        data = text.encode()
        iso.add_fp(io.BytesIO(data), len(data), f"/FILE{number}.;1", rr_name=name)
    iso.write(str(path))
    iso.close()
    path.chmod(0o644)
    return path


async def console_vm(client: Client, **spec: Any) -> str:
    image = await guests.guest_image("console")
    created = await client.call("VM.create", {"spec": {
        "name": vm_name(), "domain_type": "qemu", "memory_mib": 256,
        "kernel": str(image.kernel), "initrd": str(image.initrd),
        "cmdline": "console=ttyS0", **spec}})
    return str(created["vm_id"])


async def drives(client: Client, vm_id: str, *, inactive: bool = False) -> dict[str, str | None]:
    """Each CD-ROM's device name and media path, as libvirt has it."""
    xml = (await client.call("VM.getXML", {"vm_id": vm_id, "inactive": inactive}))["xml"]
    found = {}
    for disk in etree.fromstring(xml).iterfind("devices/disk[@device='cdrom']"):
        source = disk.find("source")
        found[disk.find("target").get("dev")] = None if source is None else source.get("file")
    return found


async def test_cdrom_media_and_the_cloud_init_seed_reach_the_guest(
        qemu_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path) -> None:
    client = await checked_client(qemu_agent.unix_url)
    sd_id = (await client.call("StorageDomain.create", {
        "type": "localfs", "name": "media", "path": str(image_dir / "sd")}))["domain"]["sd_id"]
    first = make_iso(image_dir / "first.iso", "FIRST", {"hello.txt": "first disc\n"})
    second = make_iso(image_dir / "second.iso", "SECOND", {"hello.txt": "second disc\n"})
    # The second disc is uploaded as an ISO image, as a user would.
    up = (await run(sys.executable, "-m", "virtnode", "volume", "upload", second, "--sd",
                    sd_id, "--iso", "--description", "second disc", "--url",
                    qemu_agent.unix_url, env={**os.environ, "NO_COLOR": "1"})).check()
    disc = json.loads(up)["volume"]
    assert (disc["content"], disc["role"], disc["format"]) == ("iso", "shared", "raw")
    disc_ref = {k: disc[k] for k in ("sd_id", "image_id", "volume_id")}
    vm_id = await console_vm(client, cdroms=[{"path": str(first), "bus": "scsi"}],
                             cloud_init={"user_data": USER_DATA, "sd_id": sd_id,
                                         "meta_data": {"region": "lab"}})
    [seed] = [v for v in (await client.call("Volume.list", {
        "sd_id": sd_id, "content": "iso"}))["volumes"] if v["volume_id"] != disc["volume_id"]]
    assert (seed["format"], seed["role"], seed["legality"]) == ("raw", "shared", "legal")
    assert vm_id in seed["description"]
    assert await drives(client, vm_id) == {"sda": str(first), "sdb": seed["path"]}

    async with serial_shell(qemu_agent, client, vm_id) as shell:
        status, out = await shell.run("mkdir -p /mnt/cd /mnt/seed && "
                                      "mount -t iso9660 -o ro /dev/sr0 /mnt/cd && "
                                      "cat /mnt/cd/hello.txt")
        assert (status, out) == (0, "first disc\n")
        status, out = await shell.run("mount -t iso9660 -o ro $(findlabel cidata) /mnt/seed "
                                      "&& cat /mnt/seed/meta-data")
        assert status == 0, out
        meta = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
        assert meta["instance-id"] == vm_id and meta["region"] == "lab"
        assert meta["local-hostname"].startswith("vn-")
        status, out = await shell.run("cat /mnt/seed/user-data")
        assert (status, out) == (0, USER_DATA)

        # The mounted disc locks the tray: an eject without force is refused.
        await expect_error(client, "VM.changeMedia", {
            "vm_id": vm_id, "drive": "sda", "media": {"volume": disc_ref}},
            "FailedPrecondition", "tray_locked")
        assert (await drives(client, vm_id))["sda"] == str(first)

        assert (await shell.run("umount /mnt/cd"))[0] == 0
        result = await client.call("VM.changeMedia", {"vm_id": vm_id, "drive": "sda",
                                                      "media": {"volume": disc_ref}})
        assert result == {"drive": "sda", "path": disc["path"]}
        # The guest learns of the new disc when it next asks the drive.
        status, out = await shell.run(
            "for i in 1 2 3 4 5 6 7 8 9 10; do "
            "mount -t iso9660 -o ro /dev/sr0 /mnt/cd 2>/dev/null && break; sleep 1; done; "
            "cat /mnt/cd/hello.txt", timeout=40)
        assert (status, out) == (0, "second disc\n")
        assert (await drives(client, vm_id, inactive=True))["sda"] == disc["path"], \
            "the definition has the new media too"
        error = await expect_error(client, "Volume.delete", disc_ref, "FailedPrecondition")
        assert error.data["reason"] == "in_use" and error.data["vms"], error.error

        assert (await shell.run("umount /mnt/cd"))[0] == 0
        assert await client.call("VM.changeMedia", {"vm_id": vm_id, "drive": "sda",
                                                    "media": None}) == \
            {"drive": "sda", "path": None}
        status, out = await shell.run("sleep 1; dd if=/dev/sr0 of=/dev/null bs=2048 count=1")
        assert status != 0 and "No medium" in out, out
        assert await drives(client, vm_id, inactive=True) == {"sda": None,
                                                              "sdb": seed["path"]}

    # The seed stays while the VM is defined, and goes with it.
    ref = {k: seed[k] for k in ("sd_id", "image_id", "volume_id")}
    error = await expect_error(client, "Volume.delete", ref, "FailedPrecondition")
    assert error.data["reason"] == "in_use"
    await client.call("VM.destroy", {"vm_id": vm_id})
    error = await expect_error(client, "Volume.delete", ref, "FailedPrecondition")
    assert error.data["reason"] == "in_use", "a defined VM still needs its seed"
    await client.call("VM.undefine", {"vm_id": vm_id})
    [left] = (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]
    assert left["volume_id"] == disc["volume_id"], "the seed went with its VM"
    await client.call("Volume.delete", disc_ref)  # no VM names the disc any more


async def test_an_iso_upload_or_import_must_be_iso_9660(
        qemu_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path) -> None:
    client = await checked_client(qemu_agent.unix_url)
    sd_id = (await client.call("StorageDomain.create", {
        "type": "localfs", "name": "isos", "path": str(image_dir / "sd")}))["domain"]["sd_id"]
    fake = image_dir / "fake.iso"
    fake.write_bytes(os.urandom(64 * 1024))
    refused = await run(sys.executable, "-m", "virtnode", "volume", "upload", fake, "--sd",
                        sd_id, "--iso", "--url", qemu_agent.unix_url,
                        env={**os.environ, "NO_COLOR": "1"})
    assert refused.status == 1 and "not_iso" in refused.err, refused.err
    await expect_error(client, "Volume.prepareTransfer", {
        "sd_id": sd_id, "direction": "upload", "size": 2048, "format": "qcow2",
        "content": "iso"}, "InvalidArgument", "invalid_format")
    assert (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []


async def test_a_create_that_fails_leaves_no_seed(
        qemu_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path) -> None:
    client = await checked_client(qemu_agent.unix_url)
    sd_id = (await client.call("StorageDomain.create", {
        "type": "localfs", "name": "seeds", "path": str(image_dir / "sd")}))["domain"]["sd_id"]
    # libvirt refuses IDE on q35 when it defines the VM: after the seed was made.
    error = await expect_error(client, "VM.create", {"spec": {
        "name": vm_name(), "domain_type": "qemu", "cdroms": [{"bus": "ide"}],
        "cloud_init": {"user_data": USER_DATA, "sd_id": sd_id}}},
        "InvalidArgument", "rejected_by_hypervisor")
    assert "IDE" in error.message
    # Refused before anything is made: bad YAML, a transient VM.
    await expect_error(client, "VM.create", {"spec": {
        "name": vm_name(), "cloud_init": {"user_data": "#cloud-config\n: [", "sd_id": sd_id}}},
        "InvalidArgument")
    await expect_error(client, "VM.create", {"persistent": False, "spec": {
        "name": vm_name(), "cloud_init": {"user_data": USER_DATA, "sd_id": sd_id}}},
        "InvalidArgument")
    assert (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []
