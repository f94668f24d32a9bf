"""VM snapshots over virtnode's own volume chains: ``VM.snapshot``, ``VM.listSnapshots``,
``VM.getSnapshot``.

A snapshot of a disk is a new qcow2 layer in the disk's image over the volume the VM
writes now; from then on the VM writes the layer, and the volume below holds the disk as
it was. On a running VM every chosen disk is switched to its layer at once, by one libvirt
external disk-only snapshot that reuses the layers virtnode made
(``REUSE_EXT | DISK_ONLY | NO_METADATA | ATOMIC``: libvirt keeps no snapshot metadata of
its own), with the guest's filesystems frozen through the guest agent around it when it
is there (``quiesce auto``; ``required`` refuses without it; ``off`` never freezes); the
snapshot records whether it was frozen. On a stopped VM the definition is changed to
the layers. Either way the persistent definition names each disk's whole chain, leaf
first, as VM.create writes it.

The snapshot tree lives in the VM's persistent definition (metadata in its own
namespace), so it goes where the definition goes; each snapshot names, per disk, the
volume that holds the disk as it was (``volume_id``) and the layer made over it
(``layer``).

Crash safety: the operation is written to the state store before any layer is made,
with the snapshot it is to record. At every connection to libvirt the agent settles
each unfinished one by what the VM's definition says: layers the VM uses are adopted
(their parents become internal) and the snapshot recorded; layers it does not use are
removed. Layers are legal once their (empty) data is durable; until they are adopted
their parents stay their images' leaves, which the VM goes on writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from virtnode.api_schema.params import (
    VmDeleteSnapshotParams,
    VmGetSnapshotParams,
    VmListSnapshotsParams,
    VmRevertSnapshotParams,
    VmSnapshotParams,
)
from virtnode.errors import (
    Aborted,
    AlreadyExists,
    ApiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.connection import Hypervisor
from virtnode.hypervisor.handles import Connection, Domain
from virtnode.jobs.manager import JobHandle, JobKind, JobManager
from virtnode.storage.volumes.service import Layers, VolumeService
from virtnode.store import Store, TableSchema, transaction
from virtnode.util.jsontypes import JsonObject
from virtnode.util.safexml import parse_xml
from virtnode.vm import ops as vmops
from virtnode.vm.core import VmCore
from virtnode.vm.guestagent import GuestAgents
from virtnode.vm.spec import check_name

log = logging.getLogger(__name__)

SNAPSHOT_JOB = JobKind("VM.snapshot", cancellable=False)
#: A cancelled delete leaves the snapshot's volumes illegal (their data is part merged)
#: and the snapshot in the tree, until VM.deleteSnapshot is run again.
DELETE_JOB = JobKind("VM.deleteSnapshot", cancellable=True)
NAMESPACE = "https://virtnode.dev/xmlns/snapshots/1"
PREFIX = "virtnodesnap"
#: The longest a snapshot keeps a guest frozen (the freeze ends by itself after it).
FREEZE_TIMEOUT = 60.0
MAX_SNAPSHOTS = 256
#: How often a block commit's progress is read.
COMMIT_POLL = 0.2

_MEMORY_FLAGS = (vc.DOMAIN_SNAPSHOT_CREATE_NO_METADATA | vc.DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                 | vc.DOMAIN_SNAPSHOT_CREATE_ATOMIC)
_CREATE_FLAGS = _MEMORY_FLAGS | vc.DOMAIN_SNAPSHOT_CREATE_DISK_ONLY

COMPONENT = "vm_snapshot_ops"
VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS vm_snapshot_ops (
    op_id     TEXT PRIMARY KEY,
    vm_id     TEXT NOT NULL,
    snapshot  TEXT NOT NULL,
    started   REAL NOT NULL
);
"""
TABLES = TableSchema(COMPONENT, VERSION, SCHEMA)

#: ``{sd_id: images directory}`` of the attached storage domains.
StorageDirs = Callable[[], Mapping[str, str]]


@dataclass
class SnapshotDisk:
    target: str
    sd_id: str
    image_id: str
    volume_id: str  # holds the disk as it was at the snapshot
    layer: str  # the volume the VM wrote after it


