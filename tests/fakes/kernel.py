"""A kernel's network side, simulated for the network planner's unit tests.

:class:`Kernel` holds what :class:`~virtnode.network.model.HostState` shows of a host
(links, addresses, routes) and applies the planner's steps to it one at a time, the way
rtnetlink would: refusals included (an 802.1q device above its parent's MTU, a route via an
unreachable gateway, deleting what is not there...), and with the kernel's side effects (a
deleted link takes its addresses, routes and 802.1q devices and frees its ports; a port
joining a bridge gets the default PVID; bridge VLAN entries are hidden while the bridge
does not filter). Bonds follow the bonding driver: a link joins one only while down, and
the bond opens it and gives it its MTU; a slave that leaves, or whose bond is deleted, is
closed and gets back the MTU it had before it joined; a bond takes a new mode only while
down without slaves, and sets its slaves' MTU with its own. DHCP clients are a set of
(link, family): :meth:`Kernel.lease` is what dhclient-script does when an IPv4 lease
arrives, and stopping a client releases its lease.

How faithfully: in the state the planner reads, for the refusals and side effects above and
no others. A refusal is :class:`Refused` with a message, not an errno. Nothing takes time:
a link set up has carrier at once (even a bridge with no ports), and there is no duplicate
address detection, IPv6 autoconfiguration or neighbour state. Adding an address adds no
prefix route; removing a link's last IPv4 address takes all of its IPv4 routes. Only
bridges, VLANs and bonds can be made or deleted; NICs, taps and the like are whatever the
starting state has, and a bond slave there gets the MTU it has now back when it leaves.

:class:`Host` is the real planner (``validate`` then ``plan``) driving a :class:`Kernel`
that starts as :data:`BASE`, with the networks and bonds the agent runs there.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from tests.fakes.netstates import ALL, bridge, link
from virtnode.network.model import (
    BOND_MODES,
    Address,
    BondConfig,
    BridgeVlan,
    Features,
    HostState,
    Link,
    NetworkConfig,
    Route,
    Step,
    after_request,
)
from virtnode.network.plan import plan
from virtnode.network.validate import validate


class Refused(Exception):
    """What the kernel would answer with an errno."""


class Kernel:
    """A host's links, addresses and routes, changed one step at a time."""

    def __init__(self, state: HostState) -> None:
        self.links: dict[str, Link] = {}
        for name, found in state.links.items():
            self.links[name] = found
        # Entries a bridge that does not filter hides: what the kernel gave them.
        for name, found in state.links.items():
            if found.kind == "bridge" and not found.vlan_filtering:
                self.links[name] = replace(found, vlans=self._default_entry(name))
            elif found.master and not state.links[found.master].vlan_filtering:
                self.links[name] = replace(found, vlans=self._default_entry(found.master))
        self.addresses = list(state.addresses)
        self.routes = list(state.routes)
        self.dhcp: set[tuple[str, int]] = set()
        self.macs = itertools.count(1)
        # What the bonding driver keeps of each slave: its MTU from before it joined.
        self.slave_mtu = {name: found.mtu for name, found in state.links.items()
                          if found.master and state.links[found.master].kind == "bond"}

    def read(self) -> HostState:
        links = {}
        for name, found in self.links.items():
            bridge = name if found.kind == "bridge" else found.master
            visible = bridge is not None and bool(self.links[bridge].vlan_filtering)
            links[name] = found if visible else replace(found, vlans=())
        return HostState(links, tuple(self.addresses), tuple(sorted(self.routes, key=repr)))

    def apply(self, steps: Iterable[Step]) -> None:
        for step in steps:
            args = dict(step.args)
            if "self" in args:
                args["on_bridge"] = args.pop("self")
            getattr(self, step.action)(step.link, **args)

    # links

    def _new(self, name: str) -> None:
        if name in self.links:
            raise Refused(f"{name} exists")

    def _get(self, name: str) -> Link:
        if name not in self.links:
            raise Refused(f"no link {name}")
        return self.links[name]

    def _default_entry(self, bridge: str) -> tuple[BridgeVlan, ...]:
        pvid = self.links[bridge].default_pvid
        return (BridgeVlan(pvid, True, True),) if pvid else ()

    def add_bridge(self, name: str, *, stp: bool, vlan_filtering: bool, mtu: int = 1500,
                   default_pvid: int = 1, mac: str | None = None) -> None:
        self._new(name)
        self.links[name] = link(name, "bridge", up=False, mtu=mtu, stp=stp,
                                vlan_filtering=vlan_filtering, default_pvid=default_pvid,
                                mac=mac or f"02:00:00:00:00:{next(self.macs):02x}")
        self.links[name] = replace(self.links[name], vlans=self._default_entry(name))

    def add_vlan(self, name: str, *, parent: str, vid: int, mtu: int | None = None,
                 mac: str | None = None) -> None:
        self._new(name)
        below = self._get(parent)
        if any(x.vlan_parent == parent and x.vlan_id == vid for x in self.links.values()):
            raise Refused(f"{parent} has VLAN {vid}")
        if mtu is not None and mtu > below.mtu:
            raise Refused(f"MTU {mtu} over {parent}'s {below.mtu}")
        self.links[name] = link(name, "vlan", up=False, mtu=mtu or below.mtu,
                                mac=mac or below.mac, vlan_id=vid, vlan_parent=parent)

    def add_bond(self, name: str, *, mode: str, miimon: int, mtu: int = 1500,
                 mac: str | None = None) -> None:
        self._new(name)
        if mode not in BOND_MODES:
            raise Refused(f"no bond mode {mode}")
        self.links[name] = link(name, "bond", up=False, mtu=mtu, bond_mode=mode,
                                miimon=miimon,
                                mac=mac or f"02:00:00:00:00:{next(self.macs):02x}")

    def set_bond(self, name: str, *, mode: str | None = None,
                 miimon: int | None = None) -> None:
        found = self._get(name)
        if found.kind != "bond":
            raise Refused(f"{name} is not a bond")
        if mode is not None and mode != found.bond_mode:
            if mode not in BOND_MODES:
                raise Refused(f"no bond mode {mode}")
            if found.up or self._ports(name):
                raise Refused(f"{name}: the mode changes only while down without slaves")
            found = replace(found, bond_mode=mode)
        if miimon is not None:
            found = replace(found, miimon=miimon)
        self.links[name] = found

    def del_link(self, name: str) -> None:
        if self._get(name).kind not in ("bridge", "vlan", "bond"):
            raise Refused(f"{name} is not a link the agent made")
        gone = {name} | {n for n, x in self.links.items() if x.vlan_parent == name}
        for n in sorted(gone):
            if self.links[n].kind == "bond":
                for slave in self._ports(n):
                    self._release(slave)
        for n in gone:
            del self.links[n]
        for n, x in self.links.items():
            if x.master in gone:
                self.links[n] = replace(x, master=None, vlans=())
        self.addresses = [a for a in self.addresses if a.link not in gone]
        self.routes = [r for r in self.routes if r.link not in gone]

    def set_master(self, name: str, *, master: str | None) -> None:
        found = self._get(name)
        if master is not None and self._get(master).kind == "bond":
            self._enslave(name, master)
            return
        if master is not None and self.links[master].kind != "bridge":
            raise Refused(f"{master} is not a bridge or bond")
        if found.master is not None and self.links[found.master].kind == "bond":
            self._release(name)  # rtnetlink lets go of the old master first
            found = self.links[name]
        entries = self._default_entry(master) if master else ()
        self.links[name] = replace(found, master=master, vlans=entries)

    def _ports(self, master: str) -> list[str]:
        return sorted(n for n, x in self.links.items() if x.master == master)

    def _enslave(self, name: str, bond: str) -> None:
        found, above = self.links[name], self.links[bond]
        if found.up:
            raise Refused("Device can not be enslaved while up")
        if found.master is not None:
            raise Refused(f"{name} is enslaved to {found.master}")
        if found.kind in ("bond", "bridge", "vlan"):
            raise Refused(f"a {found.kind} can not be a slave")
        if not (found.min_mtu or 0) <= above.mtu <= (found.max_mtu or 65535):
            raise Refused(f"{name} does not take {bond}'s MTU {above.mtu}")
        self.slave_mtu[name] = found.mtu
        self.links[name] = replace(found, master=bond, vlans=(), mtu=above.mtu, up=True,
                                   carrier=True, operstate="up")

    def _release(self, name: str) -> None:
        """The bonding driver letting go of a slave: closed, its own MTU back."""
        found = self.links[name]
        self.links[name] = replace(found, master=None, vlans=(), up=False, carrier=False,
                                   operstate="down", mtu=self.slave_mtu.pop(name, found.mtu))

    def set_mtu(self, name: str, *, mtu: int) -> None:
        found = self._get(name)
        if not (found.min_mtu or 0) <= mtu <= (found.max_mtu or 65535):
            raise Refused(f"MTU {mtu} out of range for {name}")
        if found.vlan_parent and mtu > self.links[found.vlan_parent].mtu:
            raise Refused(f"MTU {mtu} over {found.vlan_parent}'s")
        slaves = self._ports(name) if found.kind == "bond" else []
        for n in slaves:
            x = self.links[n]
            if not (x.min_mtu or 0) <= mtu <= (x.max_mtu or 65535):
                raise Refused(f"MTU {mtu} out of range for {name}'s slave {n}")
        self.links[name] = replace(found, mtu=mtu)
        for n in slaves:
            self.links[n] = replace(self.links[n], mtu=mtu)
        for n, x in self.links.items():
            if x.vlan_parent == name and x.mtu > mtu:
                self.links[n] = replace(x, mtu=mtu)

    def set_up(self, name: str, *, up: bool) -> None:
        self.links[name] = replace(self._get(name), up=up, carrier=up,
                                   operstate="up" if up else "down")

    def set_bridge(self, name: str, *, stp: bool | None = None,
                   vlan_filtering: bool | None = None, default_pvid: int | None = None) -> None:
        found = self._get(name)
        if found.kind != "bridge":
            raise Refused(f"{name} is not a bridge")
        if stp is not None:
            found = replace(found, stp=stp)
        if vlan_filtering is not None:
            found = replace(found, vlan_filtering=vlan_filtering)
        self.links[name] = found
        if default_pvid is not None and default_pvid != found.default_pvid:
            old = found.default_pvid or 0
            self.links[name] = replace(found, default_pvid=default_pvid)
            # Entries still on the old default move to the new one (br_vlan.c).
            for n in [name, *(n for n, x in self.links.items() if x.master == name)]:
                entries = {v.vid: v for v in self.links[n].vlans}
                if entries.get(old) == BridgeVlan(old, True, True) \
                        and default_pvid not in entries:
                    del entries[old]
                    entries[default_pvid] = BridgeVlan(default_pvid, True, True)
                    self.links[n] = replace(self.links[n], vlans=tuple(
                        entries[v] for v in sorted(entries)))

    def add_vlan_entry(self, name: str, *, vid: int, pvid: bool, untagged: bool,
                       on_bridge: bool) -> None:
        found = self._get(name)
        if (found.kind != "bridge") if on_bridge else (
                found.master is None or self.links[found.master].kind != "bridge"):
            raise Refused(f"{name} takes no {'bridge' if on_bridge else 'port'} VLAN entry")
        entries = {v.vid: v for v in found.vlans}
        if pvid:
            entries = {k: replace(v, pvid=False) for k, v in entries.items()}
        entries[vid] = BridgeVlan(vid, pvid, untagged)
        self.links[name] = replace(found, vlans=tuple(entries[v] for v in sorted(entries)))

    def del_vlan_entry(self, name: str, *, vid: int, pvid: bool, untagged: bool,
                       on_bridge: bool) -> None:
        found = self._get(name)
        if vid not in {v.vid for v in found.vlans}:
            raise Refused(f"{name} has no VLAN {vid}")
        self.links[name] = replace(found, vlans=tuple(v for v in found.vlans if v.vid != vid))

    # addresses and routes

    def add_address(self, name: str, *, address: str) -> None:
        self._get(name)
        iface = ipaddress.ip_interface(address)
        if any((a.link, a.address) == (name, str(iface)) for a in self.addresses):
            raise Refused(f"{address} exists on {name}")
        scope = "link" if iface.ip.is_link_local and iface.version == 6 else "global"
        self.addresses.append(Address(name, str(iface), iface.version, scope))  # type: ignore[arg-type]

    def del_address(self, name: str, *, address: str) -> None:
        kept = [a for a in self.addresses if (a.link, a.address) != (name, address)]
        if len(kept) == len(self.addresses):
            raise Refused(f"no {address} on {name}")
        self.addresses = kept
        if not any(a.link == name and a.family == 4 for a in kept):
            self.routes = [r for r in self.routes if r.link != name or r.family != 4]

    def add_route(self, name: str, *, dst: str, family: int, metric: int,
                  gateway: str | None = None) -> None:
        found = self._get(name)
        if family == 4 and not found.up:
            raise Refused(f"{name} is down")
        if gateway is not None and not ipaddress.ip_address(gateway).is_link_local and not any(
                a.link == name and ipaddress.ip_address(gateway)
                in ipaddress.ip_interface(a.address).network for a in self.addresses):
            raise Refused(f"{gateway} is not reachable on {name}")
        route = Route(dst, family, gateway, name, metric, proto="static")  # type: ignore[arg-type]
        if route in self.routes:
            raise Refused("route exists")
        self.routes.append(route)

    def del_route(self, name: str, *, dst: str, family: int, metric: int,
                  gateway: str | None = None) -> None:
        kept = [r for r in self.routes
                if (r.dst, r.family, r.gateway, r.link, r.metric)
                != (dst, family, gateway, name, metric)]
        if len(kept) == len(self.routes):
            raise Refused("no such route")
        self.routes = kept

    def start_dhcp(self, name: str, *, family: int, default_route: bool) -> None:
        self._get(name)
        if (name, family) in self.dhcp:
            raise Refused("DHCP client runs")
        self.dhcp.add((name, family))

    def stop_dhcp(self, name: str, *, family: int) -> None:
        # The lease is released: dhclient-script flushes the link's IPv4 addresses (and
        # the kernel the routes that needed them), or its dynamic global IPv6 ones.
        self.dhcp.remove((name, family))
        self.addresses = [a for a in self.addresses if a.link != name or a.family != family
                          or (family == 6 and (not a.dynamic or a.scope != "global"))]
        if family == 4:
            self.routes = [r for r in self.routes if r.link != name or r.family != 4]

    def lease(self, name: str, address: str, router: str | None) -> None:
        """What dhclient-script does when an IPv4 lease arrives."""
        assert (name, 4) in self.dhcp
        self.addresses.append(Address(name, address, 4, dynamic=True))
        if router is not None:
            self.routes.append(Route("default", 4, gateway=router, link=name, proto="boot"))


