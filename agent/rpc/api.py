"""``Api.*`` methods: the agent describes its own contract."""

from __future__ import annotations

from virtnode.rpc.schema import ApiSchema
from virtnode.util.jsontypes import JsonObject


class ApiService:
    def __init__(self, schema: ApiSchema) -> None:
        self._schema = schema
        self._described: JsonObject | None = None

    async def describe(self) -> JsonObject:
        if self._described is None:
            self._described = self._schema.describe()
        return self._described
