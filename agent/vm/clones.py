"""Templates and clones: ``VM.makeTemplate`` and ``VM.clone``.

A template is a stopped VM whose disks' volumes have become shared (read-only, the base
of other images); its definition says so in the agent's metadata (``template="yes"``)
and it cannot be started. The metadata is written first and the volumes shared after,
so a crash between the two leaves a template that cannot start over volumes still
writable, which calling ``VM.makeTemplate`` again finishes.

A clone is a new VM made from a stopped VM's (or a template's) definition: a new uuid
and name, no MAC addresses (libvirt gives new ones), no NVRAM file (a fresh one from
the firmware's template), no cloud-init seed of the source, no snapshots; each disk a
new image, either a full copy of what the source's chain shows (``qemu-img convert``)
or, from a template, a linked clone: a qcow2 layer in a new image over the template's
shared volume. CD-ROM media and read-only disks are kept as they are.

Crash safety: the clone's new images and its uuid are journaled in the state store
before the first is made. At every connection to libvirt an unfinished clone is
settled: if a VM of that uuid is defined the clone is complete, else its images are
removed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from lxml import etree

from virtnode.api_schema.params import VmCloneParams, VmMakeTemplateParams
from virtnode.errors import FailedPrecondition, InvalidArgument, NotFound
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.connection import Hypervisor
from virtnode.hypervisor.handles import Connection, Domain
from virtnode.jobs.manager import JobHandle, JobKind, JobManager
from virtnode.storage.volumes.service import VolumeService
from virtnode.store import Store, TableSchema, transaction
from virtnode.util.jsontypes import JsonObject
from virtnode.util.safexml import parse_xml
from virtnode.vm import cloudinit
from virtnode.vm import ops as vmops
from virtnode.vm.cloudinit import CloudInit
from virtnode.vm.core import VmCore
from virtnode.vm.snapshots import NAMESPACE as SNAPSHOTS_NS
from virtnode.vm.snapshots import StorageDirs, read_tree, set_chains, volume_of
from virtnode.vm.spec import (
    CDROM_BUSES,
    NAMESPACE,
    PREFIX,
    Cdrom,
    cdrom_element,
    check_name,
    metadata_body,
    read_metadata,
)

log = logging.getLogger(__name__)

#: Not cancellable: a copy cut short is removed, but a cancel would leave the caller
#: guessing which disks were copied; a clone is made whole or not at all.
CLONE_JOB = JobKind("VM.clone", cancellable=False)

COMPONENT = "vm_clone_ops"
VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS vm_clone_ops (
    vm_id    TEXT PRIMARY KEY,
    images   TEXT NOT NULL,
    started  REAL NOT NULL
);
"""
TABLES = TableSchema(COMPONENT, VERSION, SCHEMA)


def is_template(xml: str) -> bool:
    """Whether a domain's XML is a template's."""
    metadata = read_metadata(xml)
    return metadata is not None and metadata.get("template") == "yes"


