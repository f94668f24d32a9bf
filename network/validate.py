"""Whether a ``Network.setup`` request makes sense on this host, decided before anything
changes.

:func:`validate` raises on the first problem it finds; bonds are checked in name order,
then networks, each one completely, then the checks that span networks run. Every
refusal is :class:`InvalidArgument` with ``object="network"``, ``id=<network>`` and
``field="networks.<network>[.<field>]"`` (``object="bond"`` and ``bonds.<bond>`` for a
bond), and one of these reasons::

    bad_name            network, bond or 802.1q device name the kernel would refuse, or
                        one starting with '-' (which command-line tools read as an option)
    name_in_use         the name of a link the agent does not manage, or another network's
                        or bond's
    unknown_nic         a port or slave that is not a link of this host
    bad_port            a port that is not NIC-like (bridge, loopback, vlan, tun...), a
                        slave that is not a NIC, or one listed twice
    nic_in_use          a port or slave used by another network or bond, or enslaved to
                        an unmanaged master
    bond_in_use         removing a bond that a network keeps as its port
    too_many_ports      more than one port (a network has one uplink; VMs' taps join it)
    no_port             a bridgeless network, or a VLAN network, without its port; a bond
                        without slaves
    port_has_addresses  a port carrying global addresses the agent does not manage
    bad_vlan            a VLAN id outside 1..4094
    unsupported         the kernel lacks what the network needs (bridge, VLAN support,
                        bonding)
    bad_mtu             outside 68..65535, outside a port's range, under 1280 with IPv6
    bad_address         unparsable, wrong family, missing, or given where it means nothing
    address_overlap     a subnet that overlaps another network's or an unmanaged link's
    bad_route           default_route without a gateway or DHCP, or a second default route
    bad_option          stp on a bridgeless network; an unknown bond mode, a negative
                        miimon

Removing a network or bond the agent does not manage is :class:`NotFound`
(``no_network``, ``no_bond``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from virtnode.errors import InvalidArgument, NotFound
from virtnode.network.layout import (
    Layout,
    default_route_families,
    families,
    ip_config,
    layout_of,
    managed_links,
    network_mtu,
)
from virtnode.network.model import (
    BOND_MODES,
    MAX_NAME_BYTES,
    BondConfig,
    Family,
    Features,
    HostState,
    IpConfig,
    NetworkConfig,
    after_request,
)

PORT_KINDS = frozenset({"device", "veth", "bond"})
SLAVE_KINDS = frozenset({"device", "veth"})
MAX_MIIMON = 2**31 - 1
MIN_MTU, MAX_MTU, MIN_IPV6_MTU = 68, 65535, 1280

IpInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class _Host:
    """The request seen against the host: what each network will be once it applies."""

    requested: Mapping[str, NetworkConfig | None]
    running: Mapping[str, NetworkConfig]
    state: HostState
    features: Features
    final: Mapping[str, NetworkConfig]
    layouts: Mapping[str, Layout]
    #: Links the agent made for running networks, with their network.
    owner: Mapping[str, str]
    #: The links carrying running networks' addresses.
    address_devices: frozenset[str]
    bond_request: Mapping[str, BondConfig | None]
    running_bonds: Mapping[str, BondConfig]
    #: The bonds managed once the request applies.
    bonds: Mapping[str, BondConfig]

    def may_use(self, network: str, link: str) -> bool:
        """Whether ``network`` may take the name ``link``: no such link, or one the
        agent made for this network or for a network the request changes or removes."""
        if link not in self.state.links:
            return True
        owner = self.owner.get(link)
        return owner is not None and (owner == network or owner in self.requested)

    def bond_of(self, nic: str, other_than: str) -> str | None:
        """The bond other than ``other_than`` that has ``nic`` as a slave once the
        request applies."""
        return next((b.name for b in self.bonds.values()
                     if nic in b.slaves and b.name != other_than), None)

    def network_of(self, nic: str, other_than: str) -> str | None:
        """The network other than ``other_than`` that has ``nic`` as its port once the
        request applies."""
        return min((n for n, lay in self.layouts.items() if lay.nic == nic and n != other_than),
                   default=None)

    def may_take(self, owner: str, master: str) -> bool:
        """Whether a NIC in ``master`` now may become the port or slave of ``owner`` (a
        network or bond): ``master`` is ``owner``, a managed bond, or a link of a network
        the request changes."""
        return master == owner or master in self.running_bonds or self.may_use(owner, master)


def validate(requested: Mapping[str, NetworkConfig | None], running: Mapping[str, NetworkConfig],
             state: HostState, features: Features, *,
             bond_request: Mapping[str, BondConfig | None] | None = None,
             running_bonds: Mapping[str, BondConfig] | None = None) -> None:
    """Check a request (``None`` removes a network or bond) against the running networks
    and bonds and the host. Raises :class:`InvalidArgument` or :class:`NotFound` on the
    first problem."""
    host = _host(requested, running, state, features, bond_request=bond_request or {},
                 running_bonds=running_bonds or {})
    for name in sorted(host.bond_request):
        bond = host.bond_request[name]
        if bond is None:
            _check_bond_removal(host, name)
        else:
            if bond.name != name:
                raise ValueError(f"config of {bond.name!r} requested as {name!r}")
            _check_bond(host, bond)
    for name in sorted(requested):
        cfg = requested[name]
        if cfg is None:
            if name not in running:
                raise NotFound(f"network {name!r} is not managed by this agent",
                               reason="no_network", object="network", id=name,
                               field=f"networks.{name}")
            continue
        if cfg.name != name:
            raise ValueError(f"config of {cfg.name!r} requested as {name!r}")
        _check_network(host, cfg)
    _check_link_names(host)
    _check_overlaps(host)
    _check_default_routes(host)


def _host(requested: Mapping[str, NetworkConfig | None], running: Mapping[str, NetworkConfig],
          state: HostState, features: Features, *,
          bond_request: Mapping[str, BondConfig | None],
          running_bonds: Mapping[str, BondConfig]) -> _Host:
    final = after_request(running, requested)
    old = {n: layout_of(c, features, state) for n, c in running.items()}
    layouts = {n: layout_of(c, features, state, old.get(n)) for n, c in final.items()}
    devices = frozenset(d for lay in old.values() if (d := lay.device))
    return _Host(requested, running, state, features, final, layouts,
                 managed_links(running, features, state), devices, bond_request,
                 running_bonds, after_request(running_bonds, bond_request))


def _refuse(name: str, reason: str, message: str, where: str = "",
            what: str = "network") -> InvalidArgument:
    group = f"{what}s.{name}"
    return InvalidArgument(f"{what} {name!r}: {message}", reason=reason, object=what,
                           id=name, field=f"{group}.{where}" if where else group)


def _refuse_bond(name: str, reason: str, message: str, where: str = "") -> InvalidArgument:
    return _refuse(name, reason, message, where, "bond")


def _check_bond_removal(host: _Host, name: str) -> None:
    if name not in host.running_bonds:
        raise NotFound(f"bond {name!r} is not managed by this agent", reason="no_bond",
                       object="bond", id=name, field=f"bonds.{name}")
    users = sorted(n for n, lay in host.layouts.items() if lay.nic == name)
    if users:
        raise _refuse_bond(name, "bond_in_use", f"network {users[0]!r} has it as its port; "
                           "remove the network or give it another port in the same request")


def _check_bond(host: _Host, bond: BondConfig) -> None:
    name = bond.name
    if not host.features.bond:
        raise _refuse_bond(name, "unsupported", "the kernel has no bonding")
    _check_name(name, "bond")
    if name in host.final or any(name in lay.made for lay in host.layouts.values()):
        raise _refuse_bond(name, "name_in_use", "it is the name of a network's link")
    if name in host.state.links and name not in host.running_bonds:
        raise _refuse_bond(name, "name_in_use", "a link of that name exists and is not a "
                           "bond this agent manages")
    if bond.mode not in BOND_MODES:
        raise _refuse_bond(name, "bad_option", f"mode {bond.mode[:40]!r} is not one of "
                           f"{', '.join(BOND_MODES)}", "mode")
    if not 0 <= bond.miimon <= MAX_MIIMON:
        raise _refuse_bond(name, "bad_option", f"miimon {bond.miimon} is outside "
                           f"0..{MAX_MIIMON} ms", "miimon")
    if not bond.slaves:
        raise _refuse_bond(name, "no_port", "a bond needs at least one slave", "slaves")
    for nic in bond.slaves:
        _check_slave(host, bond, nic)


def _check_slave(host: _Host, bond: BondConfig, nic: str) -> None:
    def refuse(reason: str, message: str) -> InvalidArgument:
        return _refuse_bond(bond.name, reason, message, "slaves")

    if bond.slaves.count(nic) > 1:
        raise refuse("bad_port", f"{nic!r} is listed twice")
    _check_nic(host, bond.name, nic, SLAVE_KINDS, refuse)


def _check_nic(host: _Host, owner: str, nic: str, kinds: frozenset[str],
               refuse: Callable[[str, str], InvalidArgument]) -> None:
    """What a network's port and a bond's slave have to be: a link of one of ``kinds``
    that no other network or bond has, in no master the agent does not manage, and
    without global addresses the agent does not manage."""
    link = host.state.links.get(nic)
    if link is None:
        raise refuse("unknown_nic", f"there is no link {nic!r}")
    if link.kind not in kinds:
        raise refuse("bad_port", f"{nic!r} is a {link.kind} link, not a NIC")
    if (bond := host.bond_of(nic, other_than=owner)) is not None:
        raise refuse("nic_in_use", f"{nic!r} is a slave of bond {bond!r}")
    if (network := host.network_of(nic, other_than=owner)) is not None:
        raise refuse("nic_in_use", f"{nic!r} is the port of network {network!r}")
    if link.master is not None and not host.may_take(owner, link.master):
        raise refuse("nic_in_use", f"{nic!r} is enslaved to {link.master!r}")
    if nic not in host.address_devices:
        found = [a.address for a in host.state.addresses_of(nic) if a.scope == "global"]
        if found:
            raise refuse("port_has_addresses", f"{nic!r} carries {found[0]}, which this "
                         "agent does not manage")


def _check_network(host: _Host, cfg: NetworkConfig) -> None:
    _check_name(cfg.name, "network")
    if cfg.name in host.bonds:
        raise _refuse(cfg.name, "name_in_use", "it is the name of a bond")
    if not host.may_use(cfg.name, cfg.name):
        raise _refuse(cfg.name, "name_in_use", "a link of that name exists and is not "
                      "managed by this agent")
    if cfg.stp and not cfg.bridge:
        raise _refuse(cfg.name, "bad_option", "stp needs a bridge", "stp")
    _check_ports(host, cfg)
    _check_vlan(host, cfg)
    _check_mtu(host, cfg)
    for family in families():
        _check_ip(cfg.name, family, ip_config(cfg, family))
    if cfg.default_route and not any(default_route_families(cfg)):
        raise _refuse(cfg.name, "bad_route", "default_route needs a static gateway or DHCP",
                      "default_route")


def _check_name(name: str, what: str) -> None:
    shown = repr(name[:40])
    if not name:
        problem = f"a {what} needs a name"
    elif name in (".", ".."):
        problem = f"{shown} is not a link name"
    elif len(name.encode()) > MAX_NAME_BYTES:
        problem = f"{shown} is longer than {MAX_NAME_BYTES} bytes"
    elif any(c in "/:\0" or c.isspace() for c in name):
        problem = f"{shown} contains '/', ':', NUL or whitespace"
    elif name.startswith("-"):
        # Tools that take link names as arguments (dhclient, ip) read it as an option.
        problem = f"{shown} starts with '-'"
    else:
        return
    raise _refuse(name, "bad_name", problem, what=what)


def _check_ports(host: _Host, cfg: NetworkConfig) -> None:
    name = cfg.name
    if len(cfg.ports) > 1:
        raise _refuse(name, "too_many_ports", f"{len(cfg.ports)} ports; a network has one "
                      "uplink NIC (VMs' taps join its bridge)", "ports")
    if not cfg.ports and not cfg.bridge:
        raise _refuse(name, "no_port", "a bridgeless network needs exactly one port", "ports")
    if not cfg.ports and cfg.vlan is not None:
        raise _refuse(name, "no_port", "a VLAN network needs a port to tag", "ports")
    def refuse(reason: str, message: str) -> InvalidArgument:
        return _refuse(name, reason, message, "ports")

    for nic in cfg.ports:
        if nic not in host.bonds:
            _check_nic(host, name, nic, PORT_KINDS, refuse)
        elif (network := host.network_of(nic, other_than=name)) is not None:
            # A bond is checked as one (it may not exist yet), but only one network has it.
            raise refuse("nic_in_use", f"{nic!r} is the port of network {network!r}")


def _check_vlan(host: _Host, cfg: NetworkConfig) -> None:
    name, vid, features = cfg.name, cfg.vlan, host.features
    if cfg.bridge and not features.bridge:
        raise _refuse(name, "unsupported", "the kernel has no bridge support", "bridge")
    if vid is None:
        return
    if not 1 <= vid <= 4094:
        raise _refuse(name, "bad_vlan", f"VLAN id {vid} is outside 1..4094", "vlan")
    if not cfg.bridge and not features.vlan_8021q:
        raise _refuse(name, "unsupported", "a bridgeless VLAN network needs 802.1q VLAN "
                      "devices, which the kernel lacks", "vlan")
    if cfg.bridge and not (features.vlan_filtering or features.vlan_8021q):
        raise _refuse(name, "unsupported", "the kernel has neither bridge VLAN filtering "
                      "nor 802.1q VLAN devices", "vlan")
    dev = host.layouts[name].vlan_dev
    if dev is not None:
        if len(dev.encode()) > MAX_NAME_BYTES:
            raise _refuse(name, "bad_name", f"VLAN device name {dev!r} is longer than "
                          f"{MAX_NAME_BYTES} bytes", "vlan")
        if not host.may_use(name, dev):
            raise _refuse(name, "name_in_use", f"a link {dev!r} exists and is not managed "
                          "by this agent", "vlan")


def _check_mtu(host: _Host, cfg: NetworkConfig) -> None:
    mtu = network_mtu(cfg)
    shown = f"MTU {mtu}" if cfg.mtu is not None else f"MTU {mtu} (the default)"
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise _refuse(cfg.name, "bad_mtu", f"{shown} is outside {MIN_MTU}..{MAX_MTU}", "mtu")
    if mtu < MIN_IPV6_MTU and cfg.ipv6.method != "none":
        raise _refuse(cfg.name, "bad_mtu", f"{shown} is under IPv6's minimum of "
                      f"{MIN_IPV6_MTU}", "mtu")
    for port in cfg.ports:
        # A bond takes the MTU its slaves take: it sets theirs.
        bond = host.bonds.get(port)
        for nic in bond.slaves if bond else (port,):
            link = host.state.links.get(nic)
            if link is None:
                continue  # a slave that went away takes no MTU (a requested bond has all)
            low = link.min_mtu if link.min_mtu is not None else MIN_MTU
            high = link.max_mtu if link.max_mtu is not None else MAX_MTU
            if not low <= mtu <= high:
                raise _refuse(cfg.name, "bad_mtu", f"{shown} is outside {low}..{high}, what "
                              f"{nic!r} takes", "mtu")


def _check_ip(name: str, family: Family, ip: IpConfig) -> None:
    key = f"ipv{family}"
    if ip.method == "static" and not ip.address:
        raise _refuse(name, "bad_address", f"{key} method static needs an address",
                      f"{key}.address")
    if ip.method != "static" and ip.address:
        raise _refuse(name, "bad_address", f"{key} method {ip.method} takes no address",
                      f"{key}.address")
    if ip.method != "static" and ip.gateway:
        raise _refuse(name, "bad_address", f"{key} method {ip.method} takes no gateway",
                      f"{key}.gateway")
    if ip.address:
        iface = _host_interface(name, key, family, ip.address)
        if ip.gateway:
            _check_gateway(name, key, family, iface, ip.gateway)


def _host_interface(name: str, key: str, family: Family, text: str) -> IpInterface:
    def bad(problem: str) -> InvalidArgument:
        return _refuse(name, "bad_address", f"{key}.address {text[:60]!r} {problem}",
                       f"{key}.address")

    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise bad("is not an address with a prefix length") from None
    if "/" not in text:
        raise bad("has no prefix length")
    if iface.version != family:
        raise bad(f"is not an IPv{family} address")
    ip, net = iface.ip, iface.network
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback:
        raise bad("is not a host address")
    if ip == net.network_address and net.num_addresses > 2:
        raise bad("is the network's own address")
    if family == 4 and ip == net.broadcast_address and net.num_addresses > 2:
        raise bad("is the network's broadcast address")
    return iface


def _check_gateway(name: str, key: str, family: Family, iface: IpInterface, text: str) -> None:
    def bad(problem: str) -> InvalidArgument:
        return _refuse(name, "bad_address", f"{key}.gateway {text[:60]!r} {problem}",
                       f"{key}.gateway")

    try:
        gateway = ipaddress.ip_address(text)
    except ValueError:
        raise bad("is not an address") from None
    if gateway.version != family:
        raise bad(f"is not an IPv{family} address")
    if gateway == iface.ip:
        raise bad("is the network's own address")
    if family == 6 and gateway.is_link_local:
        return  # IPv6 routers are commonly reached by their link-local address
    net = iface.network
    if gateway not in net:
        raise bad(f"is outside {net}")
    if net.num_addresses > 2 and gateway in (net.network_address, net.broadcast_address):
        raise bad(f"is not a host address of {net}")


def _check_link_names(host: _Host) -> None:
    changed = sorted(n for n, c in host.requested.items() if c is not None)
    claimed: dict[str, str] = {}
    for name in [*sorted(set(host.final) - set(changed)), *changed]:
        for link in (name, *host.layouts[name].made):
            claimed.setdefault(link, name)
    for name in changed:
        for link in (name, *host.layouts[name].made):
            if claimed[link] != name:
                raise _refuse(name, "name_in_use", f"{link!r} is a link of network "
                              f"{claimed[link]!r}")


def _addresses(host: _Host) -> Iterator[tuple[str, IpInterface]]:
    """Every global address the host will carry once the request applies, with who
    holds it: ``network <name>`` or ``link <name>`` for addresses the agent does not
    manage."""
    for name in sorted(host.final):
        cfg = host.final[name]
        for family in families():
            address = ip_config(cfg, family).address
            if address:
                yield f"network {name!r}", ipaddress.ip_interface(address)
    for held in host.state.addresses:
        link = host.state.links.get(held.link)
        if (held.scope == "global" and held.link not in host.address_devices
                and (link is None or link.kind != "loopback")):
            try:
                yield f"link {held.link!r}", ipaddress.ip_interface(held.address)
            except ValueError:
                continue


def _check_overlaps(host: _Host) -> None:
    everything = list(_addresses(host))
    for name in sorted(n for n, c in host.requested.items() if c is not None):
        holder = f"network {name!r}"
        for family in families():
            address = ip_config(host.final[name], family).address
            if not address:
                continue
            mine = ipaddress.ip_interface(address)
            for other, theirs in everything:
                if (other != holder and theirs.version == mine.version
                        and theirs.network.overlaps(mine.network)):
                    raise _refuse(name, "address_overlap", f"{mine} overlaps {theirs} of "
                                  f"{other}", f"ipv{family}.address")


def _check_default_routes(host: _Host) -> None:
    for name in sorted(n for n, c in host.requested.items() if c is not None):
        for family in default_route_families(host.final[name]):
            others = sorted(n for n, c in host.final.items()
                            if n != name and family in default_route_families(c))
            if others:
                raise _refuse(name, "bad_route", f"network {others[0]!r} already has the "
                              f"IPv{family} default route", "default_route")
            for route in host.state.routes:
                if (route.dst == "default" and route.family == family
                        and route.proto != "kernel"
                        and route.link not in host.address_devices):
                    raise _refuse(name, "bad_route", f"an IPv{family} default route via "
                                  f"{route.gateway or route.link} exists that this agent "
                                  "does not manage", "default_route")
