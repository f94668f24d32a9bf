"""What the link monitor reports: a per-link record of the last known state, and the
events that a new message makes out of it. Plain data; the monitor in
:mod:`virtnode.network.kernel.netlink` feeds it decoded messages.

Events are reported only when something a user watches changes: a link is added or
removed; its administrative state, carrier, operstate, MTU, master or name changes; an
address is added or removed. The kernel repeats RTM_NEWLINK for many reasons
(statistics, features, a port joining the bridge) and RTM_NEWADDR when an address's
flags or lifetimes change; those give no event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from virtnode.network.kernel.rtnlmsg import LinkInfo

EventKind = Literal["added", "removed", "changed"]
#: Names that can appear in :attr:`LinkEvent.changes`.
CHANGE_FIELDS = ("up", "carrier", "operstate", "mtu", "master", "name")


@dataclass(frozen=True)
class LinkEvent:
    """One change of one link.

    ``changes`` names what changed since the last event for the link: any of
    :data:`CHANGE_FIELDS`, or ``address_added``/``address_removed`` with ``address`` set
    (interface form). It is empty for ``added`` and ``removed``. The other fields are the
    link's state after the change (for ``removed``, its last known state).
    """

    link: str
    event: EventKind
    up: bool
    carrier: bool
    operstate: str
    mtu: int
    master: str | None
    changes: tuple[str, ...] = ()
    address: str | None = None


@dataclass(frozen=True)
class LinkRecord:
    index: int
    name: str
    up: bool
    carrier: bool
    operstate: str
    mtu: int
    master_index: int | None
    addresses: frozenset[str] = frozenset()

    @classmethod
    def of(cls, info: LinkInfo, addresses: frozenset[str] = frozenset()) -> LinkRecord:
        return cls(info.index, info.name, info.up, info.carrier, info.operstate, info.mtu,
                   info.master_index, addresses)


def _changed_fields(old: LinkRecord, new: LinkRecord) -> tuple[str, ...]:
    pairs = {
        "up": (old.up, new.up),
        "carrier": (old.carrier, new.carrier),
        "operstate": (old.operstate, new.operstate),
        "mtu": (old.mtu, new.mtu),
        "master": (old.master_index, new.master_index),
        "name": (old.name, new.name),
    }
    return tuple(name for name in CHANGE_FIELDS if pairs[name][0] != pairs[name][1])


class LinkTracker:
    """The last known state of every link, by ifindex."""

    def __init__(self) -> None:
        self._links: dict[int, LinkRecord] = {}

    def __len__(self) -> int:
        return len(self._links)

    def _event(self, record: LinkRecord, kind: EventKind, changes: tuple[str, ...] = (),
               address: str | None = None) -> LinkEvent:
        master = self._links.get(record.master_index) if record.master_index else None
        return LinkEvent(link=record.name, event=kind, up=record.up, carrier=record.carrier,
                         operstate=record.operstate, mtu=record.mtu,
                         master=master.name if master is not None else None,
                         changes=changes, address=address)

    def link(self, info: LinkInfo) -> LinkEvent | None:
        """An RTM_NEWLINK: ``added`` for a new index, ``changed`` if a watched field
        changed, None otherwise."""
        old = self._links.get(info.index)
        new = LinkRecord.of(info, old.addresses if old is not None else frozenset())
        self._links[info.index] = new
        if old is None:
            return self._event(new, "added")
        changes = _changed_fields(old, new)
        return self._event(new, "changed", changes) if changes else None

    def link_removed(self, index: int) -> LinkEvent | None:
        old = self._links.pop(index, None)
        return self._event(old, "removed") if old is not None else None

    def address(self, index: int, address: str, present: bool) -> LinkEvent | None:
        """An RTM_NEWADDR (``present``) or RTM_DELADDR; None if it changes nothing or the
        link is unknown (an address of a link already removed)."""
        old = self._links.get(index)
        if old is None or (address in old.addresses) == present:
            return None
        addresses = old.addresses | {address} if present else old.addresses - {address}
        new = replace(old, addresses=addresses)
        self._links[index] = new
        change = "address_added" if present else "address_removed"
        return self._event(new, "changed", (change,), address)

    def reset(self, links: Iterable[LinkInfo],
              addresses: Mapping[int, frozenset[str]]) -> list[LinkEvent]:
        """Replace everything with a fresh dump; return the events that take the old
        state to the new one (none when nothing was known yet)."""
        fresh = {info.index: LinkRecord.of(info, addresses.get(info.index, frozenset()))
                 for info in links}
        if not self._links:
            self._links = fresh
            return []
        old_links, self._links = self._links, fresh
        events = [self._event(old, "removed") for index, old in old_links.items()
                  if index not in fresh]
        for index, new in fresh.items():
            old = old_links.get(index)
            if old is None:
                events.append(self._event(new, "added"))
                continue
            if changes := _changed_fields(old, new):
                events.append(self._event(new, "changed", changes))
            for gone in sorted(old.addresses - new.addresses):
                events.append(self._event(new, "changed", ("address_removed",), gone))
            for came in sorted(new.addresses - old.addresses):
                events.append(self._event(new, "changed", ("address_added",), came))
        return events
