"""``StorageDomain.*`` and ``Volume.*``: storage domains and the volumes on them."""

from __future__ import annotations

from virtnode.rpc.bindings import Bound, no_params, params
from virtnode.storage.domains.service import StorageDomainService
from virtnode.storage.volumes.service import VolumeService


def handlers(domains: StorageDomainService, volumes: VolumeService) -> dict[str, Bound]:
    return {
        "StorageDomain.create": params(domains.create),
        "StorageDomain.attach": params(domains.attach),
        "StorageDomain.detach": params(domains.detach),
        "StorageDomain.list": no_params(domains.list),
        "StorageDomain.getInfo": params(domains.get_info),
        "StorageDomain.delete": params(domains.delete),
        "Volume.create": params(volumes.create),
        "Volume.list": params(volumes.list),
        "Volume.getInfo": params(volumes.get_info),
        "Volume.delete": params(volumes.delete),
        "Volume.resize": params(volumes.resize),
        "Volume.copy": params(volumes.copy),
        "Volume.merge": params(volumes.merge),
        "Volume.import": params(volumes.import_volume),
        "Volume.prepareTransfer": params(volumes.prepare_transfer),
        "Volume.finalizeTransfer": params(volumes.finalize_transfer),
        "Volume.cancelTransfer": params(volumes.cancel_transfer),
    }
