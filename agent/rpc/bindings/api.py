"""``Api.*``: the agent describes its own contract."""

from __future__ import annotations

from virtnode.rpc.api import ApiService
from virtnode.rpc.bindings import Bound, no_params


def handlers(api: ApiService) -> dict[str, Bound]:
    return {"Api.describe": no_params(api.describe)}
