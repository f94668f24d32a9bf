"""``Api.*`` methods: the agent describes its own contract."""

from __future__ import annotations

from typing import Any

from virtnode.rpc.dispatch import CallContext, rpc_method
from virtnode.rpc.schema import ApiSchema

JsonObject = dict[str, Any]


class ApiService:
    def __init__(self, schema: ApiSchema) -> None:
        self._schema = schema
        self._described: JsonObject | None = None

    @rpc_method("Api.describe")
    async def describe(self, _ctx: CallContext, _params: JsonObject) -> JsonObject:
        if self._described is None:
            self._described = self._schema.describe()
        return self._described
