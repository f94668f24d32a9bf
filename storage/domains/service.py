"""``StorageDomain.*``: create, attach, detach, list, inspect and delete storage domains.

A domain is a directory ``<root>/<sd_id>/`` laid out as :mod:`virtnode.storage.layout`
says. ``localfs`` roots are local directories; ``posixfs`` roots are filesystems the
agent mounts itself at ``<storage.mount_root>/<sd_id>``. Attached domains are recorded in
the state store and attached again (re-mounted) when the agent starts; a domain that
cannot be attached again stays listed with its ``error`` and ``unreachable``, so it can be
attached again or detached.

QEMU runs as its own user (:mod:`virtnode.storage.domains.access`): create and attach refuse a
domain that user cannot reach (FailedPrecondition ``not_accessible``), and the directories
the agent makes for a domain are searchable by everyone.

Deleting and detaching a domain hold it exclusive against the calls and jobs on its
volumes (:mod:`virtnode.storage.domains.gate`): a delete with ``force`` cancels the jobs,
anything else waits for the calls and refuses while jobs run (``domain_busy``).

Mutating calls are serialised by one lock (they are rare, and it makes the checks for
duplicate ids and names exact). Storage I/O runs in a pool of daemon threads with a
deadline (``storage.io_timeout``), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from virtnode.api_schema.params import (
    StorageDomainAttachParams,
    StorageDomainCreateParams,
    StorageDomainDeleteParams,
    StorageDomainDetachParams,
    StorageDomainGetInfoParams,
)
from virtnode.config import StorageConfig
from virtnode.errors import (
    AlreadyExists,
    ApiError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from virtnode.events.bus import EventBus
from virtnode.storage import layout as lay
from virtnode.storage import usage
from virtnode.storage.domains import access, location, mounts, registry
from virtnode.storage.domains.gate import DomainGate
from virtnode.storage.domains.monitor import CheckResult, DomainMonitor, DomainState
from virtnode.storage.domains.mounts import MountSpec
from virtnode.storage.layout import DomainLayout, DomainMetadata, DomainType
from virtnode.store import Store
from virtnode.util.aio import DaemonThreadPool
from virtnode.util.files import make_dir
from virtnode.util.jsontypes import JsonObject

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Disk paths of running VMs by VM name; raises when that cannot be known.
VmDisks = Callable[[], Awaitable[dict[str, list[str]]]]
TOPIC = "storage.domain"
#: What a freshly made filesystem may hold and still count as empty.
_EMPTY_FS_ENTRIES = frozenset({"lost+found"})


@dataclass
class Domain:
    """An attached domain as the agent holds it."""

    sd_id: str
    name: str
    type: DomainType
    layout: DomainLayout
    monitor: DomainMonitor
    mount: MountSpec | None = None
    metadata: DomainMetadata | None = None
    error: str | None = None
    attached: float = field(default_factory=time.time)
    gate: DomainGate = field(init=False)

    def __post_init__(self) -> None:
        self.gate = DomainGate(self.sd_id)

    @property
    def result(self) -> CheckResult:
        """The monitor's latest check; a domain that could not be attached (again) and
        has not been checked since counts as unreachable."""
        result = self.monitor.result
        if self.error is not None and result.state is DomainState.UNKNOWN:
            return CheckResult(DomainState.UNREACHABLE, error=self.error)
        return result

    @property
    def state(self) -> DomainState:
        return self.result.state

    def to_api(self) -> JsonObject:
        result = self.result
        return {
            "sd_id": self.sd_id,
            "name": self.name,
            "type": self.type,
            "state": result.state.value,
            "root": str(self.layout.root),
            "path": str(self.layout.domain_dir),
            "mount": None if self.mount is None else self.mount.to_api(),
            "attached": self.attached,
            "error": self.error,
            "metadata": None if self.metadata is None else self.metadata.to_api(),
            "monitor": result.to_api(),
        }


class StorageDomainService:
    """The storage domains attached to this host."""

    def __init__(self, config: StorageConfig, mount_root: Path, store: Store, bus: EventBus,
                 vm_disks: VmDisks, *, protected: Sequence[Path] = (),
                 hypervisor_uri: str = "test:///default",
                 cancel_job: Callable[[str], Awaitable[object]] | None = None) -> None:
        """``protected``: the agent's own directories (its state), where no localfs
        domain may be; the mount root is one too. ``hypervisor_uri`` says whose access to
        a domain is checked (:func:`access.hypervisor_user`). ``cancel_job`` cancels a
        job and waits (boundedly) for it to end, for a forced delete."""
        self._config = config
        self._mount_root = mount_root
        self._protected = (*protected, mount_root)
        self._store = store
        self._bus = bus
        self._vm_disks = vm_disks
        self._hypervisor_uri = hypervisor_uri
        self._cancel_job = cancel_job
        self._qemu_user: access.Accessor | None = None
        self._host_id = ""
        self._domains: dict[str, Domain] = {}
        self._lock = asyncio.Lock()
        self._io = DaemonThreadPool(4, "storage-io")

    # --- life cycle -----------------------------------------------------------------------

    async def start(self, host_id: str) -> None:
        """Create the registry table and attach again what was attached. Failures to
        attach a domain are logged and reported on the domain, never fatal."""
        self._host_id = host_id
        self._io.start()
        try:
            self._qemu_user = await self.io_call(access.hypervisor_user, self._hypervisor_uri,
                                                 what="reading the hypervisor's user")
        except (KeyError, ValueError) as exc:
            log.error("cannot tell which user QEMU runs as (%s); storage domains are not "
                      "checked for its access", exc)
        await self._store.ensure_schema(registry.COMPONENT, registry.VERSION, registry.SCHEMA)
        for reg in await self._store.run(registry.load):
            await self._reattach(reg)

    async def close(self) -> None:
        """Stop the monitors. Mounts stay: running VMs keep using them."""
        for domain in self._domains.values():
            await domain.monitor.close()
        self._io.shutdown(wait=False)

    def results(self) -> Iterator[tuple[str, str, CheckResult]]:
        """``(sd_id, name, latest check)`` of every domain, for metrics."""
        for domain in self._domains.values():
            yield domain.sd_id, domain.name, domain.monitor.result

    # --- methods --------------------------------------------------------------------------

    async def list(self) -> JsonObject:
        return {"domains": [d.to_api() for d in self._domains.values()]}

    async def get_info(self, params: StorageDomainGetInfoParams) -> JsonObject:
        return {"domain": self._get(params["sd_id"]).to_api()}

    async def create(self, params: StorageDomainCreateParams) -> JsonObject:
        dtype: DomainType = params["type"]
        name = lay.check_name(params["name"])
        spec = _where(dtype, params)
        async with self._lock:
            self._check_name_free(name)
            sd_id = str(uuid.uuid4())
            metadata = DomainMetadata.new(sd_id, name, dtype, self._host_id,
                                          params["block_size"])
            async with self._root(sd_id, spec, params, _localfs_root,
                                  what="preparing the domain directory") as root:
                await self._check_reachable(root)
                layout = DomainLayout.of(root, sd_id)
                await self.io_call(_format, layout, metadata, params["force"],
                                    spec is not None, what="formatting the domain")
                domain = await self._register(layout, metadata, spec)
            await domain.monitor.check()
        self._publish(domain, "created")
        return {"domain": domain.to_api()}

    async def attach(self, params: StorageDomainAttachParams) -> JsonObject:
        sd_id = lay.check_uuid(params["sd_id"], "sd_id")
        dtype: DomainType = params["type"]
        spec = _where(dtype, params)
        async with self._lock:
            old = self._domains.get(sd_id)
            if old is not None and old.error is None:
                raise AlreadyExists(f"storage domain {sd_id} is attached", reason="attached",
                                    object="storage_domain", id=sd_id)
            if old is not None:  # attached before but not reachable at start: try again
                await self._forget(old)
            async with self._root(sd_id, spec, params, _existing_dir,
                                  what="resolving the path") as root:
                layout = DomainLayout.of(root, sd_id)
                metadata = await self._read_metadata(layout)
                await self._check_reachable(layout.domain_dir)
                if metadata.type != dtype:
                    raise InvalidArgument(f"storage domain {sd_id} is {metadata.type}, not "
                                          f"{dtype}", reason="type_mismatch", field="type")
                self._check_name_free(metadata.name)
                domain = await self._register(layout, metadata, spec)
            await domain.monitor.check()
        self._publish(domain, "attached")
        return {"domain": domain.to_api()}

    async def detach(self, params: StorageDomainDetachParams) -> JsonObject:
        async with self._lock:
            domain = self._get(params["sd_id"])
            await self._check_unused(domain)
            async with self._exclusive(domain, force=False):
                await self._forget(domain)
        self._publish(domain, "detached")
        return {}

    async def delete(self, params: StorageDomainDeleteParams) -> JsonObject:
        async with self._lock:
            domain = self._get(params["sd_id"])
            if domain.error is not None:
                raise FailedPrecondition(f"storage domain {domain.sd_id} is not reachable: "
                                         f"{domain.error}", reason="domain_unreachable",
                                         object="storage_domain", id=domain.sd_id)
            await self._check_unused(domain)
            async with self._exclusive(domain, force=params["force"]):
                await self.io_call(_remove_domain, domain.layout, params["force"],
                                   what="deleting the domain")
                await self._forget(domain)
        self._publish(domain, "deleted")
        return {}

    # --- for the volume service -----------------------------------------------------------

    def domain(self, sd_id: str) -> Domain:
        """An attached, reachable domain. Raises InvalidArgument (a bad id), NotFound, and
        FailedPrecondition (``domain_unreachable``) for one that could not be attached."""
        domain = self._get(sd_id)
        if domain.error is not None:
            raise FailedPrecondition(f"storage domain {domain.sd_id} is not reachable: "
                                     f"{domain.error}", reason="domain_unreachable",
                                     object="storage_domain", id=domain.sd_id)
        return domain

    def attached(self) -> tuple[Domain, ...]:
        """The domains that were attached without error."""
        return tuple(d for d in self._domains.values() if d.error is None)

    @property
    def io_timeout(self) -> float:
        return self._config.io_timeout

    # --- helpers --------------------------------------------------------------------------

    def _get(self, sd_id: str) -> Domain:
        domain = self._domains.get(lay.check_uuid(sd_id, "sd_id"))
        if domain is None:
            raise NotFound(f"storage domain {sd_id} is not attached", object="storage_domain",
                           id=sd_id, reason="not_attached")
        return domain

    def _check_name_free(self, name: str) -> None:
        for other in self._domains.values():
            if other.name == name:
                raise AlreadyExists(f"storage domain {other.sd_id} is named {name!r}",
                                    reason="name_in_use", object="storage_domain",
                                    id=other.sd_id)

    async def io_call(self, fn: Callable[..., T], *args: Any, what: str, **kwargs: Any) -> T:
        """Run blocking ``fn(*args, **kwargs)`` in the storage I/O threads with
        ``storage.io_timeout``; raises DeadlineExceeded (``storage_timeout``) past it."""
        timeout = self._config.io_timeout
        future = asyncio.wrap_future(self._io.submit(fn, *args, **kwargs))
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The caller is gone (a cancelled job); what the thread raises is nobody's.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        except TimeoutError:
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise DeadlineExceeded(f"{what} did not finish within {timeout:g}s",
                                   reason="storage_timeout") from None

    async def _read_metadata(self, layout: DomainLayout) -> DomainMetadata:
        try:
            return await self.io_call(lay.read_domain_metadata, layout,
                                       what="reading the domain metadata")
        except FileNotFoundError:
            raise NotFound(f"no storage domain {layout.sd_id} under {layout.root}",
                           object="storage_domain", id=layout.sd_id,
                           reason="no_domain") from None
        except OSError as exc:
            raise FailedPrecondition(f"cannot read {layout.sd_id}'s metadata: {exc.strerror}",
                                     reason="domain_unreachable") from None

    @contextlib.asynccontextmanager
    async def _exclusive(self, domain: Domain, *, force: bool) -> AsyncIterator[None]:
        """Hold ``domain`` exclusive (:meth:`DomainGate.exclusive`); once the body has
        run, the domain is gone for every volume call waiting on it."""
        async def cancel(job_id: str) -> None:
            if self._cancel_job is not None:
                with contextlib.suppress(ApiError):  # it ended meanwhile
                    await self._cancel_job(job_id)

        async with domain.gate.exclusive(force=force, timeout=self._config.io_timeout,
                                         cancel_job=cancel):
            yield
            domain.gate.closed = True

    async def _check_reachable(self, path: Path) -> None:
        """Raise FailedPrecondition (``not_accessible``) unless QEMU's user can traverse
        every directory down to ``path``."""
        try:
            await self.io_call(access.check_reachable, path, self._qemu_user,
                               what="checking the hypervisor's access")
        except OSError as exc:
            raise _path_error(path, exc) from None

    async def _mount(self, sd_id: str, spec: MountSpec) -> Path:
        target = self._mount_root / sd_id
        await self.io_call(_mount_point, target, what="making the mount point")
        if await self.io_call(mounts.is_mounted, target, what="reading mounts"):
            raise FailedPrecondition(f"{target} is already mounted", reason="already_mounted")
        try:
            await mounts.mount(spec, target, self._config.mount_timeout)
        except BaseException:
            await self.io_call(_remove_mount_point, target, what="removing the mount point")
            raise
        return target

    @contextlib.asynccontextmanager
    async def _root(self, sd_id: str, spec: MountSpec | None, params: Mapping[str, Any],
                    local: LocalRoot, *, what: str) -> AsyncIterator[Path]:
        """The root of a domain being created or attached: ``local`` of the call's path
        (localfs; a directory it made is removed again if anything inside fails), or the
        filesystem mounted for it (posixfs), unmounted again if anything inside fails;
        registering the domain belongs inside."""
        if spec is None:
            root, made = await self.io_call(local, Path(params["path"]), self._protected,
                                            what=what)
            try:
                yield root
            except BaseException:
                if made:
                    await self.io_call(_remove_made_root, root, what="removing the directory")
                raise
            return
        root = await self._mount(sd_id, spec)
        try:
            yield root
        except BaseException:
            await self._unmount(root, quiet=True)
            raise

    async def _unmount(self, target: Path, *, quiet: bool = False) -> None:
        try:
            if await self.io_call(mounts.is_mounted, target, what="reading mounts"):
                await mounts.unmount(target, self._config.mount_timeout)
            await self.io_call(_remove_mount_point, target, what="removing the mount point")
        except Exception:
            if not quiet:
                raise
            log.exception("cannot unmount %s", target)

    def _new_domain(self, layout: DomainLayout, name: str, dtype: DomainType,
                    spec: MountSpec | None, attached: float) -> Domain:
        monitor = DomainMonitor(layout, self._config, self._on_state,
                                mount_point=None if spec is None else layout.root)
        return Domain(layout.sd_id, name, dtype, layout, monitor, spec, attached=attached)

    async def _register(self, layout: DomainLayout, metadata: DomainMetadata,
                        spec: MountSpec | None) -> Domain:
        """Record the domain in the store, then hold and monitor it (its first check is
        the caller's: nothing after the store write may fail or be cancelled)."""
        domain = self._new_domain(layout, metadata.name, metadata.type, spec, time.time())
        domain.metadata = metadata
        await self._store.run(lambda conn: registry.insert(conn, registry.Registration(
            domain.sd_id, domain.name, domain.type, str(layout.root),
            None if spec is None else spec.to_api(), domain.attached)))
        self._domains[domain.sd_id] = domain
        domain.monitor.start()
        return domain

    async def _forget(self, domain: Domain) -> None:
        await domain.monitor.close()
        if domain.mount is not None:
            await self._unmount(domain.layout.root)
        await self._store.run(lambda conn: registry.delete(conn, domain.sd_id))
        self._domains.pop(domain.sd_id, None)

    async def _check_unused(self, domain: Domain) -> None:
        directory = str(domain.layout.domain_dir)
        users = {vm: used for vm, paths in (await self._vm_disks()).items()
                 if (used := usage.paths_under(paths, directory))}
        if users:
            raise FailedPrecondition(
                f"storage domain {domain.sd_id} is used by running VMs: "
                f"{', '.join(sorted(users))}", reason="domain_in_use",
                object="storage_domain", id=domain.sd_id, vms=sorted(users))

    async def _reattach(self, reg: registry.Registration) -> None:
        dtype = cast(DomainType, reg.type)
        try:
            layout = DomainLayout.of(Path(reg.root), reg.sd_id)
            spec = None if reg.mount is None else MountSpec.parse(reg.mount)
        except InvalidArgument as exc:  # only a damaged store gets here
            log.error("storage domain %s: bad registry entry (%s); ignoring it",
                      reg.sd_id, exc.message)
            return
        domain = self._new_domain(layout, reg.name, dtype, spec, reg.attached)
        self._domains[reg.sd_id] = domain
        try:
            if spec is not None and not await self.io_call(
                    mounts.is_mounted, layout.root, what="reading mounts"):
                await self.io_call(_mount_point, layout.root, what="making the mount point")
                await mounts.mount(spec, layout.root, self._config.mount_timeout)
            domain.metadata = await self._read_metadata(layout)
            domain.name = domain.metadata.name
        except Exception as exc:
            domain.error = getattr(exc, "message", None) or str(exc)
            log.error("storage domain %s (%s): cannot attach it again: %s", reg.sd_id,
                      reg.name, domain.error)
            self._publish(domain, "attach_failed")
        domain.monitor.start()

    def _on_state(self, sd_id: str, previous: CheckResult, result: CheckResult) -> None:
        domain = self._domains.get(sd_id)
        if domain is not None:
            self._publish(domain, "state", previous.state)

    def _publish(self, domain: Domain, event: str, previous: DomainState | None = None) -> None:
        data: JsonObject = {"sd_id": domain.sd_id, "name": domain.name, "event": event,
                            "state": domain.state.value}
        if previous is not None:
            data["previous_state"] = previous.value
        error = domain.error or domain.monitor.result.error
        if error is not None:
            data["error"] = error
        self._bus.publish(TOPIC, data)


def _where(dtype: str, params: Mapping[str, Any]) -> MountSpec | None:
    """The mount spec of a posixfs call (None for localfs); checks that the call gives
    exactly what its type needs, and a path or filesystem type no domain may have."""
    if dtype == "localfs":
        if "mount" in params or "path" not in params:
            raise InvalidArgument("a localfs domain takes path, not mount",
                                  reason="invalid_location", field="path")
        location.check_text(params["path"])
        return None
    if "path" in params or "mount" not in params:
        raise InvalidArgument("a posixfs domain takes mount, not path",
                              reason="invalid_location", field="mount")
    spec = MountSpec.parse(params["mount"])
    if spec.vfs_type in location.SPECIAL_FILESYSTEMS:
        raise InvalidArgument(f"mount.vfs_type {spec.vfs_type} is a special filesystem, which "
                              "holds no disk images", reason="special_filesystem",
                              field="mount.vfs_type")
    return spec


# --- blocking helpers, run in the storage I/O threads --------------------------------------

#: Finds (or makes) a localfs root: ``(path, protected dirs)`` -> ``(resolved, made)``.
LocalRoot = Callable[[Path, Sequence[Path]], tuple[Path, bool]]


def _path_error(path: Path, exc: OSError) -> ApiError:
    """The API error for an OSError met on the way to a localfs root."""
    if exc.errno == errno.ENAMETOOLONG:
        return InvalidArgument(f"path {str(path)[:200]!r} is too long", reason="path_too_long",
                               field="path")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
        return InvalidArgument(f"path {str(path)[:200]!r} does not lead to a directory: "
                               f"{exc.strerror}", reason="invalid_path", field="path")
    return FailedPrecondition(f"cannot use {str(path)[:200]!r}: {exc.strerror}",
                              reason="path_unusable")


def _checked_root(path: Path, protected: Sequence[Path], *, make: bool) -> tuple[Path, bool]:
    """Resolve a localfs root and check where it is (:mod:`location`) before anything is
    made; with ``make``, a missing last component is made. A dangling symlink or a loop is
    refused, never made. Returns ``(resolved root, whether it was made)``."""
    try:
        if make and not os.path.lexists(path):
            resolved = Path(os.path.realpath(path.parent, strict=True)) / path.name
        else:
            resolved = Path(os.path.realpath(path, strict=True))
        own = [Path(os.path.realpath(p)) for p in protected]
        location.check_length(str(resolved))
        location.check_place(resolved, own)
        holder = resolved if resolved.exists() else resolved.parent
        location.check_filesystem(resolved, location.filesystem_type(
            holder, mounts.read_mountinfo()))
        made = False
        if not resolved.exists():
            make_dir(resolved)
            made = True
    except OSError as exc:
        raise _path_error(path, exc) from None
    if not resolved.is_dir():
        raise NotFound(f"{path} is not a directory", reason="no_directory", object="path",
                       id=str(path))
    return resolved, made


def _existing_dir(path: Path, protected: Sequence[Path]) -> tuple[Path, bool]:
    """The resolved root of a domain being attached."""
    return _checked_root(path, protected, make=False)


def _localfs_root(path: Path, protected: Sequence[Path]) -> tuple[Path, bool]:
    """The resolved root of a new localfs domain; its last component is made if missing."""
    return _checked_root(path, protected, make=True)


def _remove_made_root(root: Path) -> None:
    with contextlib.suppress(OSError):
        root.rmdir()  # only when empty: what the call made, nothing else


def _format(layout: DomainLayout, metadata: DomainMetadata, force: bool, fresh_fs: bool) -> None:
    """Make the domain in its root; a failure leaves nothing of it behind. Raises
    FailedPrecondition (``not_empty``, ``path_unusable``) and AlreadyExists."""
    try:
        ignore = _EMPTY_FS_ENTRIES if fresh_fs else frozenset()
        present = sorted(set(os.listdir(layout.root)) - ignore)
        if present and not force:
            raise FailedPrecondition(f"{layout.root} is not empty ({', '.join(present[:5])}); "
                                     "use force to add a domain next to what is there",
                                     reason="not_empty")
        if os.path.lexists(layout.domain_dir):
            raise AlreadyExists(f"{layout.domain_dir} exists", reason="exists",
                                object="storage_domain", id=layout.sd_id)
        try:
            lay.format_domain(layout, metadata)
        except BaseException:
            # It did not exist a moment ago: all in it was made by this call.
            shutil.rmtree(layout.domain_dir, ignore_errors=True)
            raise
    except OSError as exc:
        raise _path_error(layout.root, exc) from None


def _mount_point(target: Path) -> None:
    """Make a mount point, and the mount root above it, searchable by QEMU's user."""
    if not target.parent.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(target.parent, 0o755)
    make_dir(target, exist_ok=True)


def _remove_mount_point(target: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        target.rmdir()


def _remove_domain(layout: DomainLayout, force: bool) -> None:
    """Remove a domain's directory: renamed away first (one atomic step after which it is
    no longer a domain), then removed. Symlinks inside are removed, never followed."""
    layout.safe(layout.domain_dir)
    if not force and lay.has_volumes(layout):
        raise FailedPrecondition(f"storage domain {layout.sd_id} holds volumes; delete them "
                                 "or use force", reason="has_volumes",
                                 object="storage_domain", id=layout.sd_id)
    doomed = layout.root / f".deleted-{layout.sd_id}-{int(time.time())}"
    os.rename(layout.domain_dir, doomed)
    shutil.rmtree(doomed)
