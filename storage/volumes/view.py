"""Shared by the volume service and its jobs: a volume as the API shows it, and the API
errors for what qemu-img raises."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from virtnode.errors import (
    AlreadyExists,
    ApiError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
)
from virtnode.storage.domains.service import Domain
from virtnode.storage.images import qemuimg
from virtnode.storage.volumes.files import Found
from virtnode.util.jsontypes import JsonObject

#: How qemu-img preallocates a ``preallocated`` volume, raw or qcow2 alike.
PREALLOCATION = "falloc"


def preallocation(allocation: str) -> str | None:
    """qemu-img's ``preallocation`` option for a volume's ``allocation``."""
    return PREALLOCATION if allocation == "preallocated" else None


def qemu_error(exc: BaseException, what: str) -> ApiError:
    """The API error for what a qemu-img call raised."""
    if isinstance(exc, qemuimg.NoSpace):
        return ResourceExhausted(f"{what}: no space left", reason="no_space")
    if isinstance(exc, qemuimg.ImageInUse):
        return FailedPrecondition(f"{what}: the image is in use by another process",
                                  reason="in_use")
    if isinstance(exc, qemuimg.Timeout):
        return DeadlineExceeded(f"{what}: qemu-img did not finish in time",
                                reason="storage_timeout")
    if isinstance(exc, qemuimg.ShrinkRefused):
        return InvalidArgument(f"{what}: {exc}", reason="shrink_refused", field="size")
    if isinstance(exc, FileExistsError):
        return AlreadyExists(f"{what}: {exc}", reason="exists")
    return Internal(f"{what}: {exc}", reason="qemu_img_failed")


@contextlib.contextmanager
def qemu_guard(what: str) -> Iterator[None]:
    try:
        yield
    except (qemuimg.QemuImgError, qemuimg.ShrinkRefused, FileExistsError) as exc:
        raise qemu_error(exc, what) from None


def require_legal(chain: Sequence[Found]) -> None:
    """Raise FailedPrecondition (``volume_illegal``) for the first illegal volume."""
    for item in chain:
        if item.metadata.legality != "legal":
            raise FailedPrecondition(f"volume {item.volume_id} is illegal",
                                     reason="volume_illegal", object="volume",
                                     id=item.volume_id)


def qemu_chain(chain: Sequence[Found]) -> qemuimg.Chain:
    """A volume's chain (leaf first) as qemu-img is to open it: these files with these
    formats, whatever their headers name."""
    return qemuimg.Chain(tuple((str(f.path), f.metadata.format) for f in chain))


def volume_api(domain: Domain, found: Found) -> JsonObject:
    return {"sd_id": domain.sd_id, "image_id": found.image_id,
            "volume_id": found.volume_id,
            "path": str(found.path),
            **found.metadata.to_api()}
