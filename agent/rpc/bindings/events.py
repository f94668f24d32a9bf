"""``Events.*``: subscriptions act on the session the call came on; polling does not."""

from __future__ import annotations

from virtnode.events.subscriptions import EventsService
from virtnode.rpc.bindings import Bound, params, with_session


def handlers(events: EventsService) -> dict[str, Bound]:
    return {
        "Events.subscribe": with_session(events.subscribe),
        "Events.unsubscribe": with_session(events.unsubscribe),
        "Events.get": params(events.get),
    }
