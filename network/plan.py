"""The steps that apply a network request, and the steps that undo them.

:func:`plan` works from configs and the kernel's state: what a running network holds
that its request no longer wants is released (DHCP clients stopped, routes, addresses,
VLAN entries, ports, links), then what the request wants and the state lacks is built.
Releases of every removed and changed network come before anything is built, so a NIC,
an address or a default route can move from one network to another in one request.
Blocks go network removals and changes, then bond removals and changes, then the NICs
bonds let go of that nothing takes brought up again, then bonds built, then networks
changed and added, each in name order::

    release:  stop_dhcp, del_route, del_address, del_vlan_entry, set_master None, del_link
    build:    set_mtu (down), add_bond/add_vlan/add_bridge/set_mtu (up)/set_bridge/
              set_bond, set_master, add_vlan_entry, set_up, add_address, add_route,
              start_dhcp

A bond is built with the network whose port it is, so that it exists before the network
needs it; a bond no changed network uses is built on its own.

Addresses and routes on a link that is deleted are not deleted first: the kernel drops
them with the link. Networks not named in a request are never looked at.

:func:`restore` takes named links back to a snapshot in the same order. It knows nothing
of DHCP clients (they are not in :class:`HostState`): :func:`dhcp_steps` puts those
back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set

from virtnode.network.converge import (
    RouteKey,
    Target,
    after_teardown,
    build,
    route_key,
    route_step,
    teardown,
    upper_first,
)
from virtnode.network.layout import (
    MADE_KINDS,
    ROUTE_METRIC,
    Layout,
    default_gateways,
    families,
    ip_config,
    layout_of,
    network_mtu,
    norm_interface,
    static_addresses,
)
from virtnode.network.model import (
    Address,
    BondConfig,
    BridgeVlan,
    Family,
    Features,
    HostState,
    Link,
    NetworkConfig,
    Route,
    Step,
    after_request,
)

Dhcp = tuple[str, Family, bool]


def plan(state: HostState, running: Mapping[str, NetworkConfig],
         requested: Mapping[str, NetworkConfig | None], features: Features, *,
         running_bonds: Mapping[str, BondConfig] | None = None,
         requested_bonds: Mapping[str, BondConfig | None] | None = None) -> list[Step]:
    """The steps from ``state``, where the agent runs ``running`` and ``running_bonds``,
    to ``requested`` and ``requested_bonds`` (``None`` removes one). The request must have
    passed :func:`~virtnode.network.validate.validate`. A state that already matches
    gives ``[]``."""
    bonds_now = dict(running_bonds or {})
    bond_request = dict(requested_bonds or {})
    bonds = after_request(bonds_now, bond_request)
    removed = sorted(n for n, c in requested.items() if c is None and n in running)
    changed = sorted(n for n, c in requested.items() if c is not None and n in running)
    added = sorted(n for n, c in requested.items() if c is not None and n not in running)
    old = {n: layout_of(running[n], features, state) for n in removed + changed}
    new: dict[str, tuple[NetworkConfig, Layout]] = {}
    for n in changed + added:
        cfg = requested[n]
        assert cfg is not None
        new[n] = cfg, layout_of(cfg, features, state, old.get(n))
    steps: list[Step] = []
    now = state
    for n in removed + changed:
        block = _release(now, (running[n], old[n]), new.get(n), bonds)
        steps += block
        now = after_teardown(now, block)
    slaves = {name for name, link in now.links.items() if link.master in bonds_now}
    for n in sorted(bond_request):
        if n in bonds_now:
            block = _release_bond(now, bonds_now[n], bond_request[n])
            steps += block
            now = after_teardown(now, block)
    # The driver takes a slave down as it lets it go: one nothing takes up again is put
    # back up, as it was before it joined.
    used = {nic for bond in bonds.values() for nic in bond.slaves}
    used |= {lay.nic for _, lay in new.values() if lay.nic}
    for nic in sorted(slaves - used):
        if nic in now.links and now.links[nic].master is None:
            steps += build(now, {nic: Target(nic, now.links[nic].kind, up=True)})
    with_network = {lay.nic for _, lay in new.values() if lay.nic in bonds}
    for n in sorted(set(bond_request) & bonds.keys() - with_network):
        current = now.links.get(n)
        steps += build(now, _bond_targets(now, bonds[n], current.master if current else None))
    for n in changed + added:
        was = (running[n], old[n]) if n in running else None
        steps += _build(now, new[n], was, bonds)
    return steps


def _release(state: HostState, old: tuple[NetworkConfig, Layout],
             new: tuple[NetworkConfig, Layout] | None,
             bonds: Mapping[str, BondConfig]) -> list[Step]:
    old_lay = old[1]
    delete = [n for n in old_lay.made if new is None or n not in new[1].made]
    kept_dhcp = _dhcp(*new) if new else set()
    steps = [Step("stop_dhcp", device, {"family": family})
             for device, family, route in sorted(_dhcp(*old) - kept_dhcp)]
    have = {route_key(r) for r in state.routes}
    wanted = _routes(*new) if new else set()
    steps += [route_step("del_route", key) for key in sorted(_routes(*old), key=str)
              if key in have and key not in wanted and key[3] not in delete]
    present = _address_keys(state.addresses)
    kept = _addresses(*new) if new else set()
    steps += [Step("del_address", link, {"address": address})
              for link, address in sorted(_addresses(*old))
              if (link, address) in present and (link, address) not in kept
              and link not in delete]
    targets = _targets(state, *new, bonds) if new else {}
    if old_lay.nic and old_lay.nic not in targets and old_lay.nic in state.links:
        targets[old_lay.nic] = Target(old_lay.nic, state.links[old_lay.nic].kind)
    return steps + teardown(state, targets, delete)


def _release_bond(state: HostState, old: BondConfig, new: BondConfig | None) -> list[Step]:
    """A bond deleted (the kernel lets its slaves go), or the slaves it no longer has
    released; a new mode releases them all (see :func:`converge.teardown`)."""
    link = state.links.get(old.name)
    if link is None:
        return []
    if new is None:
        return teardown(state, {}, [old.name])
    targets = {port: Target(port, state.links[port].kind)
               for port in state.ports_of(old.name) if port not in new.slaves}
    targets[old.name] = Target(old.name, "bond", master=link.master, bond_mode=new.mode)
    return teardown(state, targets, [])


def _bond_targets(state: HostState, bond: BondConfig, master: str | None,
                  mtu: int | None = None, vlans: tuple[BridgeVlan, ...] | None = None,
                  ) -> dict[str, Target]:
    """A bond and its slaves. The bond sets its slaves' MTU: theirs is left to it."""
    targets = {slave: Target(slave, link.kind if (link := state.links.get(slave)) else
                             "device", master=bond.name, up=True) for slave in bond.slaves}
    targets[bond.name] = Target(bond.name, "bond", master=master, mtu=mtu, up=True,
                                vlans=vlans, bond_mode=bond.mode, miimon=bond.miimon)
    return targets


