"""VM.export in-process (test:///default): where an OVA may be written, and the package
of a VM without disks (its descriptor and manifest). Disks are exported from volumes
in tests/integration/test_vm_ova.py."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.unit.vm.harness import InProcessAgent
from virtnode.vm import ovf

UNKNOWN = "00000000-0000-4000-8000-0000000000ff"
NS = {"ovf": ovf.OVF, "rasd": ovf.RASD, "vmw": ovf.VMW, "virtnode": ovf.VIRTNODE}


async def export_job(api: InProcessAgent, params: dict[str, Any]) -> dict[str, Any]:
    started = await api.call("VM.export", params)
    job: dict[str, Any] = (await api.call("Job.wait", {"job_id": started["job_id"],
                                                       "timeout": 30}))["job"]
    return job


@pytest.mark.covers("VM.export")
async def test_an_ova_goes_only_where_exports_may_go(api: InProcessAgent,
                                                     tmp_path: Path) -> None:
    exports = api.exports
    exports.mkdir()
    (exports / "taken.ova").write_bytes(b"mine")
    (exports / "escape").symlink_to(tmp_path)
    vm_id = await api.create("packed", start=False, vcpus=2, memory_mib=96,
                             nics=[{"libvirt_network": "default", "model": "e1000",
                                    "mac": "52:54:00:12:34:56"}])
    for path, name, reason in [
            ("relative.ova", "InvalidArgument", "invalid_path"),
            (str(exports / "vm.tar"), "InvalidArgument", "invalid_path"),
            (str(exports / ".hidden.ova"), "InvalidArgument", "invalid_path"),
            (str(tmp_path / "vm.ova"), "PermissionDenied", "path_not_allowed"),
            (str(exports / "escape" / "vm.ova"), "PermissionDenied", "path_not_allowed"),
            (str(exports / "nowhere" / "vm.ova"), "InvalidArgument", "invalid_path"),
            (str(exports / "taken.ova"), "AlreadyExists", "file_exists")]:
        await api.error("VM.export", {"vm_id": vm_id, "path": path}, name, reason)
    assert (exports / "taken.ova").read_bytes() == b"mine"
    running = await api.create("running")
    job = await export_job(api, {"vm_id": running, "path": str(exports / "r.ova")})
    assert job["error"]["data"]["reason"] == "vm_running"
    job = await export_job(api, {"vm_id": UNKNOWN, "path": str(exports / "u.ova")})
    assert job["error"]["data"]["reason"] == "not_found"

    job = await export_job(api, {"vm_id": vm_id, "path": str(exports / "packed.ova")})
    assert job["state"] == "succeeded", job
    assert sorted(p.name for p in exports.iterdir()) == ["escape", "packed.ova", "taken.ova"]
    with tarfile.open(exports / "packed.ova") as tar:
        names = tar.getnames()
        descriptor = tar.extractfile("packed.ovf").read()  # type: ignore[union-attr]
        manifest = tar.extractfile("packed.mf").read()  # type: ignore[union-attr]
    assert names == ["packed.ovf", "packed.mf"], "the descriptor first"
    assert manifest.decode() == (f"SHA256(packed.ovf)= "
                                 f"{hashlib.sha256(descriptor).hexdigest()}\n")
    root = etree.fromstring(descriptor)
    items = {int(i.findtext("rasd:ResourceType", namespaces=NS)): i
             for i in root.iterfind(".//ovf:Item", NS)}
    assert items[ovf.CPU].findtext("rasd:VirtualQuantity", namespaces=NS) == "2"
    assert items[ovf.MEMORY].findtext("rasd:VirtualQuantity", namespaces=NS) == "96"
    nic = items[ovf.NIC]
    assert (nic.findtext("rasd:ResourceSubType", namespaces=NS),
            nic.findtext("rasd:Address", namespaces=NS),
            nic.findtext("rasd:Connection", namespaces=NS)) == (
        "E1000", "52:54:00:12:34:56", "default")
    assert root.find(".//vmw:Config", NS).get(f"{{{ovf.VMW}}}value") == "bios"
    assert root.findtext(".//ovf:VirtualSystem/ovf:Name", namespaces=NS) == "packed"


@pytest.mark.covers("VM.import")
async def test_an_import_needs_volumes(api: InProcessAgent, tmp_path: Path) -> None:
    # The in-process agent has no storage: imports with real domains are in
    # tests/integration/test_vm_ova.py.
    await api.error("VM.import", {"path": str(tmp_path / "x.ova"), "sd_id": UNKNOWN},
                    "FailedPrecondition", "no_volumes")