class CloneService:
    def __init__(self, core: VmCore, jobs: JobManager, volumes: VolumeService | None,
                 store: Store | None, *, storage_dirs: StorageDirs) -> None:
        self._core = core
        self._hv: Hypervisor = core.hypervisor
        self._jobs = jobs
        self._volumes = volumes
        self._store = store
        self._storage_dirs = storage_dirs
        self._tasks: set[asyncio.Task[None]] = set()
        jobs.register(CLONE_JOB)

    async def start(self) -> None:
        if self._store is not None:
            await self._store.ensure_schema(COMPONENT, VERSION, SCHEMA)
        self._hv.add_connect_hook(self._settle_unfinished)

    # --- templates ---------------------------------------------------------------------------

    async def make_template(self, params: VmMakeTemplateParams) -> JsonObject:
        vm_id = params["vm_id"]
        self._core.require_ready()
        async with self._core.locks.hold(vm_id, "VM.makeTemplate"):
            xml = await stopped_definition(self._core, vm_id, "VM.makeTemplate")
            if read_tree(xml)[1]:
                raise FailedPrecondition(
                    f"VM {vm_id} has snapshots; a template is one image per disk: delete "
                    "them first", reason="has_snapshots", object="vm", id=vm_id)
            disks = volume_disks(xml, self._storage_dirs() if self._volumes is not None else {})
            if not disks:
                raise FailedPrecondition("the VM has no disk that is a volume",
                                         reason="no_disks", object="vm", id=vm_id)
            # The mark first: from here the VM cannot start, so nothing writes what is
            # about to become shared.
            await self._core.on_vm(vm_id, _mark_template, what="VM.makeTemplate")
            assert self._volumes is not None
            for _target, ref in disks:
                await self._volumes.share(ref)
        return {"vm_id": vm_id, "disks": [{"target": t, **ref} for t, ref in disks]}

    # --- clones -------------------------------------------------------------------------------

    async def clone(self, params: VmCloneParams) -> JsonObject:
        source, name, linked = params["vm_id"], params["name"], params["linked"]
        check_name(name, "name")
        self._core.require_ready()
        new_id = str(uuid.uuid4())

        async def run(handle: JobHandle) -> JsonObject:
            return await self._clone(source, new_id, name, linked=linked,
                                     sd_id=params.get("sd_id"), handle=handle,
                                     cloud_init=params.get("cloud_init"))

        job = await self._jobs.submit(
            CLONE_JOB.name, {k: v for k, v in params.items() if k != "request_key"}, run,
            description=f"{'linked ' if linked else ''}clone {name} of VM {source}",
            target=source, request_key=params.get("request_key"))
        return {"job_id": job.job_id, "job": job.to_api()}

    async def _clone(self, source: str, new_id: str, name: str, *, linked: bool,
                     sd_id: str | None, handle: JobHandle,
                     cloud_init: Mapping[str, Any] | None) -> JsonObject:
        async with (self._core.locks.hold(source, "VM.clone"),
                    self._core.locks.hold(f"name:{name}", "VM.clone")):
            xml = await stopped_definition(self._core, source, "VM.clone", secure=True)
            template = is_template(xml)
            if linked and not template:
                raise FailedPrecondition(
                    f"VM {source} is not a template: a linked clone needs one "
                    "(VM.makeTemplate), or take a full clone", reason="not_template",
                    object="vm", id=source)
            if linked and sd_id is not None:
                raise InvalidArgument("a linked clone is made in its template's storage "
                                      "domain; sd_id is for full clones",
                                      reason="invalid_argument", field="sd_id")
            await self._hv.call(lambda conn: vmops.check_unique(conn, name, new_id),
                                what="checking the VM name")
            disks = volume_disks(xml, self._storage_dirs() if self._volumes is not None else {})
            plan: list[dict[str, Any]] = [{"target": target, "source": ref,
                     "sd_id": ref["sd_id"] if linked or sd_id is None else sd_id,
                     "image_id": str(uuid.uuid4()), "volume_id": str(uuid.uuid4())}
                    for target, ref in disks]
            seed = None
            if cloud_init is not None:  # checked before anything is made
                seed = _seed_of(xml, new_id, name, cloud_init, plan)
                plan.append(seed)
            await self.journal(new_id, plan)
            try:
                chains: dict[str, Sequence[tuple[str, str]]] = {}
                for index, disk in enumerate(d for d in plan if d is not seed):
                    ref = await self._new_image(disk, name, linked=linked,
                                                progress=(index, len(disks), handle))
                    disk["volume_id"] = ref["volume_id"]  # Volume.create picks a layer's
                    assert self._volumes is not None  # else no disk is a volume
                    chains[disk["target"]] = await self._volumes.resolve(ref, readonly=False)
                root = _clone_definition(xml, new_id, name, chains)
                if seed is not None:
                    await self._add_seed(root, seed, name)
                await self._core.vet(root, "xml")
                await self._hv.call(lambda conn: conn.defineXMLFlags(
                    etree.tostring(root, encoding="unicode"), vc.DOMAIN_DEFINE_VALIDATE),
                    what=f"defining VM {name}")
            except BaseException:
                await asyncio.shield(self.undo(new_id, plan))
                raise
            await self.unjournal(new_id)
        return {"vm_id": new_id, "name": name,
                "disks": [{"target": d["target"], "sd_id": d["sd_id"],
                           "image_id": d["image_id"], "volume_id": d["volume_id"]}
                          for d in plan if d is not seed]}

    async def _add_seed(self, root: etree._Element, seed: Mapping[str, Any],
                        name: str) -> None:
        """Build the clone's cloud-init seed into its ISO volume and attach it."""
        if self._volumes is None:
            raise FailedPrecondition("volumes are not available here", reason="no_volumes")
        config: CloudInit = seed["cloud_init"]
        data = await asyncio.to_thread(cloudinit.seed_image, config)
        volume = await self._volumes.create_image(
            seed["sd_id"], data, content="iso", description=f"cloud-init seed of VM {name}",
            image_id=seed["image_id"], volume_id=seed["volume_id"], method="VM.clone")
        devices = root.find("devices")
        assert devices is not None
        devices.append(cdrom_element(Cdrom(path=str(volume["path"]), bus=config.bus,
                                           target=config.target, boot_order=None)))
        vm = root.find(f"metadata/{{{NAMESPACE}}}vm")
        if vm is not None:
            vm.set("seed", f"{seed['sd_id']}/{seed['image_id']}/{seed['volume_id']}")

    async def _new_image(self, disk: Mapping[str, Any], name: str, *, linked: bool,
                         progress: tuple[int, int, JobHandle]) -> JsonObject:
        """Make one disk (``index`` of ``count``) of the clone; the volume's reference."""
        assert self._volumes is not None
        index, count, handle = progress
        source = disk["source"]
        description = f"disk {disk['target']} of VM {name}"
        if linked:
            made = (await self._volumes.create({
                "sd_id": disk["sd_id"], "image_id": disk["image_id"], "format": "qcow2",
                "allocation": "sparse", "shared": False, "description": description,
                "parent": {"image_id": source["image_id"],
                           "volume_id": source["volume_id"]}}))["volume"]
            handle.progress((index + 1) / count * 99)
            return {k: made[k] for k in ("sd_id", "image_id", "volume_id")}

        def step(percent: float) -> None:
            handle.progress(min(99.0, (index + percent / 100) / count * 100))
        made = await self._volumes.copy_image(
            source, disk["sd_id"], disk["image_id"], disk["volume_id"],
            description=description, progress=step)
        return {k: made[k] for k in ("sd_id", "image_id", "volume_id")}

    async def undo(self, new_id: str, plan: Sequence[Mapping[str, Any]]) -> None:
        """Remove what a clone that failed made (unless its VM exists after all)."""
        try:
            await self._core.on_vm(new_id, lambda dom: dom.UUIDString())
            await self.unjournal(new_id)
            return
        except NotFound:
            pass
        for disk in plan:
            assert self._volumes is not None
            await self._volumes.remove_new_image(disk["sd_id"], disk["image_id"])
        await self.unjournal(new_id)

    # --- shared parts -----------------------------------------------------------------------

    # --- the journal -------------------------------------------------------------------------

    async def journal(self, vm_id: str, plan: Sequence[Mapping[str, Any]]) -> None:
        """Journal the new images (disks and seed) before the first is made."""
        if self._store is None:
            return
        images = json.dumps([{"sd_id": d["sd_id"], "image_id": d["image_id"]} for d in plan])

        def save(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute("INSERT INTO vm_clone_ops (vm_id, images, started) "
                             "VALUES (?, ?, ?)", (vm_id, images, time.time()))
        await self._store.run(save)

    async def unjournal(self, vm_id: str) -> None:
        if self._store is None:
            return

        def delete(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute("DELETE FROM vm_clone_ops WHERE vm_id = ?", (vm_id,))
        await self._store.run(delete)

    async def _settle_unfinished(self, _conn: Connection) -> None:
        if self._store is None or self._volumes is None:
            return

        def load(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            return list(conn.execute("SELECT vm_id, images FROM vm_clone_ops"))
        for vm_id, images in await self._store.run(load):
            task = asyncio.get_running_loop().create_task(
                self._settle(vm_id, json.loads(images)), name=f"settle clone {vm_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _settle(self, vm_id: str, plan: Sequence[Mapping[str, Any]]) -> None:
        try:
            await self.undo(vm_id, plan)
            log.warning("clone %s was interrupted; settled", vm_id)
        except Exception:
            log.exception("cannot settle the interrupted clone %s", vm_id)


async def stopped_definition(core: VmCore, vm_id: str, method: str, *,
                             secure: bool = False) -> str:
    """The persistent definition of a stopped VM; FailedPrecondition ``not_persistent``
    or ``vm_running`` otherwise."""
    flags = vc.DOMAIN_XML_INACTIVE | (vc.DOMAIN_XML_SECURE if secure else 0)

    def read(dom: Domain) -> tuple[str, str, bool]:
        return dom.XMLDesc(flags), vmops.state_of(dom)[0], bool(dom.isPersistent())

    xml, state, persistent = await core.on_vm(vm_id, read, what=method)
    if not persistent:
        raise FailedPrecondition("a transient VM has no definition to copy",
                                 reason="not_persistent", object="vm", id=vm_id)
    if state not in ("defined", "shutoff", "crashed"):
        raise FailedPrecondition(f"VM {vm_id} is {state}; shut it down first",
                                 reason="vm_running", object="vm", id=vm_id)
    return xml


def volume_disks(xml: str, dirs: Mapping[str, str]) -> list[tuple[str, JsonObject]]:
    """Each writable disk's target and volume; FailedPrecondition ``not_a_volume`` for a
    writable disk that is no volume of the domains whose image directories ``dirs``
    names."""
    disks = []
    for disk in parse_xml(xml).iterfind("devices/disk[@device='disk']"):
        target, source = disk.find("target"), disk.find("source")
        if target is None or disk.find("readonly") is not None:
            continue
        dev = target.get("dev", "")
        path = "" if source is None else source.get("file", "")
        ref = volume_of(path, dirs)
        if ref is None:
            raise FailedPrecondition(
                f"disk {dev} ({path or 'no file'}) is not a volume of a storage domain "
                "attached here", reason="not_a_volume", object="vm")
        disks.append((dev, {"sd_id": ref[0], "image_id": ref[1], "volume_id": ref[2]}))
    return disks


# --- in the libvirt pool -------------------------------------------------------------------


def _mark_template(dom: Domain) -> None:
    metadata = read_metadata(dom.XMLDesc(vc.DOMAIN_XML_INACTIVE)) or {
        "owner": "virtnode", "labels": {}}
    body = etree.tostring(metadata_body({**metadata, "template": "yes"}, namespaced=False),
                          encoding="unicode")
    dom.setMetadata(vc.DOMAIN_METADATA_ELEMENT, body, PREFIX, NAMESPACE,
                    vc.DOMAIN_AFFECT_CONFIG)


def _clone_definition(xml: str, vm_id: str, name: str,
                      chains: Mapping[str, Sequence[tuple[str, str]]]) -> etree._Element:
    """The clone's domain XML from its source's persistent definition."""
    root = parse_xml(xml)
    for tag, text in (("name", name), ("uuid", vm_id)):
        element = root.find(tag)
        if element is None:
            element = etree.SubElement(root, tag)
        element.text = text
    for mac in root.findall("devices/interface/mac"):
        mac.getparent().remove(mac)  # type: ignore[union-attr]
    for nvram in root.findall("os/nvram"):
        nvram.getparent().remove(nvram)  # type: ignore[union-attr]
    metadata = root.find("metadata")
    if metadata is not None:
        for stale in metadata.findall(f"{{{SNAPSHOTS_NS}}}snapshots"):
            metadata.remove(stale)
        vm = metadata.find(f"{{{NAMESPACE}}}vm")
        if vm is not None:
            seed = vm.get("seed")
            for key in ("seed", "template", "started"):
                if key in vm.attrib:
                    del vm.attrib[key]
            vm.set("created", f"{time.time():.3f}")
            if seed:
                _drop_seed(root, seed)
    set_chains(root, chains)
    return root


def _seed_of(xml: str, vm_id: str, name: str, raw: Mapping[str, Any],
             plan: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Where the clone's cloud-init seed goes, and its checked configuration: the storage
    domain given, else the first disk's; the bus given, else the source seed's or sata;
    the next free device name on that bus."""
    sd_id = raw.get("sd_id") or next((d["sd_id"] for d in plan), None)
    if sd_id is None:
        raise InvalidArgument("cloud_init.sd_id: the seed needs a storage domain: give "
                              "sd_id, or clone a VM with a disk", reason="invalid_cloud_init",
                              field="cloud_init.sd_id")
    root = parse_xml(xml)
    seed_path = _source_seed_path(root)
    taken = set()
    bus = "sata"
    for disk in root.iterfind("devices/disk"):
        element = disk.find("target")
        if element is None:
            continue
        source = disk.find("source")
        if seed_path and source is not None and source.get("file", "").endswith(seed_path):
            bus = element.get("bus", bus)  # the source's seed drive, which the clone drops
            continue
        taken.add(element.get("dev", ""))
    bus = str(raw.get("bus", bus))
    if bus not in CDROM_BUSES:
        raise InvalidArgument(f"cloud_init.bus: {bus!r} is not one of "
                              f"{', '.join(CDROM_BUSES)}", reason="invalid_cloud_init",
                              field="cloud_init.bus")
    prefix = "hd" if bus == "ide" else "sd"
    target = next((prefix + chr(c) for c in range(ord("a"), ord("z") + 1)
                   if prefix + chr(c) not in taken), None)
    if target is None:
        raise InvalidArgument(f"cloud_init.bus: no free device name left on {bus}",
                              reason="invalid_cloud_init", field="cloud_init.bus")
    config = cloudinit.check_cloud_init(raw, name, vm_id, bus=bus, target=target)
    return {"target": target, "sd_id": str(sd_id), "image_id": str(uuid.uuid4()),
            "volume_id": str(uuid.uuid4()), "cloud_init": config}


def _source_seed_path(root: etree._Element) -> str:
    """``/image_id/volume_id`` of the source's cloud-init seed, or ""."""
    vm = root.find(f"metadata/{{{NAMESPACE}}}vm")
    seed = "" if vm is None else vm.get("seed", "")
    parts = seed.split("/")
    return f"/{parts[1]}/{parts[2]}" if len(parts) == 3 else ""


def _drop_seed(root: etree._Element, seed: str) -> None:
    """Remove the source's cloud-init seed CD-ROM (``sd_id/image_id/volume_id``)."""
    _, image_id, volume_id = [*seed.split("/"), "", "", ""][:3]
    for disk in root.findall("devices/disk[@device='cdrom']"):
        source = disk.find("source")
        path = "" if source is None else source.get("file", "")
        if path.endswith(f"/{image_id}/{volume_id}"):
            disk.getparent().remove(disk)  # type: ignore[union-attr]
