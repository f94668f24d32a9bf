"""Steps that give links the shapes wanted of them, in an order the kernel takes.

Planning and rollback both describe the links they want as :class:`Target` values and
leave the ordering to this module, in two halves:

- :func:`teardown`: bridge VLAN entries that go, ports that leave their bridge or bond,
  links that are deleted (upper links first). A bond whose mode changes loses all its
  slaves and goes down, as the kernel wants it for a new mode. What follows can then
  reuse the names, NICs and VLAN ids these held.
- :func:`build`: MTUs that go down (upper links first, so a bridge or 802.1q device
  never exceeds the link below it), then per link, lower links first: create it, or
  raise its MTU and change its bridge or bond options; then ports join their bridges and
  bonds (a link joins a bond only while down, so an up one is taken down first; the
  bond brings it up), then bridge VLAN entries, then links go up or down.

Links stack four high here: NICs, bonds of NICs, 802.1q devices on either, and bridges
over any of them.

:func:`after_teardown` predicts the state a teardown leaves, with the kernel's own
consequences (a deleted link loses its addresses, routes and ports; a link that leaves
a bond is down), so that a build
can be planned on top of it. Bridge VLAN entries the kernel makes by itself are
predicted as it makes them: a port joining, or a bridge created with filtering, gets
its bridge's default PVID, untagged; a new ``default_pvid`` moves the entries that still
carry the old one, unless they hold the new VLAN already. Where entries are predicted
rather than read, every wanted entry is added explicitly (adding replaces the flags of
an entry that exists), so the result does not hang on the prediction. Entries are
deleted before a ``default_pvid`` change, so the kernel never moves one the agent is
about to delete.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from virtnode.network.layout import norm_address, norm_interface
from virtnode.network.model import (
    BridgeVlan,
    Family,
    HostState,
    Link,
    Route,
    Step,
    StepAction,
)

RouteKey = tuple[str, Family, str | None, str | None, int]

#: What :func:`after_teardown` predicts as the MTU of a link a bond let go of: the driver
#: gives back the one the link had before it joined, which the state does not show.
#: Below any wanted MTU, so a build sets the one it wants.
UNKNOWN_MTU = 0


@dataclass(frozen=True)
class Target:
    """What one link should be. ``None`` leaves that attribute as it is, except
    ``master`` (``None``: in no bridge or bond). ``mac``, ``parent`` and ``vid`` are
    used only to create the link; ``vlans`` are its visible bridge VLAN entries (none
    when its bridge does not filter)."""

    name: str
    kind: str
    master: str | None = None
    mtu: int | None = None
    up: bool | None = None
    mac: str | None = None
    parent: str | None = None
    vid: int | None = None
    stp: bool | None = None
    vlan_filtering: bool | None = None
    default_pvid: int | None = None
    vlans: tuple[BridgeVlan, ...] | None = None
    bond_mode: str | None = None
    miimon: int | None = None


def depth(kind: str) -> int:
    return {"bond": 1, "vlan": 2, "bridge": 3}.get(kind, 0)


def upper_first(names: Iterable[str], state: HostState) -> list[str]:
    kinds = {n: state.links[n].kind if n in state.links else "" for n in names}
    return sorted(kinds, key=lambda n: (-depth(kinds[n]), n))


def route_key(route: Route) -> RouteKey:
    """What tells two routes apart for the agent: not ``proto`` or ``scope``, which
    depend on who added the route."""
    return _key(route.dst, route.family, route.gateway, route.link, route.metric)


def step_route_key(step: Step) -> RouteKey:
    args = step.args
    family: Family = 6 if args["family"] == 6 else 4
    gateway, metric = args.get("gateway"), args.get("metric", 0)
    assert isinstance(metric, int)
    return _key(str(args["dst"]), family, str(gateway) if gateway else None, step.link, metric)


def _key(dst: str, family: Family, gateway: str | None, link: str | None,
         metric: int) -> RouteKey:
    return (dst if dst == "default" else norm_interface(dst), family,
            norm_address(gateway) if gateway else None, link, metric)


def route_step(action: StepAction, key: RouteKey) -> Step:
    dst, family, gateway, link, metric = key
    args: dict[str, object] = {"dst": dst, "family": family, "metric": metric}
    if gateway is not None:
        args["gateway"] = gateway
    return Step(action, link or "", args)


def teardown(state: HostState, targets: Mapping[str, Target],
             delete: Collection[str]) -> list[Step]:
    """Entries that go, ports that leave, links deleted; see the module docstring."""
    steps: list[Step] = []
    for t in _lower_first(targets.values()):
        link = state.links.get(t.name)
        if link is None or t.name in delete or t.vlans is None:
            continue
        stays = link.kind == "bridge" or (link.master is not None
                                          and link.master == t.master
                                          and link.master not in delete)
        keep = {v.vid for v in t.vlans}
        if stays:
            steps += [_vlan_entry("del_vlan_entry", t.name, v, link.kind == "bridge")
                      for v in link.vlans if v.vid not in keep]
    for t in _lower_first(targets.values()):
        link = state.links.get(t.name)
        if (link is not None and t.name not in delete and link.master is not None
                and link.master != t.master):
            steps.append(Step("set_master", t.name, {"master": None}))
    for t in _lower_first(targets.values()):
        link = state.links.get(t.name)
        if (link is None or t.name in delete or link.kind != "bond" or t.bond_mode is None
                or t.bond_mode == link.bond_mode):
            continue
        released = {s.link for s in steps if s.action == "set_master"}
        steps += [Step("set_master", port, {"master": None})
                  for port in state.ports_of(t.name) if port not in released]
        if link.up:
            steps.append(Step("set_up", t.name, {"up": False}))
    steps += [Step("del_link", name) for name in upper_first(delete, state)]
    return steps


def build(state: HostState, targets: Mapping[str, Target]) -> list[Step]:
    """MTUs, new links, bridge options, joins, VLAN entries, up/down; see the module
    docstring. ``state`` is what a teardown left: no link is in the wrong bridge."""
    order = _lower_first(targets.values())
    steps: list[Step] = []
    for t in reversed(order):
        link = state.links.get(t.name)
        if link is not None and t.mtu is not None and link.mtu > t.mtu:
            steps.append(Step("set_mtu", t.name, {"mtu": t.mtu}))
    created: set[str] = set()
    for t in order:
        link = state.links.get(t.name)
        if link is None:
            made = _create(t)
            if made is not None:
                steps.append(made)
                created.add(t.name)
            continue
        if t.mtu is not None and link.mtu < t.mtu:
            steps.append(Step("set_mtu", t.name, {"mtu": t.mtu}))
        if link.kind == "bridge":
            options = _bridge_changes(link, t)
            if options:
                steps.append(Step("set_bridge", t.name, options))
        elif link.kind == "bond":
            options = _bond_changes(link, t)
            if options:
                steps.append(Step("set_bond", t.name, options))
    exists = created | set(state.links)
    enslaved: set[str] = set()
    for t in order:
        if t.name not in exists or t.master is None or t.master not in exists:
            continue
        if t.name in created or state.links[t.name].master != t.master:
            master = targets.get(t.master) or state.links[t.master]
            if master.kind == "bond":
                enslaved.add(t.name)
                if t.name not in created and state.links[t.name].up:
                    steps.append(Step("set_up", t.name, {"up": False}))
            steps.append(Step("set_master", t.name, {"master": t.master}))
    for t in order:
        if t.name in exists and t.vlans is not None:
            steps += _vlan_entry_steps(state, targets, created, t)
    for t in order:
        if t.name in exists and t.up is not None:
            up = t.name in enslaved or (t.name not in created and state.links[t.name].up)
            if up != t.up:
                steps.append(Step("set_up", t.name, {"up": t.up}))
    return steps


def _lower_first(targets: Iterable[Target]) -> list[Target]:
    return sorted(targets, key=lambda t: (depth(t.kind), t.name))


def _create(t: Target) -> Step | None:
    args: dict[str, object] = {}
    action: StepAction
    if t.kind == "bridge":
        args.update(stp=bool(t.stp), vlan_filtering=bool(t.vlan_filtering))
        if t.default_pvid is not None:
            args["default_pvid"] = t.default_pvid
        action = "add_bridge"
    elif t.kind == "vlan" and t.parent is not None and t.vid is not None:
        args.update(parent=t.parent, vid=t.vid)
        action = "add_vlan"
    elif t.kind == "bond" and t.bond_mode is not None and t.miimon is not None:
        args.update(mode=t.bond_mode, miimon=t.miimon)
        action = "add_bond"
    else:
        return None  # a NIC that went away is not ours to make
    if t.mtu is not None:
        args["mtu"] = t.mtu
    if t.mac is not None:
        args["mac"] = t.mac
    return Step(action, t.name, args)


def _bridge_changes(link: Link, t: Target) -> dict[str, object]:
    wanted = {"stp": t.stp, "vlan_filtering": t.vlan_filtering,
              "default_pvid": t.default_pvid}
    current = {"stp": link.stp, "vlan_filtering": link.vlan_filtering,
               "default_pvid": link.default_pvid}
    return {k: v for k, v in wanted.items() if v is not None and v != current[k]}


def _bond_changes(link: Link, t: Target) -> dict[str, object]:
    wanted = {"mode": t.bond_mode, "miimon": t.miimon}
    current = {"mode": link.bond_mode, "miimon": link.miimon}
    return {k: v for k, v in wanted.items() if v is not None and v != current[k]}


def _vlan_entry(action: StepAction, link: str, v: BridgeVlan, self: bool) -> Step:
    return Step(action, link, {"vid": v.vid, "pvid": v.pvid, "untagged": v.untagged,
                               "self": self})


def _vlan_entry_steps(state: HostState, targets: Mapping[str, Target], created: set[str],
                      t: Target) -> list[Step]:
    assert t.vlans is not None
    now, known = _entries_after(state, targets, created, t)
    wanted = {v.vid: v for v in t.vlans}
    is_self = t.kind == "bridge"
    steps = [_vlan_entry("del_vlan_entry", t.name, v, is_self)
             for vid, v in sorted(now.items()) if vid not in wanted]
    steps += [_vlan_entry("add_vlan_entry", t.name, v, is_self)
              for v in t.vlans if not known or now.get(v.vid) != v]
    return steps


def _entries_after(state: HostState, targets: Mapping[str, Target], created: set[str],
                   t: Target) -> tuple[dict[int, BridgeVlan], bool]:
    """The visible VLAN entries of ``t`` once links are made, options set and ports
    joined, before any entry step; and whether they are known rather than what the
    kernel is expected to have made (then every wanted entry is added, which replaces
    the flags of one that exists)."""
    bridge_name = t.name if t.kind == "bridge" else t.master
    if bridge_name is None:
        return {}, True
    bridge = None if bridge_name in created else state.links.get(bridge_name)
    bt = targets.get(bridge_name)
    filtering = bt.vlan_filtering if bt and bt.vlan_filtering is not None else (
        bool(bridge and bridge.vlan_filtering))
    if not filtering:
        return {}, True
    old_pvid = bridge.default_pvid if bridge and bridge.default_pvid is not None else 1
    pvid = bt.default_pvid if bt and bt.default_pvid is not None else old_pvid
    link = None if t.name in created else state.links.get(t.name)
    if bridge is None or link is None or (t.kind != "bridge" and link.master != bridge_name):
        return ({pvid: BridgeVlan(pvid, True, True)} if pvid else {}), False
    if bridge.vlan_filtering:
        entries = {v.vid: v for v in link.vlans}
    else:  # hidden until filtering starts: what the kernel gave the port when it joined
        entries = {old_pvid: BridgeVlan(old_pvid, True, True)} if old_pvid else {}
    if pvid != old_pvid and entries.get(old_pvid) == BridgeVlan(old_pvid, True, True) \
            and pvid not in entries:
        del entries[old_pvid]
        if pvid:
            entries[pvid] = BridgeVlan(pvid, True, True)
    return entries, bool(bridge.vlan_filtering) and pvid == old_pvid


def after_teardown(state: HostState, steps: Iterable[Step]) -> HostState:
    """The state ``steps`` (teardown steps, address and route deletions, ``stop_dhcp``)
    leave ``state`` in, with what the kernel does by itself: a deleted link takes its
    addresses, routes and 802.1q devices with it and frees its ports; a port that leaves
    loses its VLAN entries, and is down with :data:`UNKNOWN_MTU` if it left a bond; a
    link that loses its last IPv4 address loses its IPv4 routes. A DHCP client that
    stops releases its lease: IPv4 takes every IPv4 address of the link (dhclient-script
    flushes them), IPv6 the link's dynamic global ones."""
    links = dict(state.links)
    addresses = list(state.addresses)
    routes = list(state.routes)
    for step in steps:
        name, args = step.link, step.args
        if step.action == "del_link":
            _drop_link(links, name)
        elif step.action == "set_master" and args.get("master") is None:
            links[name] = _freed(links[name], links)
        elif step.action == "set_up" and not args["up"]:
            links[name] = replace(links[name], up=False)
        elif step.action == "del_vlan_entry":
            link = links[name]
            links[name] = replace(link, vlans=tuple(v for v in link.vlans
                                                    if v.vid != args["vid"]))
        elif step.action == "del_address":
            gone = norm_interface(str(args["address"]))
            addresses = [a for a in addresses
                         if (a.link, norm_interface(a.address)) != (name, gone)]
            if not any(a.link == name and a.family == 4 for a in addresses):
                routes = [r for r in routes if r.link != name or r.family != 4]
        elif step.action == "del_route":
            key = step_route_key(step)
            routes = [r for r in routes if route_key(r) != key]
        elif step.action == "stop_dhcp":
            family = args["family"]
            addresses = [a for a in addresses if a.link != name or a.family != family or (
                family == 6 and (not a.dynamic or a.scope != "global"))]
            if family == 4:
                routes = [r for r in routes if r.link != name or r.family != 4]
        else:
            raise ValueError(f"not a teardown step: {step.describe()}")
    addresses = [a for a in addresses if a.link in links]
    routes = [r for r in routes if r.link is None or r.link in links]
    return HostState(links, tuple(addresses), tuple(routes), state.dns)


def _drop_link(links: dict[str, Link], name: str) -> None:
    gone = {name}
    while True:
        more = {n for n, link in links.items()
                if link.kind == "vlan" and link.vlan_parent in gone} - gone
        if not more:
            break
        gone |= more
    freed = {n: _freed(link, links) for n, link in links.items()
             if link.master in gone and n not in gone}
    for n in gone:
        links.pop(n, None)
    links.update(freed)


def _freed(link: Link, links: Mapping[str, Link]) -> Link:
    """``link`` once it left its master: a bond takes a slave down as it lets it go, and
    gives it back an MTU the state does not show."""
    master = links.get(link.master) if link.master is not None else None
    bond = master is not None and master.kind == "bond"
    return replace(link, master=None, vlans=(), up=link.up and not bond,
                   mtu=UNKNOWN_MTU if bond else link.mtu)
