"""``Events.*`` methods: live event subscriptions on push-capable sessions."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from virtnode import jsonrpc
from virtnode.errors import FailedPrecondition, NotFound
from virtnode.events import Event, EventBus
from virtnode.rpc import CallContext, Session, rpc_method

JsonObject = dict[str, Any]


class EventsService:
    """Binds bus subscriptions to sessions; a closing session ends its subscriptions."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._subscriptions: dict[str, tuple[Session, Callable[[], None]]] = {}

    @rpc_method("Events.subscribe")
    async def subscribe(self, ctx: CallContext, params: JsonObject) -> JsonObject:
        session = ctx.session

        def deliver(event: Event) -> None:
            session.push(jsonrpc.notification("event", event.to_params()))

        if not session.can_push:
            raise FailedPrecondition(
                "events are pushed over WebSocket connections only",
                reason="push_unsupported",
            )
        subscription_id = str(uuid.uuid4())
        unsubscribe = self._bus.subscribe(params["topics"], deliver)
        self._subscriptions[subscription_id] = (session, unsubscribe)
        session.on_close(lambda: self._end(subscription_id))
        return {
            "subscription_id": subscription_id,
            "epoch": self._bus.epoch,
            "last_seq": self._bus.last_seq,
        }

    @rpc_method("Events.unsubscribe")
    async def unsubscribe(self, ctx: CallContext, params: JsonObject) -> JsonObject:
        subscription_id = params["subscription_id"]
        owner = self._subscriptions.get(subscription_id)
        if owner is None or owner[0] is not ctx.session:
            raise NotFound(f"no subscription {subscription_id} on this connection",
                           reason="not_found", object="subscription", id=subscription_id)
        self._end(subscription_id)
        return {}

    def _end(self, subscription_id: str) -> None:
        entry = self._subscriptions.pop(subscription_id, None)
        if entry is not None:
            entry[1]()