def _build(state: HostState, new: tuple[NetworkConfig, Layout],
           old: tuple[NetworkConfig, Layout] | None,
           bonds: Mapping[str, BondConfig]) -> list[Step]:
    steps = build(state, _targets(state, *new, bonds))
    present = _address_keys(state.addresses)
    steps += [Step("add_address", link, {"address": address})
              for link, address in sorted(_addresses(*new)) if (link, address) not in present]
    have = {route_key(r) for r in state.routes}
    steps += [route_step("add_route", key) for key in sorted(_routes(*new), key=str)
              if key not in have]
    started = _dhcp(*old) if old else set()
    steps += [Step("start_dhcp", device, {"family": family, "default_route": route})
              for device, family, route in sorted(_dhcp(*new) - started)]
    return steps


def _targets(state: HostState, cfg: NetworkConfig, lay: Layout,
             bonds: Mapping[str, BondConfig]) -> dict[str, Target]:
    """What each link of a network should be, with its bond's slaves if its port is one."""
    mtu = network_mtu(cfg)
    vid = lay.vid if lay.filtering else None
    targets: dict[str, Target] = {}
    if lay.nic:
        link = state.links.get(lay.nic)
        master = lay.bridge if lay.bridge_port == lay.nic else None
        uplink = (BridgeVlan(vid, pvid=False, untagged=False),) if vid else ()
        if lay.nic in bonds:
            targets.update(_bond_targets(state, bonds[lay.nic], master, mtu, uplink))
        else:
            targets[lay.nic] = Target(lay.nic, link.kind if link else "device", mtu=mtu,
                                      up=True, master=master, vlans=uplink)
    if lay.vlan_dev:
        targets[lay.vlan_dev] = Target(lay.vlan_dev, "vlan", master=lay.bridge, mtu=mtu,
                                       up=True, parent=lay.nic, vid=lay.vid, vlans=())
    if lay.bridge:
        targets[lay.bridge] = Target(
            lay.bridge, "bridge", mtu=mtu, up=True, stp=cfg.stp,
            vlan_filtering=lay.filtering, default_pvid=vid,
            vlans=(BridgeVlan(vid, pvid=True, untagged=True),) if vid else ())
    return targets


def _addresses(cfg: NetworkConfig, lay: Layout) -> set[tuple[str, str]]:
    if lay.device is None:
        return set()
    return {(lay.device, address) for _, address in static_addresses(cfg)}


def _address_keys(addresses: Iterable[Address]) -> set[tuple[str, str]]:
    return {(a.link, norm_interface(a.address)) for a in addresses}


