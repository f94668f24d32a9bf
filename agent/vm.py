"""The VM service: ``VM.*`` methods over the hypervisor owner."""

from __future__ import annotations

from typing import Any

from virtnode.hypervisor import Connection, Hypervisor
from virtnode.rpc import CallContext, rpc_method
from virtnode.vmstate import vm_state

JsonObject = dict[str, Any]

# VIR_DOMAIN_STATS_STATE: the cheapest stats group, one call for every domain.
_STATS_STATE = 1


def _list_domains(conn: Connection) -> list[JsonObject]:
    records = conn.getAllDomainStats(_STATS_STATE, 0)
    return [
        {
            "vm_id": dom.UUIDString(),
            "name": dom.name(),
            "state": vm_state(stats.get("state.state", 0), stats.get("state.reason", 0)),
        }
        for dom, stats in records
    ]


class VmService:
    """Owns what the agent knows about VMs; every libvirt call goes via the hypervisor."""

    def __init__(self, hypervisor: Hypervisor) -> None:
        self._hypervisor = hypervisor

    @rpc_method("VM.list")
    async def list(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        vms = await self._hypervisor.call(_list_domains, what="listing VMs")
        wanted = params.get("state")
        if wanted is not None:
            vms = [vm for vm in vms if vm["state"] == wanted]
        vms.sort(key=lambda vm: (vm["name"], vm["vm_id"]))
        return {"vms": vms}