@dataclass
class Snapshot:
    snapshot_id: str
    name: str
    description: str
    created: float
    parent: str | None
    vm_state: str  # running | shutoff
    quiesced: bool
    memory: bool
    disks: list[SnapshotDisk] = field(default_factory=list)
    #: ``{sd_id, image_id, volume_id}`` of the volume holding the VM's memory (with memory)
    memory_volume: dict[str, str] | None = None

    def to_api(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Snapshot:
        disks = [SnapshotDisk(**d) for d in raw["disks"]]
        return cls(**{**raw, "disks": disks})


@dataclass
class _Disk:
    """A disk of the VM that is a volume's leaf."""

    target: str
    sd_id: str
    image_id: str
    volume_id: str
    path: str


class _Stopped(Exception):
    """The VM stopped during a block commit."""


class SnapshotService:
    def __init__(self, core: VmCore, guests: GuestAgents, jobs: JobManager,
                 volumes: VolumeService | None, store: Store | None, *,
                 storage_dirs: StorageDirs, merge_bandwidth: int = 0) -> None:
        self._core = core
        self._hv: Hypervisor = core.hypervisor
        self._guests = guests
        self._jobs = jobs
        self._volumes = volumes
        self._store = store
        self._storage_dirs = storage_dirs
        self._merge_bandwidth = merge_bandwidth  # MiB/s, 0: no limit
        self._tasks: set[asyncio.Task[None]] = set()
        jobs.register(SNAPSHOT_JOB)
        jobs.register(DELETE_JOB)

    async def start(self) -> None:
        if self._store is not None:
            await self._store.ensure_schema(COMPONENT, VERSION, SCHEMA)
        self._hv.add_connect_hook(self._settle_unfinished)

    # --- the methods -----------------------------------------------------------------------

    async def snapshot(self, params: VmSnapshotParams) -> JsonObject:
        vm_id, name = params["vm_id"], params["name"]
        check_name(name, "name")
        if params["memory"] and params["quiesce"] == "required":
            raise InvalidArgument("a snapshot with memory keeps the guest whole and is never "
                                  "quiesced; take quiesce auto or off",
                                  reason="quiesce_with_memory", field="quiesce")
        request_key = params.get("request_key")
        self._core.require_ready()

        async def run(handle: JobHandle) -> JsonObject:
            snap = await self._take(vm_id, name, params, handle)
            return {"snapshot_id": snap.snapshot_id, "snapshot": snap.to_api()}

        job = await self._jobs.submit(
            SNAPSHOT_JOB.name, {k: v for k, v in params.items() if k != "request_key"}, run,
            description=f"snapshot {name} of VM {vm_id}", target=vm_id,
            request_key=request_key,
            prepare=lambda: self._hold(vm_id))
        return {"job_id": job.job_id, "job": job.to_api()}

    @contextlib.asynccontextmanager
    async def _hold(self, vm_id: str) -> AsyncIterator[None]:
        """Hold the VM for the job; an unknown VM is NotFound, and no job is made."""
        async with self._core.locks.hold(vm_id, "VM.snapshot"):
            await self._core.on_vm(vm_id, vmops.state_of)
            yield

    async def revert(self, params: VmRevertSnapshotParams) -> JsonObject:
        """Put a stopped VM's disks back as they were at a snapshot: a new layer over each
        of the snapshot's volumes becomes the disk; what the VM wrote since the current
        snapshot and no snapshot holds is removed; the snapshot becomes current."""
        vm_id, snapshot_id = params["vm_id"], params["snapshot_id"]
        self._core.require_ready()
        async with self._hold(vm_id):
            xml, tree, snap = await self._of_stopped_vm(
                vm_id, snapshot_id, "VM.revertSnapshot",
                "a snapshot is reverted on a stopped VM (one with memory starts it again)")
            disks = self._chosen_disks(xml, [d.target for d in snap.disks])
            memory = await self._memory_of(snap)
            held = {d.volume_id for s in tree for d in s.disks}
            op: JsonObject = {
                "op": "revert", "snapshot_id": snapshot_id,
                "disks": [{"target": d.target, "sd_id": d.sd_id, "image_id": d.image_id,
                           "base": s.volume_id, "layer": str(uuid.uuid4()),
                           "old": d.volume_id}
                          for d, s in zip(disks, snap.disks, strict=True)]}
            op_id = str(uuid.uuid4())
            await self._journal_op(op_id, vm_id, op)
            assert self._volumes is not None
            try:
                layers = await self._volumes.add_layers(
                    [{"sd_id": d["sd_id"], "image_id": d["image_id"], "volume_id": d["base"]}
                     for d in op["disks"]], [d["layer"] for d in op["disks"]],
                    description=f"VM {vm_id} reverted to snapshot {snap.name}", branch=True)
            except BaseException:
                await self._unjournal(op_id)
                raise
            try:
                chains = [await self._volumes.resolve(
                    {"sd_id": d["sd_id"], "image_id": d["image_id"], "volume_id": d["layer"]},
                    readonly=False) for d in op["disks"]]
                by_target = {d["target"]: c for d, c in zip(op["disks"], chains, strict=True)}
                await self._hv.call(lambda conn: _define_chains(conn, vm_id, by_target),
                                    what=f"VM.revertSnapshot on {vm_id}")
            except BaseException:
                if not await self._uses_any(vm_id, layers):
                    await self._volumes.drop_layers(layers)
                    await self._unjournal(op_id)
                else:
                    self._settle_soon(op_id, vm_id, op)
                raise
            await self._finish_revert(vm_id, op, held)
            await self._unjournal(op_id)
            if memory is not None:
                await self._restore(vm_id, memory, by_target)
        return {"snapshot_id": snapshot_id,
                "disks": [{"target": d["target"], "sd_id": d["sd_id"],
                           "image_id": d["image_id"], "volume_id": d["layer"]}
                          for d in op["disks"]]}

    async def _memory_of(self, snap: Snapshot) -> str | None:
        """The file holding the memory of a snapshot with memory (which must be legal)."""
        if snap.memory_volume is None:
            return None
        assert self._volumes is not None
        try:
            _, found = await self._volumes.core.volume(snap.memory_volume)
        except NotFound:
            raise FailedPrecondition(
                f"the memory of snapshot {snap.name} (volume "
                f"{snap.memory_volume['volume_id']}) is gone", reason="memory_missing",
                object="snapshot", id=snap.snapshot_id) from None
        if found.metadata.legality != "legal":
            raise FailedPrecondition(f"the memory volume of snapshot {snap.name} is illegal",
                                     reason="volume_illegal", object="volume",
                                     id=found.volume_id)
        return str(found.path)

    async def _restore(self, vm_id: str, memory: str,
                       chains: Mapping[str, Sequence[tuple[str, str]]]) -> None:
        """Start the VM from the memory saved at a snapshot, on the disks' new layers."""
        def restore(conn: Connection) -> None:
            root = parse_xml(conn.saveImageGetXMLDesc(memory, vc.DOMAIN_SAVE_IMAGE_XML_SECURE))
            set_chains(root, chains)
            metadata = root.find("metadata")
            for stale in root.iterfind(f"metadata/{{{NAMESPACE}}}snapshots"):
                assert metadata is not None
                metadata.remove(stale)  # the tree of that moment; the VM's is newer
            conn.restoreFlags(memory, etree.tostring(root, encoding="unicode"),
                              vc.DOMAIN_SAVE_RUNNING)
        try:
            await self._hv.call(restore, what=f"VM.revertSnapshot on {vm_id}")
        except ApiError as exc:
            raise FailedPrecondition(
                f"the disks were reverted, but the VM could not be started from the "
                f"snapshot's memory: {exc.message}; it is stopped, and starts from the "
                "reverted disks", reason="restore_failed", object="vm", id=vm_id) from None

    async def _finish_revert(self, vm_id: str, op: Mapping[str, Any], held: set[str]) -> None:
        """Remove what the VM wrote since its current snapshot that no snapshot holds (the
        layers it used before the revert), and make the snapshot current."""
        assert self._volumes is not None
        stale: Layers = []
        for disk in op["disks"]:
            if disk["old"] in held or disk["old"] == disk["base"]:
                continue
            try:
                stale.append(await self._volumes.core.volume(
                    {"sd_id": disk["sd_id"], "image_id": disk["image_id"],
                     "volume_id": disk["old"]}))
            except NotFound:
                continue  # removed already
        if stale:
            await self._volumes.drop_layers(stale)
        snapshot_id = op["snapshot_id"]
        layers = {d["target"]: d["layer"] for d in op["disks"]}

        def record(dom: Domain) -> None:
            _, tree = read_tree(dom.XMLDesc(vc.DOMAIN_XML_INACTIVE))
            for snap in tree:
                if snap.snapshot_id == snapshot_id:  # what comes after it is the new layer
                    for disk in snap.disks:
                        disk.layer = layers.get(disk.target, disk.layer)
            _write_tree(dom, snapshot_id, tree)

        await self._core.on_vm(vm_id, record, what="recording the current snapshot")

    async def delete(self, params: VmDeleteSnapshotParams) -> JsonObject:
        vm_id, snapshot_id = params["vm_id"], params["snapshot_id"]
        self._core.require_ready()
        _find((await self._tree(vm_id))[1], vm_id, snapshot_id)  # NotFound before a job

        async def run(handle: JobHandle) -> JsonObject:
            await self._delete(vm_id, snapshot_id, handle)
            return {"snapshot_id": snapshot_id}

        job = await self._jobs.submit(
            DELETE_JOB.name, {k: v for k, v in params.items() if k != "request_key"}, run,
            description=f"delete snapshot {snapshot_id} of VM {vm_id}", target=vm_id,
            request_key=params.get("request_key"), prepare=lambda: self._hold(vm_id))
        return {"job_id": job.job_id, "job": job.to_api()}

    async def _delete(self, vm_id: str, snapshot_id: str, handle: JobHandle) -> None:
        """Fold each disk's layer made at the snapshot into the snapshot's volume, which
        then holds what the layer held; the snapshot leaves the tree. Live (a block
        commit) on a running VM, with qemu-img on a stopped one."""
        snap = _find((await self._tree(vm_id))[1], vm_id, snapshot_id)
        op: JsonObject = {"op": "delete", "snapshot_id": snapshot_id, "disks": [
            {"target": d.target, "sd_id": d.sd_id, "image_id": d.image_id,
             "base": d.volume_id, "top": d.layer} for d in snap.disks],
            "memory": snap.memory_volume}
        op_id = str(uuid.uuid4())
        await self._journal_op(op_id, vm_id, op)
        try:
            await self._fold(vm_id, op, handle)
        except asyncio.CancelledError:
            if handle.cancel_requested:  # else the agent stops: settled when it starts
                await asyncio.shield(self._unjournal(op_id))
            raise
        await self._unjournal(op_id)

    async def _of_stopped_vm(self, vm_id: str, snapshot_id: str, method: str, why: str
                             ) -> tuple[str, list[Snapshot], Snapshot]:
        """The VM's definition, its tree and the snapshot ``snapshot_id``; NotFound for
        an unknown snapshot, FailedPrecondition ``vm_running`` (``why``) unless stopped."""
        xml, state, _persistent = await self._core.on_vm(vm_id, _read, what=method)
        _current, tree = read_tree(xml)
        snap = _find(tree, vm_id, snapshot_id)
        if state not in ("defined", "shutoff", "crashed"):
            raise FailedPrecondition(f"the VM is {state}: {why}; shut it down first",
                                     reason="vm_running", object="vm", id=vm_id)
        return xml, tree, snap

    async def _fold(self, vm_id: str, op: Mapping[str, Any],
                    handle: JobHandle | None = None) -> None:
        """The steps of a delete, each of which may be run again after a crash."""
        assert self._volumes is not None
        disks = op["disks"]
        gone = []
        for index, disk in enumerate(disks):
            ref = {"sd_id": disk["sd_id"], "image_id": disk["image_id"],
                   "volume_id": disk["top"]}
            try:
                await self._volumes.core.volume(ref, data=False)
            except NotFound:
                gone.append(disk)  # folded already, or a layer a revert left behind
                continue

            def step(percent: float, index: int = index) -> None:
                if handle is not None:
                    handle.progress(min(99.0, (index + percent / 100) / len(disks) * 100))
            await self._fold_disk(vm_id, disk, ref, step, handle)
        # The definition names each disk's chain as it is now; the tree forgets the
        # snapshot, and what named its layer names the volume it was folded into.
        folded = {d["top"]: d["base"] for d in disks}
        chains = {}
        leaves = leaves_of(await self._core.on_vm(
            vm_id, lambda dom: dom.XMLDesc(vc.DOMAIN_XML_INACTIVE)))
        for disk in disks:
            leaf = leaves.get(disk["target"])
            if leaf is None:
                continue
            leaf = folded.get(leaf, leaf)
            chains[disk["target"]] = await self._volumes.resolve(
                {"sd_id": disk["sd_id"], "image_id": disk["image_id"], "volume_id": leaf},
                readonly=False)
        await self._hv.call(lambda conn: _define_chains(conn, vm_id, chains),
                            what=f"VM.deleteSnapshot on {vm_id}")
        snapshot_id = op["snapshot_id"]

        def record(dom: Domain) -> None:
            current, tree = read_tree(dom.XMLDesc(vc.DOMAIN_XML_INACTIVE))
            gone = next((s for s in tree if s.snapshot_id == snapshot_id), None)
            if gone is None:
                return
            kept = [s for s in tree if s.snapshot_id != snapshot_id]
            for snap in kept:
                if snap.parent == snapshot_id:
                    snap.parent = gone.parent
                for disk in snap.disks:
                    disk.volume_id = folded.get(disk.volume_id, disk.volume_id)
            _write_tree(dom, gone.parent if current == snapshot_id else current, kept)

        await self._core.on_vm(vm_id, record, what="recording the snapshots")
        # A snapshot's volume without its layer (the VM left that branch by a revert) is
        # needed by nothing once no other snapshot names it.
        held = {d.volume_id for s in (await self._tree(vm_id))[1] for d in s.disks}
        for disk in gone:
            if disk["base"] not in held:
                await self._volumes.drop_unused({"sd_id": disk["sd_id"],
                                                 "image_id": disk["image_id"],
                                                 "volume_id": disk["base"]})
        if op.get("memory"):
            with contextlib.suppress(NotFound):
                await self._volumes.drop_layers([await self._volumes.core.volume(op["memory"])])

    async def _fold_disk(self, vm_id: str, disk: Mapping[str, Any], ref: JsonObject,
                         progress: Callable[[float], None], handle: JobHandle | None) -> None:
        """Fold one disk's layer into the snapshot's volume: by a block commit of the VM
        when it runs on them (an active commit and a pivot when the layer is what it
        writes), else with qemu-img. A block commit left running by an agent that
        stopped is waited for; one that QEMU finished is only recorded."""
        assert self._volumes is not None
        _, top = await self._volumes.core.volume(ref)
        _, base = await self._volumes.core.volume({**ref, "volume_id": disk["base"]})
        live = await self._core.on_vm(vm_id, lambda dom: _live_chain(dom, disk["target"]),
                                      what="reading the VM's disks")
        if live is None or not {str(top.path), str(base.path)} & set(live):
            await self._volumes.fold_layer(ref, progress=progress)
            return
        async with self._volumes.folding(ref, live=True) as fold:
            if str(top.path) in live:
                try:
                    await self._block_commit(
                        vm_id, disk["target"], str(base.path), str(top.path),
                        active=live[0] == str(top.path), progress=progress, handle=handle)
                except _Stopped:
                    log.info("VM %s stopped during the merge of disk %s; finishing it "
                             "with qemu-img", vm_id, disk["target"])
                    await self._volumes.commit_fold(fold, progress)
                    await self._volumes.finish_fold(fold, rebase=True)
                    return
            await self._volumes.finish_fold(fold, rebase=False)

    async def _block_commit(self, vm_id: str, target: str, base: str, top: str, *,
                            active: bool, progress: Callable[[float], None],
                            handle: JobHandle | None) -> None:
        """Commit ``top`` into ``base`` in the running VM (the disk's backing names stay
        relative), and pivot to ``base`` when ``top`` is what it writes. Raises _Stopped
        when the VM stops meanwhile; Aborted when QEMU ends the job unfinished."""
        flags = vc.DOMAIN_BLOCK_COMMIT_RELATIVE | (vc.DOMAIN_BLOCK_COMMIT_ACTIVE if active
                                                   else 0)

        def start(dom: Domain) -> bool:
            if not dom.isActive():
                return False
            if not dom.blockJobInfo(target, 0):  # else one left by an agent that stopped
                dom.blockCommit(target, base, top, self._merge_bandwidth, flags)
            return True

        if not await self._core.on_vm(vm_id, start, what="VM.deleteSnapshot"):
            raise _Stopped
        try:
            while True:
                state, done = await self._core.on_vm(
                    vm_id, lambda dom: _commit_state(dom, target, top),
                    what="following the merge")
                if state == "stopped":
                    raise _Stopped
                if state == "finished":
                    return
                if state == "ended":
                    raise Aborted(f"QEMU ended the merge of disk {target} before it "
                                  "finished; run VM.deleteSnapshot again",
                                  reason="merge_failed", object="vm", id=vm_id)
                progress(done * 100)
                if state == "ready":
                    await self._core.on_vm(vm_id, lambda dom: dom.blockJobAbort(
                        target, vc.DOMAIN_BLOCK_JOB_ABORT_PIVOT), what="pivoting the disk")
                    continue
                await asyncio.sleep(COMMIT_POLL)
        except asyncio.CancelledError:
            if handle is not None and handle.cancel_requested:
                with contextlib.suppress(ApiError):
                    await asyncio.shield(self._core.on_vm(
                        vm_id, lambda dom: dom.blockJobAbort(target, 0),
                        what="cancelling the merge"))
            raise

    async def list_snapshots(self, params: VmListSnapshotsParams) -> JsonObject:
        current, snaps = await self._tree(params["vm_id"])
        return {"current": current, "snapshots": [s.to_api() for s in snaps]}

    async def get_snapshot(self, params: VmGetSnapshotParams) -> JsonObject:
        current, snaps = await self._tree(params["vm_id"])
        snap = _find(snaps, params["vm_id"], params["snapshot_id"])
        return {"snapshot": snap.to_api(), "current": current == snap.snapshot_id}

    # --- taking one ------------------------------------------------------------------------

    async def _take(self, vm_id: str, name: str, params: VmSnapshotParams,
                    handle: JobHandle) -> Snapshot:
        description, targets = params.get("description", ""), params.get("disks")
        quiesce = params["quiesce"]
        xml, state, persistent = await self._core.on_vm(vm_id, _read, what="VM.snapshot")
        if not persistent:
            raise FailedPrecondition("a transient VM has no definition to keep snapshots in",
                                     reason="not_persistent", object="vm", id=vm_id)
        if state not in ("running", "defined", "shutoff", "crashed"):
            raise FailedPrecondition(f"a VM {state} cannot be snapshot; resume it, or wait "
                                     "until it runs or is stopped", reason="invalid_state",
                                     object="vm", id=vm_id)
        running = state == "running"
        current, tree = read_tree(xml)
        if any(s.name == name for s in tree):
            raise AlreadyExists(f"VM {vm_id} has a snapshot named {name}",
                                reason="exists", object="snapshot", field="name")
        if len(tree) >= MAX_SNAPSHOTS:
            raise FailedPrecondition(f"VM {vm_id} has {len(tree)} snapshots already; "
                                     "delete some first", reason="too_many_snapshots",
                                     object="vm", id=vm_id)
        memory = params["memory"]
        if memory and not running:
            raise FailedPrecondition(f"the VM is {state}: a snapshot with memory is taken of "
                                     "a running VM", reason="vm_not_running", object="vm",
                                     id=vm_id)
        disks = self._chosen_disks(xml, targets)
        freeze = (running and not memory and quiesce != "off"
                  and self._guests.connected(vm_id))
        if running and quiesce == "required" and not freeze:
            self._guests.require_connected(vm_id, "a snapshot with quiesce required")
        snap = Snapshot(str(uuid.uuid4()), name, description, round(time.time(), 3), current,
                        "running" if running else "shutoff", quiesced=False, memory=memory)
        op_id = snap.snapshot_id
        assert self._volumes is not None  # else no disk is a volume
        snap.disks = [SnapshotDisk(d.target, d.sd_id, d.image_id, d.volume_id,
                                   str(uuid.uuid4())) for d in disks]
        if memory:  # in the first disk's storage domain
            snap.memory_volume = {"sd_id": disks[0].sd_id, "image_id": str(uuid.uuid4()),
                                  "volume_id": str(uuid.uuid4())}
        layers, memory_volume = await self._make_volumes(vm_id, snap, disks, xml)
        handle.progress(30)
        try:
            chains = [await self._volumes.resolve(
                {"sd_id": d.sd_id, "image_id": d.image_id, "volume_id": d.layer},
                readonly=False) for d in snap.disks]
            if running:
                snap.quiesced = await self._switch_live(
                    vm_id, disks, layers, freeze, required=quiesce == "required",
                    memory=str(memory_volume[0][1].path) if memory_volume else None)
            handle.progress(70)
            by_target = {d.target: c for d, c in zip(disks, chains, strict=True)}
            await self._hv.call(lambda conn: _define_chains(conn, vm_id, by_target),
                                what=f"VM.snapshot on {vm_id}")
        except BaseException:
            if not await self._uses_any(vm_id, layers):
                await self._volumes.drop_layers(layers + memory_volume)
                await self._unjournal(op_id)
            else:  # switched, not recorded: settled once this call lets go of the VM
                self._settle_soon(op_id, vm_id, snap.to_api())
            raise
        if memory_volume:
            await self._volumes.seal_memory_volume(memory_volume[0])
        await self._finish(vm_id, snap, layers)
        await self._unjournal(op_id)
        return snap

    async def _make_volumes(self, vm_id: str, snap: Snapshot, disks: Sequence[_Disk],
                            xml: str) -> tuple[Layers, Layers]:
        """Journal the snapshot, then make its layers and its memory volume (if any)."""
        assert self._volumes is not None  # else no disk is a volume
        # The journal first: from here a crash is settled by what the VM's definition says.
        await self._journal(snap.snapshot_id, vm_id, snap)
        try:
            layers = await self._volumes.add_layers(
                [{"sd_id": d.sd_id, "image_id": d.image_id, "volume_id": d.volume_id}
                 for d in disks], [d.layer for d in snap.disks],
                description=f"snapshot {snap.name} of VM {vm_id}")
            if snap.memory_volume is None:
                return layers, []
            try:
                return layers, [await self._volumes.add_memory_volume(
                    **snap.memory_volume, size=_memory_image_size(xml),
                    description=f"memory of VM {vm_id} at snapshot {snap.name}")]
            except BaseException:
                await self._volumes.drop_layers(layers)
                raise
        except BaseException:
            await self._unjournal(snap.snapshot_id)  # what was made is removed
            raise

    def _chosen_disks(self, xml: str, targets: Sequence[str] | None) -> list[_Disk]:
        root = parse_xml(xml)
        by_target = {}
        for disk in root.iterfind("devices/disk[@device='disk']"):
            target = disk.find("target")
            if target is None or disk.find("readonly") is not None:
                continue
            by_target[target.get("dev", "")] = disk
        if targets is not None:
            unknown = [t for t in targets if t not in by_target]
            if unknown:
                raise InvalidArgument(f"the VM has no writable disk {unknown[0]}",
                                      reason="no_such_disk", field="disks")
            wanted = list(dict.fromkeys(targets))
        else:
            wanted = sorted(by_target)
        if not wanted:
            raise FailedPrecondition("the VM has no writable disk to snapshot",
                                     reason="no_disks", object="vm")
        dirs = self._storage_dirs() if self._volumes is not None else {}
        chosen = []
        for dev in wanted:
            source = by_target[dev].find("source")
            path = "" if source is None else source.get("file", "")
            ref = volume_of(path, dirs)
            if ref is None:
                raise FailedPrecondition(
                    f"disk {dev} ({path or 'no file'}) is not a volume of a storage domain "
                    "attached here; only volumes can be snapshot (leave it out with disks)",
                    reason="not_a_volume", object="vm", field="disks")
            chosen.append(_Disk(dev, *ref, path))
        return chosen

    async def _switch_live(self, vm_id: str, disks: Sequence[_Disk], layers: Layers,
                           freeze: bool, *, required: bool, memory: str | None) -> bool:
        """Switch the running VM's disks to the layers at once; whether the guest was
        frozen meanwhile. A freeze that fails is a failure only when ``required``. With
        ``memory``, libvirt pauses the guest, writes its memory into that file, switches
        the disks and lets the guest run on."""
        snapshot_xml = _snapshot_xml(
            {d.target: str(layer.path) for d, (_, layer) in zip(disks, layers, strict=True)},
            await self._core.on_vm(vm_id, lambda dom: dom.XMLDesc(0)), memory)
        flags = _CREATE_FLAGS if memory is None else _MEMORY_FLAGS
        frozen_here = False
        quiesced = False
        if freeze:
            if self._guests.section(vm_id)["frozen"]:
                quiesced = True  # frozen by its owner already: the disks are consistent
            else:
                try:
                    await self._guests.freeze(vm_id, [], FREEZE_TIMEOUT)
                    frozen_here = quiesced = True
                except ApiError as exc:
                    if required:
                        raise
                    log.warning("VM %s: snapshot without freezing the guest: %s", vm_id, exc)
        try:
            await self._core.on_vm(vm_id, lambda dom: dom.snapshotCreateXML(
                snapshot_xml, flags), what="VM.snapshot")
        finally:
            if frozen_here:
                try:
                    await self._guests.thaw(vm_id, reason="snapshot")
                except ApiError as exc:  # the freeze's own timeout ends it
                    log.warning("VM %s: thawing after the snapshot failed: %s", vm_id, exc)
        return quiesced

    async def _finish(self, vm_id: str, snap: Snapshot, layers: Layers) -> None:
        assert self._volumes is not None
        await self._volumes.adopt_layers(layers)

        def record(dom: Domain) -> None:
            _, tree = read_tree(dom.XMLDesc(vc.DOMAIN_XML_INACTIVE))
            if all(s.snapshot_id != snap.snapshot_id for s in tree):
                tree.append(snap)
            _write_tree(dom, snap.snapshot_id, tree)

        await self._core.on_vm(vm_id, record, what="recording the snapshot")

    async def _uses_any(self, vm_id: str, layers: Layers) -> bool:
        paths = {str(layer.path) for _, layer in layers}
        try:
            used = await self._core.on_vm(vm_id, _disk_paths, what="reading the VM's disks")
        except ApiError:
            return False
        return bool(paths & used)

    # --- the journal -------------------------------------------------------------------------

    async def _journal(self, op_id: str, vm_id: str, snap: Snapshot) -> None:
        await self._journal_op(op_id, vm_id, snap.to_api())

    async def _journal_op(self, op_id: str, vm_id: str, op: JsonObject) -> None:
        if self._store is None:
            return
        record = json.dumps(op)

        def save(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute("INSERT INTO vm_snapshot_ops (op_id, vm_id, snapshot, started) "
                             "VALUES (?, ?, ?, ?)", (op_id, vm_id, record, time.time()))
        await self._store.run(save)

    async def _unjournal(self, op_id: str) -> None:
        if self._store is None:
            return

        def delete(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute("DELETE FROM vm_snapshot_ops WHERE op_id = ?", (op_id,))
        await self._store.run(delete)

    async def _settle_unfinished(self, _conn: Connection) -> None:
        """Settle the snapshots a crash interrupted (see the module's documentation)."""
        if self._store is None or self._volumes is None:
            return

        def load(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
            return list(conn.execute("SELECT op_id, vm_id, snapshot FROM vm_snapshot_ops "
                                     "ORDER BY started"))
        for op_id, vm_id, raw in await self._store.run(load):
            self._settle_soon(op_id, vm_id, json.loads(raw))

    def _settle_soon(self, op_id: str, vm_id: str, op: JsonObject) -> None:
        """Settle an operation in a task of its own (it waits for the VM's lock)."""
        task = asyncio.get_running_loop().create_task(
            self._settle(op_id, vm_id, json.dumps(op)), name=f"settle snapshot {op_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, op_id: str, vm_id: str, raw: str) -> None:
        assert self._volumes is not None
        try:
            op = json.loads(raw)
            if op.get("op") == "revert":
                await self._settle_revert(op_id, vm_id, op)
                return
            if op.get("op") == "delete":
                async with self._core.locks.hold(vm_id, "VM.deleteSnapshot"):
                    await self._fold(vm_id, op)
                log.warning("VM %s: deleting snapshot %s was interrupted; finished", vm_id,
                            op["snapshot_id"])
                await self._unjournal(op_id)
                return
            snap = Snapshot.from_json(op)
            layers: Layers = []
            for disk in snap.disks:
                try:
                    layers.append(await self._volumes.core.volume(
                        {"sd_id": disk.sd_id, "image_id": disk.image_id,
                         "volume_id": disk.layer}))
                except NotFound:
                    continue  # never made, or removed already
            memory: Layers = []
            if snap.memory_volume is not None:
                with contextlib.suppress(NotFound):
                    memory.append(await self._volumes.core.volume(snap.memory_volume))
            async with self._core.locks.hold(vm_id, "VM.snapshot"):
                try:
                    used = await self._core.on_vm(vm_id, _disk_paths)
                except NotFound:
                    used = set()
                adopted = [(d, f) for d, f in layers if str(f.path) in used]
                unused = [(d, f) for d, f in layers if str(f.path) not in used]
                if unused:
                    await self._volumes.drop_layers(unused)
                if adopted:  # libvirt switched the disks after it wrote the memory
                    if memory:
                        await self._volumes.seal_memory_volume(memory[0])
                    await self._finish(vm_id, snap, adopted)
                elif memory:
                    await self._volumes.drop_layers(memory)
            log.warning("VM %s: snapshot %s was interrupted; %s", vm_id, snap.name,
                        "finished" if adopted else "undone")
            await self._unjournal(op_id)
        except Exception:
            log.exception("VM %s: cannot settle the interrupted snapshot %s", vm_id, op_id)

    async def _settle_revert(self, op_id: str, vm_id: str, op: Mapping[str, Any]) -> None:
        """A revert is finished if the VM uses the new layers, else undone."""
        assert self._volumes is not None
        layers: Layers = []
        for disk in op["disks"]:
            try:
                layers.append(await self._volumes.core.volume(
                    {"sd_id": disk["sd_id"], "image_id": disk["image_id"],
                     "volume_id": disk["layer"]}))
            except NotFound:
                continue
        async with self._core.locks.hold(vm_id, "VM.revertSnapshot"):
            try:
                used = await self._core.on_vm(vm_id, _disk_paths)
                xml = await self._core.on_vm(
                    vm_id, lambda dom: dom.XMLDesc(vc.DOMAIN_XML_INACTIVE))
            except NotFound:
                used, xml = set(), "<domain/>"
            if layers and all(str(f.path) in used for _, f in layers):
                _, tree = read_tree(xml)
                await self._finish_revert(vm_id, op, {d.volume_id for s in tree
                                                      for d in s.disks})
                outcome = "finished"
            else:
                await self._volumes.drop_layers([(d, f) for d, f in layers
                                                 if str(f.path) not in used])
                outcome = "undone"
        log.warning("VM %s: a revert to snapshot %s was interrupted; %s", vm_id,
                    op["snapshot_id"], outcome)
        await self._unjournal(op_id)

    async def _tree(self, vm_id: str) -> tuple[str | None, list[Snapshot]]:
        xml = await self._core.on_vm(vm_id, lambda dom: dom.XMLDesc(vc.DOMAIN_XML_INACTIVE),
                                     what="reading the snapshots")
        return read_tree(xml)


# --- in the libvirt pool -------------------------------------------------------------------


def _read(dom: Domain) -> tuple[str, str, bool]:
    state, _ = vmops.state_of(dom)
    flags = vc.DOMAIN_XML_INACTIVE if dom.isPersistent() else 0
    return dom.XMLDesc(flags), state, bool(dom.isPersistent())


def _disk_paths(dom: Domain) -> set[str]:
    """Every disk source of the VM, live and as defined."""
    paths = set()
    sources = [dom.XMLDesc(0)]
    if dom.isPersistent():
        sources.append(dom.XMLDesc(vc.DOMAIN_XML_INACTIVE))
    for xml in sources:
        for source in parse_xml(xml).iterfind("devices/disk/source"):
            if source.get("file"):
                paths.add(source.get("file", ""))
    return paths


def _live_chain(dom: Domain, target: str) -> list[str] | None:
    """The files of a running VM's disk ``target``, the one it writes first; None when
    the VM is not running."""
    if not dom.isActive():
        return None
    return _chain_in(parse_xml(dom.XMLDesc(0)), target)


def _commit_state(dom: Domain, target: str, top: str) -> tuple[str, float]:
    """Where a block commit of ``top`` stands: stopped (the VM), finished (``top`` has
    left the disk's chain), ended (no job, ``top`` still there), ready (to pivot) or
    running; and the part done."""
    if not dom.isActive():
        return "stopped", 0.0
    info = dom.blockJobInfo(target, 0)
    if not info:
        return ("ended" if top in _chain_in(parse_xml(dom.XMLDesc(0)), target)
                else "finished"), 1.0
    cur, end = int(info.get("cur", 0)), int(info.get("end", 0))
    done = cur / end if end else 0.0
    if end and cur == end:
        for disk in parse_xml(dom.XMLDesc(0)).iterfind("devices/disk"):
            element = disk.find("target")
            mirror = disk.find("mirror")
            if (element is not None and element.get("dev") == target
                    and mirror is not None and mirror.get("ready") == "yes"):
                return "ready", done
    return "running", done


def _define_chains(conn: Connection, vm_id: str,
                   chains: Mapping[str, Sequence[tuple[str, str]]]) -> None:
    """Rewrite the persistent definition's disks ``chains`` names (by target) with their
    chains, leaf first, ending with an empty ``<backingStore/>`` as VM.create writes it."""
    dom = vmops.lookup(conn, vm_id)
    root = parse_xml(dom.XMLDesc(vc.DOMAIN_XML_INACTIVE | vc.DOMAIN_XML_SECURE))
    if all(_chain_in(root, target) == [p for p, _ in chain]
           for target, chain in chains.items()):
        return  # libvirt's external snapshot changed the definition so already
    set_chains(root, chains)
    conn.defineXMLFlags(etree.tostring(root, encoding="unicode"), vc.DOMAIN_DEFINE_VALIDATE)


def _chain_in(root: etree._Element, target: str) -> list[str]:
    """The files of the disk ``target`` in a domain's XML, its source first."""
    for disk in root.iterfind("devices/disk"):
        element = disk.find("target")
        if element is not None and element.get("dev") == target:
            return [s.get("file", "") for s in disk.iter("source") if s.get("file")]
    return []


def set_chains(root: etree._Element, chains: Mapping[str, Sequence[tuple[str, str]]]) -> None:
    """Give the disks of a domain's XML ``chains`` names (by target) those chains."""
    for disk in root.iterfind("devices/disk[@device='disk']"):
        target = disk.find("target")
        chain = chains.get("" if target is None else target.get("dev", ""))
        if not chain:
            continue
        for old in disk.findall("backingStore"):
            disk.remove(old)
        driver = disk.find("driver")
        if driver is not None:
            driver.set("type", chain[0][1])
        source = disk.find("source")
        assert source is not None
        source.attrib.clear()
        source.set("file", chain[0][0])
        below = etree.Element("backingStore")
        top = below
        for path, fmt in chain[1:]:
            below.set("type", "file")
            etree.SubElement(below, "format", type=fmt)
            etree.SubElement(below, "source", file=path)
            below = etree.SubElement(below, "backingStore")
        source.addnext(top)


def _memory_image_size(xml: str) -> int:
    """The most a save image of the VM takes: its memory, and room for its devices' state
    and definition."""
    memory = parse_xml(xml).find("memory")
    kib = int(memory.text or 0) if memory is not None and memory.get("unit", "KiB") == "KiB" \
        else 0
    return kib * 1024 + kib * 1024 // 8 + 64 * 1024 * 1024


def _snapshot_xml(layers: Mapping[str, str], live_xml: str, memory: str | None) -> str:
    """An external snapshot onto ``layers`` (by target), every other disk 'no'; with the
    memory into the file ``memory``, else disk-only."""
    root = etree.Element("domainsnapshot")
    if memory is not None:
        etree.SubElement(root, "memory", snapshot="external", file=memory)
    disks = etree.SubElement(root, "disks")
    for disk in parse_xml(live_xml).iterfind("devices/disk"):
        target = disk.find("target")
        dev = "" if target is None else target.get("dev", "")
        if dev in layers:
            element = etree.SubElement(disks, "disk", name=dev, snapshot="external",
                                       type="file")
            etree.SubElement(element, "driver", type="qcow2")
            etree.SubElement(element, "source", file=layers[dev])
        elif dev:
            etree.SubElement(disks, "disk", name=dev, snapshot="no")
    return etree.tostring(root, encoding="unicode")


def _write_tree(dom: Domain, current: str | None, tree: Sequence[Snapshot]) -> None:
    root = etree.Element("snapshots")
    if current is not None:
        root.set("current", current)
    for snap in tree:
        element = etree.SubElement(root, "snapshot", id=snap.snapshot_id, name=snap.name,
                                   created=f"{snap.created:.3f}", vm_state=snap.vm_state,
                                   quiesced="yes" if snap.quiesced else "no",
                                   memory="yes" if snap.memory else "no")
        if snap.parent is not None:
            element.set("parent", snap.parent)
        if snap.description:
            etree.SubElement(element, "description").text = snap.description
        for disk in snap.disks:
            etree.SubElement(element, "disk", target=disk.target, sd_id=disk.sd_id,
                             image_id=disk.image_id, volume_id=disk.volume_id,
                             layer=disk.layer)
        if snap.memory_volume is not None:
            etree.SubElement(element, "memory", attrib=snap.memory_volume)
    dom.setMetadata(vc.DOMAIN_METADATA_ELEMENT, etree.tostring(root, encoding="unicode"),
                    PREFIX, NAMESPACE, vc.DOMAIN_AFFECT_CONFIG)


def read_tree(xml: str) -> tuple[str | None, list[Snapshot]]:
    """The current snapshot and every snapshot recorded in a domain's XML."""
    element = parse_xml(xml).find(f"metadata/{{{NAMESPACE}}}snapshots")
    if element is None:
        return None, []
    snaps = []
    for item in element.iterfind(f"{{{NAMESPACE}}}snapshot"):
        try:
            snaps.append(Snapshot(
                snapshot_id=item.get("id", ""), name=item.get("name", ""),
                description=item.findtext(f"{{{NAMESPACE}}}description") or "",
                created=float(item.get("created", "0")), parent=item.get("parent"),
                vm_state=item.get("vm_state", "shutoff"),
                quiesced=item.get("quiesced") == "yes", memory=item.get("memory") == "yes",
                disks=[SnapshotDisk(d.get("target", ""), d.get("sd_id", ""),
                                    d.get("image_id", ""), d.get("volume_id", ""),
                                    d.get("layer", ""))
                       for d in item.iterfind(f"{{{NAMESPACE}}}disk")],
                memory_volume=_memory_ref(item.find(f"{{{NAMESPACE}}}memory"))))
        except ValueError:
            log.warning("a snapshot record of the VM is damaged: %s",
                        etree.tostring(item, encoding="unicode"))
    return element.get("current"), snaps


def _memory_ref(element: etree._Element | None) -> dict[str, str] | None:
    if element is None:
        return None
    return {key: element.get(key, "") for key in ("sd_id", "image_id", "volume_id")}


def leaves_of(xml: str) -> dict[str, str]:
    """The file name (a volume's id) each disk of a domain writes, by device name."""
    leaves = {}
    for disk in parse_xml(xml).iterfind("devices/disk[@device='disk']"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None and source is not None and source.get("file"):
            leaves[target.get("dev", "")] = Path(source.get("file", "")).name
    return leaves


def _find(tree: Sequence[Snapshot], vm_id: str, snapshot_id: str) -> Snapshot:
    for snap in tree:
        if snap.snapshot_id == snapshot_id:
            return snap
    raise NotFound(f"VM {vm_id} has no snapshot {snapshot_id}", reason="not_found",
                   object="snapshot", id=snapshot_id)


def volume_of(path: str, dirs: Mapping[str, str]) -> tuple[str, str, str] | None:
    """``(sd_id, image_id, volume_id)`` of a volume's data file, by the domains' image
    directories; None for a file that is no volume of theirs."""
    file = Path(path)
    for sd_id, images in dirs.items():
        if file.parent.parent == Path(images) and file.name and file.parent.name:
            return sd_id, file.parent.name, file.name
    return None
