"""Hosts as the netlink layer reads them, written by hand for the network unit tests."""

from __future__ import annotations

from typing import Any

from virtnode.network.model import Features, Link

#: A kernel that can do everything networks use.
ALL = Features(bridge=True, vlan_filtering=True, vlan_8021q=True, bond=True)


def link(name: str, kind: str = "veth", **kw: Any) -> Link:
    """A link, up unless ``up=False``, with a MAC of its own and the usual MTU range."""
    up = kw.pop("up", True)
    attrs: dict[str, Any] = {"mac": f"52:54:00:00:00:{sum(map(ord, name)) % 256:02x}",
                             "mtu": 1500, "min_mtu": 68, "max_mtu": 65535}
    attrs.update(kw)
    return Link(name=name, kind=kind, up=up, carrier=up, operstate="up" if up else "down",
                **attrs)


def bridge(name: str, **kw: Any) -> Link:
    kw.setdefault("stp", False)
    kw.setdefault("vlan_filtering", False)
    kw.setdefault("default_pvid", 1)
    return link(name, "bridge", **kw)
