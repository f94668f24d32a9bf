"""``Network.*``: the host's networks."""

from __future__ import annotations

from virtnode.network.service import NetworkService
from virtnode.rpc.bindings import Bound, no_params, params


def handlers(network: NetworkService) -> dict[str, Bound]:
    return {
        "Network.list": no_params(network.list_networks),
        "Network.getState": no_params(network.get_state),
        "Network.setup": params(network.setup),
        "Network.confirm": params(network.confirm),
        "Network.persist": no_params(network.persist),
    }
