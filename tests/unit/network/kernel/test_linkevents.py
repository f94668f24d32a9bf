"""What the link monitor makes of messages: events only when a watched field changes."""

from __future__ import annotations

from dataclasses import replace

from virtnode.network.kernel.linkevents import LinkEvent, LinkTracker
from virtnode.network.kernel.rtnlmsg import LinkInfo

BR0 = LinkInfo(index=3, name="br0", kind="bridge", mac=None, mtu=1500, min_mtu=68,
               max_mtu=65535, up=True, carrier=True, operstate="up", master_index=None)
ETH0 = replace(BR0, index=2, name="eth0", kind="device", master_index=3)


def tracker(*links: LinkInfo) -> LinkTracker:
    found = LinkTracker()
    assert found.reset(links, {}) == []
    return found


def test_new_links_are_added_and_repeats_are_silent() -> None:
    links = LinkTracker()
    assert links.link(BR0) == LinkEvent("br0", "added", True, True, "up", 1500, None)
    assert links.link(BR0) is None
    added = links.link(ETH0)
    assert added is not None and (added.event, added.master) == ("added", "br0")
    # Fields nobody watches (the MAC, the MTU range) change nothing.
    assert links.link(replace(ETH0, mac="52:54:00:00:00:02", max_mtu=9000)) is None


def test_changes_name_every_watched_field() -> None:
    links = tracker(BR0, ETH0)
    changed = links.link(replace(ETH0, up=False, carrier=False, operstate="down", mtu=9000,
                                 master_index=None, name="uplink"))
    assert changed is not None and changed.event == "changed"
    assert changed.changes == ("up", "carrier", "operstate", "mtu", "master", "name")
    assert (changed.link, changed.master) == ("uplink", None)


def test_removed_links_report_their_last_state() -> None:
    links = tracker(BR0, ETH0)
    assert links.link_removed(2) == LinkEvent("eth0", "removed", True, True, "up", 1500, "br0")
    assert links.link_removed(2) is None
    assert len(links) == 1


def test_addresses_are_reported_once() -> None:
    links = tracker(ETH0)
    added = links.address(2, "192.0.2.1/24", present=True)
    assert added is not None
    assert (added.changes, added.address) == (("address_added",), "192.0.2.1/24")
    assert links.address(2, "192.0.2.1/24", present=True) is None  # flags or lifetimes
    removed = links.address(2, "192.0.2.1/24", present=False)
    assert removed is not None and removed.changes == ("address_removed",)
    assert links.address(2, "192.0.2.1/24", present=False) is None
    assert links.address(9, "192.0.2.1/24", present=True) is None  # link already gone


def test_a_new_dump_reports_the_differences() -> None:
    links = LinkTracker()
    assert links.reset([BR0, ETH0], {2: frozenset({"192.0.2.1/24"})}) == []
    dummy = replace(BR0, index=4, name="dummy0", kind="dummy")
    events = links.reset([replace(ETH0, mtu=1400), dummy], {2: frozenset({"2001:db8::1/64"})})
    assert [(e.link, e.event, e.changes, e.address) for e in events] == [
        ("br0", "removed", (), None),
        ("eth0", "changed", ("mtu",), None),
        ("eth0", "changed", ("address_removed",), "192.0.2.1/24"),
        ("eth0", "changed", ("address_added",), "2001:db8::1/64"),
        ("dummy0", "added", (), None),
    ]