def _routes(cfg: NetworkConfig, lay: Layout) -> set[RouteKey]:
    if lay.device is None:
        return set()
    return {("default", family, gateway, lay.device, ROUTE_METRIC[family])
            for family, gateway in default_gateways(cfg)}


def _dhcp(cfg: NetworkConfig, lay: Layout) -> set[Dhcp]:
    if lay.device is None:
        return set()
    return {(lay.device, family, cfg.default_route) for family in families()
            if ip_config(cfg, family).method == "dhcp"}


def dhcp_clients(state: HostState, running: Mapping[str, NetworkConfig],
                 features: Features) -> set[Dhcp]:
    """The DHCP clients the ``running`` networks want: (device, family, default_route)."""
    wanted: set[Dhcp] = set()
    for cfg in running.values():
        wanted |= _dhcp(cfg, layout_of(cfg, features, state))
    return wanted


def dhcp_steps(wanted: Set[Dhcp], running: Set[tuple[str, Family]]) -> list[Step]:
    """Stop the clients in ``running`` (link, family) that are not ``wanted``, then start
    the wanted ones that do not run."""
    keep = {(device, family) for device, family, _ in wanted}
    return [Step("stop_dhcp", link, {"family": family})
            for link, family in sorted(set(running) - keep)] + [
        Step("start_dhcp", device, {"family": family, "default_route": route})
        for device, family, route in sorted(wanted) if (device, family) not in running]


# --- undoing ---------------------------------------------------------------------------------


def touched(steps: Iterable[Step], state: HostState) -> set[str]:
    """Every link ``steps`` name, as the link acted on, a master or an 802.1q parent, and
    the ports of the links they delete, which the kernel lets go (``state`` is the host
    before the steps)."""
    names: set[str] = set()
    for step in steps:
        names.add(step.link)
        for key in ("master", "parent"):
            value = step.args.get(key)
            if isinstance(value, str):
                names.add(value)
        if step.action == "del_link":
            names.update(state.ports_of(step.link))
    return names


def restore(current: HostState, snapshot: HostState, links: Set[str]) -> list[Step]:
    """The steps that take ``links`` from ``current`` back to how ``snapshot`` had them:
    bridges, 802.1q devices and bonds deleted or re-created, masters, MTUs, bridge and
    bond options, VLAN entries, up/down, addresses and routes. Dynamic addresses, IPv6 link-local
    ones and ``kernel`` routes are left to the kernel and DHCP clients. A NIC that went
    away stays away."""
    delete = [n for n in upper_first(links & current.links.keys(), current)
              if current.links[n].kind in MADE_KINDS
              and not _same_device(current.links[n], snapshot.links.get(n))]
    targets = {n: _target(link, snapshot) for n in links if (link := snapshot.links.get(n))
               and ((n in current.links and n not in delete) or link.kind in MADE_KINDS)}
    kept_routes = {route_key(r) for r in snapshot.routes if _restorable_route(r, links)}
    steps = [route_step("del_route", key)
             for key in sorted({route_key(r) for r in current.routes
                                if _restorable_route(r, links)} - kept_routes, key=str)
             if key[3] not in delete]
    kept_addresses = _address_keys(a for a in snapshot.addresses if _restorable(a, links))
    steps += [Step("del_address", link, {"address": address})
              for link, address in sorted(_address_keys(
                  a for a in current.addresses if _restorable(a, links)) - kept_addresses)
              if link not in delete]
    steps += teardown(current, targets, delete)
    now = after_teardown(current, steps)
    steps += build(now, targets)
    steps += [Step("add_address", link, {"address": address})
              for link, address in sorted(kept_addresses - _address_keys(now.addresses))
              if link in targets]
    have = {route_key(r) for r in now.routes}
    steps += [route_step("add_route", key) for key in sorted(kept_routes - have, key=str)
              if key[3] in targets]
    return steps


def _same_device(link: Link, then: Link | None) -> bool:
    return then is not None and then.kind == link.kind and (
        (link.vlan_parent, link.vlan_id) == (then.vlan_parent, then.vlan_id))


def _target(link: Link, snapshot: HostState) -> Target:
    master = snapshot.links.get(link.master) if link.master is not None else None
    in_bond = master is not None and master.kind == "bond"
    return Target(link.name, link.kind, master=link.master,
                  mtu=None if in_bond else link.mtu, up=link.up,
                  mac=link.mac if link.kind in MADE_KINDS else None,
                  parent=link.vlan_parent, vid=link.vlan_id, stp=link.stp,
                  vlan_filtering=link.vlan_filtering, default_pvid=link.default_pvid,
                  vlans=link.vlans, bond_mode=link.bond_mode, miimon=link.miimon)


def _restorable(address: Address, links: Set[str]) -> bool:
    return (address.link in links and not address.dynamic
            and not (address.family == 6 and address.scope == "link"))


def _restorable_route(route: Route, links: Set[str]) -> bool:
    return route.link in links and route.proto != "kernel"
