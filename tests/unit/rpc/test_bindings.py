"""The bindings: every API method meets one service method, which takes its own params type."""

from __future__ import annotations

import inspect
from typing import Any, cast

from tests.paths import ROOT
from virtnode.events.subscriptions import EventsService
from virtnode.host.service import HostService
from virtnode.jobs.service import JobService
from virtnode.network.service import NetworkService
from virtnode.rpc.api import ApiService
from virtnode.rpc.bindings import (
    Bound,
    api,
    combine,
    events,
    host,
    job,
    migration,
    network,
    storage,
    vm,
)
from virtnode.rpc.schema import ApiSchema
from virtnode.rpc.typegen import render, type_name
from virtnode.stats.sampler import StatsService
from virtnode.storage.domains.service import StorageDomainService
from virtnode.storage.volumes.service import VolumeService
from virtnode.vm.clones import CloneService
from virtnode.vm.console import ConsoleService
from virtnode.vm.devices import VmDeviceService
from virtnode.vm.migration import MigrationService
from virtnode.vm.ova import OvaService
from virtnode.vm.service import VmService
from virtnode.vm.snapshots import SnapshotService


def _unbound(cls: type) -> Any:
    # The class stands in for an instance: binding only reads the methods' attributes,
    # and the targets are then the plain functions, whose signatures tell their types.
    return cast(Any, cls)


def _table() -> dict[str, Bound]:
    return cast(dict[str, Bound], combine(
        api.handlers(_unbound(ApiService)),
        events.handlers(_unbound(EventsService)),
        host.handlers(_unbound(HostService), _unbound(StatsService)),
        job.handlers(_unbound(JobService)),
        network.handlers(_unbound(NetworkService)),
        storage.handlers(_unbound(StorageDomainService), _unbound(VolumeService)),
        vm.handlers(_unbound(VmService), _unbound(VmDeviceService), _unbound(StatsService),
                    _unbound(MigrationService)),
        vm.console_handlers(_unbound(ConsoleService)),
        vm.snapshot_handlers(_unbound(SnapshotService)),
        vm.clone_handlers(_unbound(CloneService)),
        vm.export_handlers(_unbound(OvaService)),
        migration.handlers(_unbound(MigrationService)),
    ))


def test_every_method_of_the_schema_is_bound_once(schema: ApiSchema) -> None:
    assert set(_table()) == set(schema.methods)


def test_each_service_method_takes_the_params_type_of_its_api_method(schema: ApiSchema) -> None:
    wrong = []
    for name, bound in sorted(_table().items()):
        signature = inspect.signature(bound.target)
        annotations = {p.name: p.annotation for p in signature.parameters.values()}
        declared = schema.methods[name].params.get("properties") or \
            schema.methods[name].params.get("$ref")
        if bound.takes == "nothing":
            ok = list(annotations) == ["self"] and not declared
        else:
            ok = annotations.get("params") == type_name(name)
        if bound.takes == "session":
            ok = ok and list(annotations)[:2] == ["self", "session"]
        if bound.takes == "caller":
            ok = ok and list(annotations)[-1] == "by"
        if bound.takes == "caller_role":
            ok = ok and list(annotations)[-2:] == ["by", "role"]
        if not ok:
            wrong.append(f"{name}: {bound.target.__qualname__}{signature}")
    assert not wrong


def test_the_params_types_are_generated_from_the_schema_as_it_is(schema: ApiSchema) -> None:
    written = (ROOT / "api_schema" / "params.py").read_text()
    assert written == render(schema), "run `make docs` to regenerate api_schema/params.py"