#: A host with free NICs (eth3 down, eth4 a jumbo-capable NIC at 9000), a management
#: NIC with its own address and route, and a bridge with a VM tap that is not ours.
BASE = HostState(
    links={
        "lo": link("lo", "loopback", mtu=65536),
        "eth0": link("eth0", "device"),
        "eth1": link("eth1"),
        "eth2": link("eth2"),
        "eth3": link("eth3", up=False),
        "eth4": link("eth4", "device", mtu=9000, max_mtu=9000),
        "br-ex": bridge("br-ex"),
        "tap9": link("tap9", "tun", master="br-ex"),
    },
    addresses=(
        Address("lo", "127.0.0.1/8", 4, scope="host"),
        Address("eth0", "192.0.2.10/24", 4, dynamic=True),
        Address("eth0", "fe80::10/64", 6, scope="link"),
    ),
    routes=(Route("10.99.0.0/16", 4, gateway="192.0.2.1", link="eth0", proto="dhcp"),
            Route("192.0.2.0/24", 4, link="eth0", proto="kernel", scope="link")),
)

#: The links of :data:`BASE` that are not the agent's.
UNMANAGED = {"lo", "eth0", "br-ex", "tap9"}


@dataclass
class Host:
    """A simulated host with the networks and bonds the agent runs on it."""

    kernel: Kernel
    running: dict[str, NetworkConfig]
    features: Features
    bonds: dict[str, BondConfig] = field(default_factory=dict)

    @classmethod
    def with_networks(cls, features: Features = ALL, *, bonds: Iterable[BondConfig] = (),
                      **networks: NetworkConfig) -> Host:
        host = cls(Kernel(BASE), {}, features)
        host.setup(networks, {b.name: b for b in bonds})
        return host

    @property
    def state(self) -> HostState:
        return self.kernel.read()

    def plan(self, requested: Mapping[str, NetworkConfig | None],
             bonds: Mapping[str, BondConfig | None] | None = None) -> list[Step]:
        validate(requested, self.running, self.state, self.features, bond_request=bonds,
                 running_bonds=self.bonds)
        return plan(self.state, self.running, requested, self.features,
                    running_bonds=self.bonds, requested_bonds=bonds)

    def setup(self, requested: Mapping[str, NetworkConfig | None],
              bonds: Mapping[str, BondConfig | None] | None = None) -> list[Step]:
        steps = self.plan(requested, bonds)
        self.kernel.apply(steps)
        for name, cfg in requested.items():
            if cfg is None:
                del self.running[name]
            else:
                self.running[name] = cfg
        self.bonds = after_request(self.bonds, bonds or {})
        return steps
