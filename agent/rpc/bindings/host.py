"""``Host.*``: the host service, and the host's statistics from the sampler."""

from __future__ import annotations

from virtnode.host.service import HostService
from virtnode.rpc.bindings import Bound, no_params, params
from virtnode.stats.sampler import StatsService


def handlers(host: HostService, stats: StatsService) -> dict[str, Bound]:
    return {
        "Host.ping": no_params(host.ping),
        "Host.getCapabilities": no_params(host.get_capabilities),
        "Host.getStats": no_params(stats.get_host_stats),
        "Host.getStatsHistory": params(stats.get_history),
    }
