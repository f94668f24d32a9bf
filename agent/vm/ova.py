"""``VM.export``: a stopped VM as an OVA file.

An OVA is a tar (ustar) of an OVF descriptor (:mod:`virtnode.vm.ovf`) first, then a
manifest of the files' SHA-256 digests, then one file per disk: what the disk's chain
shows, as qcow2, or as streamOptimized vmdk for VMware and VirtualBox.

The agent runs as root and the path comes from the client, so an OVA is written only
under the directories of ``storage.export_paths``, judged after every symlink of the
parent directory is resolved, never over an existing file, and with a name ending in
``.ova``. The disks are converted into a private directory beside it, the tar is
written to a hidden temporary file there, made durable, and only then linked under its
name (which fails rather than replace a file that appeared meanwhile); a failed or
cancelled export removes everything it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from virtnode.api_schema.params import VmCreateParams, VmExportParams, VmImportParams
from virtnode.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied
from virtnode.jobs.manager import JobHandle, JobKind, JobManager
from virtnode.storage.images import qemuimg
from virtnode.storage.volumes.service import VolumeService
from virtnode.util.jsontypes import JsonObject
from virtnode.util.safexml import parse_xml
from virtnode.vm import ovf
from virtnode.vm.clones import CloneService, stopped_definition, volume_disks
from virtnode.vm.core import VmCore
from virtnode.vm.snapshots import StorageDirs
from virtnode.vm.spec import check_name

EXPORT_JOB = JobKind("VM.export", cancellable=True)
IMPORT_JOB = JobKind("VM.import", cancellable=True)
#: VM.create, for the imported VM.
Create = Callable[[VmCreateParams], Awaitable[JsonObject]]
#: The share of an export's progress its disks' conversion has; the tar has the rest.
CONVERT_SHARE = 80.0
CHUNK = 1024 * 1024


class OvaService:
    def __init__(self, core: VmCore, jobs: JobManager, volumes: VolumeService | None, *,
                 storage_dirs: StorageDirs, export_paths: Sequence[str],
                 clones: CloneService, create: Create) -> None:
        self._core = core
        self._jobs = jobs
        self._volumes = volumes
        self._storage_dirs = storage_dirs
        self._export_paths = tuple(export_paths)
        self._clones = clones
        self._create = create
        jobs.register(EXPORT_JOB)
        jobs.register(IMPORT_JOB)

    async def export(self, params: VmExportParams) -> JsonObject:
        vm_id, fmt = params["vm_id"], params["disk_format"]
        self._core.require_ready()
        target = export_target(params["path"], self._export_paths)

        async def run(handle: JobHandle) -> JsonObject:
            return await self._export(vm_id, target, fmt, handle)

        job = await self._jobs.submit(
            EXPORT_JOB.name, {k: v for k, v in params.items() if k != "request_key"}, run,
            description=f"export VM {vm_id} to {target}", target=vm_id,
            request_key=params.get("request_key"),
            prepare=lambda: self._core.locks.hold(vm_id, "VM.export"))
        return {"job_id": job.job_id, "job": job.to_api()}

    async def _export(self, vm_id: str, target: Path, fmt: str,
                      handle: JobHandle) -> JsonObject:
        xml = await stopped_definition(self._core, vm_id, "VM.export")
        disks = volume_disks(xml, self._storage_dirs() if self._volumes is not None else {})
        system = ovf.system_of(xml)
        async with _workspace(target) as work:
            files = []
            for index, (dev, ref) in enumerate(disks):
                assert self._volumes is not None  # else no disk is a volume
                chain = await self._volumes.resolve(ref, readonly=True)
                _, found = await self._volumes.core.volume(ref)
                name = f"{system.name}-{dev}.{fmt}"
                part = work / name

                def step(percent: float, index: int = index) -> None:
                    handle.progress((index + percent / 100) / len(disks) * CONVERT_SHARE)
                await qemuimg.convert(
                    qemuimg.Chain(tuple(chain)), part, dst_fmt=fmt,
                    subformat="streamOptimized" if fmt == "vmdk" else None, progress=step)
                size = (await asyncio.to_thread(part.stat)).st_size
                bus = _bus_of(xml, dev)
                system.disks.append(ovf.OvfDisk(dev, bus, found.metadata.virtual_size, name,
                                                size))
                files.append(part)
            descriptor = ovf.descriptor(system, fmt)
            digests = [(f.name, await asyncio.to_thread(_sha256, f)) for f in files]
            ovf_name = f"{system.name}.ovf"
            digests.insert(0, (ovf_name, hashlib.sha256(descriptor).hexdigest()))
            members = [(ovf_name, descriptor), (f"{system.name}.mf", ovf.manifest(digests))]

            loop = asyncio.get_running_loop()

            def tar_step(percent: float) -> None:  # in the writing thread
                loop.call_soon_threadsafe(
                    handle.progress, CONVERT_SHARE + percent * (99 - CONVERT_SHARE) / 100)
            await asyncio.to_thread(_write_ova, target, work, members, files, tar_step)
        return {"path": str(target), "size": (await asyncio.to_thread(target.stat)).st_size,
                "disks": [{"target": d.target, "file": d.file, "capacity": d.capacity}
                          for d in system.disks]}


    # --- import ------------------------------------------------------------------------------

    async def import_ova(self, params: VmImportParams) -> JsonObject:
        """Check an OVA and start the job that imports it (see :meth:`_import`)."""
        self._core.require_ready()
        if self._volumes is None:
            raise FailedPrecondition("volumes are not available here", reason="no_volumes")
        volumes = self._volumes
        src = await asyncio.to_thread(volumes.import_source, params["path"])
        try:
            package = await asyncio.to_thread(ovf.read_package, src)
            system, disks = ovf.read_system(package.descriptor)
            for disk in disks:
                if disk.file not in package.members:
                    raise ovf.Refused(f"the descriptor names {disk.file!r}, which the "
                                      "package does not hold", "missing_file")
        except ovf.Refused as exc:
            raise InvalidArgument(f"{params['path']}: {exc}", reason=exc.reason,
                                  field="path") from None
        name = params.get("name") or system.name
        check_name(name, "name")
        volumes.core.domains.domain(params["sd_id"])  # NotFound before a job

        async def run(handle: JobHandle) -> JsonObject:
            return await self._import(src, package, (system, disks), name=name,
                                      params=params, handle=handle)

        job = await self._jobs.submit(
            IMPORT_JOB.name, {k: v for k, v in params.items() if k != "request_key"}, run,
            description=f"import VM {name} from {params['path']}", target=params["sd_id"],
            request_key=params.get("request_key"))
        return {"job_id": job.job_id, "job": job.to_api()}

    async def _import(self, src: str, package: ovf.Package,
                      read: tuple[ovf.OvfSystem, Sequence[ovf.ImportedDisk]], *, name: str,
                      params: VmImportParams, handle: JobHandle) -> JsonObject:
        """Each disk checked against the manifest, staged, checked as any image from
        outside and converted into a new image; then the VM is defined from what the
        descriptor says. The images are journaled first (as a clone's are): a failed
        or interrupted import leaves none."""
        assert self._volumes is not None
        system, disks = read
        vm_id, sd_id = str(uuid.uuid4()), params["sd_id"]
        plan = [{"sd_id": sd_id, "image_id": str(uuid.uuid4())} for _ in disks]
        await self._clones.journal(vm_id, plan)
        try:
            refs = []
            for index, (disk, place) in enumerate(zip(disks, plan, strict=True)):
                member = package.members[disk.file]
                digest = package.digests.get(disk.file)
                if digest is not None:
                    try:
                        await asyncio.to_thread(ovf.verify_member, src, disk.file, member,
                                                digest)
                    except ovf.Refused as exc:
                        raise InvalidArgument(f"{params['path']}: {exc}", reason=exc.reason,
                                              field="path") from None

                def step(percent: float, index: int = index) -> None:
                    handle.progress(min(99.0, (index + percent / 100) / len(disks) * 95))
                made = (await self._volumes.import_range(
                    sd_id, src, member.offset, member.size, name=disk.file,
                    description=f"disk {index} of VM {name} (imported)",
                    image_id=place["image_id"], progress=step))["volume"]
                refs.append({k: made[k] for k in ("sd_id", "image_id", "volume_id")})
            network = params.get("network")
            spec: JsonObject = {
                "name": name, "uuid": vm_id, "vcpus": system.vcpus,
                "memory_mib": system.memory_mib,
                "firmware": "uefi" if system.firmware == "efi" else "bios",
                "disks": [{"volume": ref, "bus": disk.bus}
                          for ref, disk in zip(refs, disks, strict=True)],
                "nics": [] if network is None else [
                    {**network, "model": nic.model, **({"mac": nic.mac} if nic.mac else {})}
                    for nic in system.nics]}
            if system.machine:
                spec["machine"] = system.machine
            spec.update(system.kernel)  # host paths: VM.create's policy judges them
            if system.domain_type:
                spec["domain_type"] = system.domain_type  # VM.create checks it
            await self._create({"spec": spec, "persistent": True, "start": False})
        except BaseException:
            await asyncio.shield(self._clones.undo(vm_id, plan))
            raise
        await self._clones.unjournal(vm_id)
        return {"vm_id": vm_id, "name": name, "disks": refs,
                "nics_left_out": 0 if params.get("network") else len(system.nics)}


def export_target(path: str, roots: Sequence[str]) -> Path:
    """Where an OVA named by a client may be written: ``path`` ends in ``.ova``, its
    directory (symlinks resolved) is under one of ``roots``, and nothing is there yet.
    Raises InvalidArgument (``invalid_path``), PermissionDenied (``path_not_allowed``),
    AlreadyExists."""
    if not path.startswith("/") or "\0" in path or not path.endswith(".ova"):
        raise InvalidArgument(f"{path!r}: an absolute path ending in .ova, please",
                              reason="invalid_path", field="path")
    name = os.path.basename(path)
    if name in ("", ".ova") or name.startswith("."):
        raise InvalidArgument(f"{path!r}: the file needs a name, not starting with a dot",
                              reason="invalid_path", field="path")
    parent = os.path.realpath(os.path.dirname(path))
    allowed = [os.path.realpath(root) for root in roots]
    if not any(parent == root or parent.startswith(root.rstrip("/") + "/")
               for root in allowed):
        raise PermissionDenied(
            f"{path} is not under a directory of storage.export_paths "
            f"({', '.join(roots) or 'none configured'})", reason="path_not_allowed",
            field="path")
    if not os.path.isdir(parent):
        raise InvalidArgument(f"{os.path.dirname(path)} is not a directory",
                              reason="invalid_path", field="path")
    target = Path(parent) / name
    if os.path.lexists(target):
        raise AlreadyExists(f"{target} exists", reason="file_exists", field="path")
    return target


@contextlib.asynccontextmanager
async def _workspace(target: Path) -> AsyncIterator[Path]:
    """A private directory beside the OVA for its parts, removed at the end."""
    work = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.parts"
    await asyncio.to_thread(work.mkdir, 0o700)
    try:
        yield work
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


def _bus_of(xml: str, target: str) -> str:
    for disk in parse_xml(xml).iterfind("devices/disk/target"):
        if disk.get("dev") == target:
            return disk.get("bus", "virtio")
    return "virtio"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_ova(target: Path, work: Path, members: Sequence[tuple[str, bytes]],
               files: Sequence[Path], progress: Callable[[float], None]) -> None:
    """The tar: ``members`` (name, bytes) first, then ``files``; durable, then linked
    as ``target`` (never over a file)."""
    part = work / "package.ova"
    total = sum(f.stat().st_size for f in files) or 1
    done = 0
    now = time.time()
    with part.open("xb") as out:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), int(now), 0o644
                tar.addfile(info, io.BytesIO(data))
            for file in files:
                info = tarfile.TarInfo(file.name)
                info.size, info.mtime, info.mode = file.stat().st_size, int(now), 0o644
                with file.open("rb") as stream:
                    tar.addfile(info, stream)
                done += info.size
                progress(done / total * 100)
        out.flush()
        os.fsync(out.fileno())
    part.chmod(0o644)
    try:
        os.link(part, target)
    except FileExistsError:
        raise AlreadyExists(f"{target} exists", reason="file_exists", field="path") from None
    fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
