"""``Migration.*``: what one agent asks of another while a VM moves between them."""

from __future__ import annotations

from virtnode.rpc.bindings import Bound, params
from virtnode.vm.migration import MigrationService


def handlers(migrations: MigrationService) -> dict[str, Bound]:
    return {
        "Migration.prepare": params(migrations.prepare),
        "Migration.finish": params(migrations.finish),
    }
