"""Which links a managed network is made of.

A bridged network is a bridge named as the network. Its uplink NIC (which may be a
managed bond, see :class:`~virtnode.network.model.BondConfig`) joins the bridge, or,
for a VLAN without bridge VLAN filtering, an 802.1q device ``<nic>.<vid>`` on the NIC
joins it instead. A bridgeless network has no bridge: its addresses sit on the 802.1q
device when it has a VLAN, on the NIC otherwise.

Validation and planning both ask this module, so they agree on names.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from virtnode.network.model import (
    Family,
    Features,
    HostState,
    IpConfig,
    NetworkConfig,
)

#: The MTU of a network that does not name one (what VDSM and most distributions use).
DEFAULT_MTU = 1500

#: The metric of the default routes the agent adds. The kernel stores an IPv6 route
#: added with metric 0 as 1024, so asking for 1024 keeps a re-read state equal.
ROUTE_METRIC: Mapping[Family, int] = {4: 0, 6: 1024}

#: Kinds of links the agent creates (and so may delete).
MADE_KINDS = frozenset({"bridge", "vlan", "bond"})


@dataclass(frozen=True)
class Layout:
    """The links of one network. ``filtering``: its VLAN is done by bridge VLAN
    filtering on ``bridge`` (no 802.1q device)."""

    name: str
    bridge: str | None
    nic: str | None
    vid: int | None
    vlan_dev: str | None
    filtering: bool

    @property
    def device(self) -> str | None:
        """The link that carries the network's addresses, routes and DHCP client."""
        return self.bridge or self.vlan_dev or self.nic

    @property
    def bridge_port(self) -> str | None:
        """The link the uplink traffic enters the bridge through."""
        return (self.vlan_dev or self.nic) if self.bridge else None

    @property
    def made(self) -> tuple[str, ...]:
        """The links the agent creates for this network, upper first."""
        return tuple(n for n in (self.bridge, self.vlan_dev) if n)

    @property
    def links(self) -> tuple[str, ...]:
        """Every link of the network, lower first."""
        return tuple(n for n in (self.nic, self.vlan_dev, self.bridge) if n)


def vlan_device_name(nic: str, vid: int) -> str:
    return f"{nic}.{vid}"


def layout_of(cfg: NetworkConfig, features: Features, state: HostState | None = None,
              previous: Layout | None = None) -> Layout:
    """The links ``cfg`` is made of.

    A bridged VLAN network uses bridge VLAN filtering where the kernel has it, an 802.1q
    device otherwise. A network that already exists keeps the way it was made: pass the
    running network's layout as ``previous``, or, for the running network itself, the
    ``state`` it can be recognised in.
    """
    nic = cfg.ports[0] if cfg.ports else None
    vid = cfg.vlan
    if not cfg.bridge:
        vlan_dev = vlan_device_name(nic, vid) if nic and vid is not None else None
        return Layout(cfg.name, None, nic, vid, vlan_dev, False)
    if vid is None:
        return Layout(cfg.name, cfg.name, nic, None, None, False)
    if nic is None:
        return Layout(cfg.name, cfg.name, None, vid, None, True)
    if _uses_filtering(cfg, nic, vid, features, state=state, previous=previous):
        return Layout(cfg.name, cfg.name, nic, vid, None, True)
    return Layout(cfg.name, cfg.name, nic, vid, vlan_device_name(nic, vid), False)


def _uses_filtering(cfg: NetworkConfig, nic: str, vid: int, features: Features, *,
                    state: HostState | None, previous: Layout | None) -> bool:
    if previous is not None and previous.bridge and previous.vid is not None:
        return previous.filtering
    if state is not None:
        bridge = state.links.get(cfg.name)
        if bridge is not None and bridge.kind == "bridge" and bridge.vlan_filtering:
            return True
        dev = state.links.get(vlan_device_name(nic, vid))
        if dev is not None and dev.kind == "vlan" and dev.master == cfg.name:
            return False
    return features.vlan_filtering


def network_mtu(cfg: NetworkConfig) -> int:
    return cfg.mtu if cfg.mtu is not None else DEFAULT_MTU


def ip_config(cfg: NetworkConfig, family: Family) -> IpConfig:
    return cfg.ipv4 if family == 4 else cfg.ipv6


def families() -> Iterator[Family]:
    yield 4
    yield 6


def norm_interface(text: str) -> str:
    """``text`` in the form the kernel reports it (``2001:DB8::1/64`` becomes
    ``2001:db8::1/64``); unchanged if it does not parse or has no prefix length."""
    if "/" not in text:
        return text
    try:
        return str(ipaddress.ip_interface(text))
    except ValueError:
        return text


def norm_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def static_addresses(cfg: NetworkConfig) -> Iterator[tuple[Family, str]]:
    """The addresses a network puts on its device, normalised."""
    for family in families():
        ip = ip_config(cfg, family)
        if ip.method == "static" and ip.address:
            yield family, norm_interface(ip.address)


def default_gateways(cfg: NetworkConfig) -> Iterator[tuple[Family, str]]:
    """The gateways of the default routes the agent adds for a network (DHCP networks
    get theirs from the DHCP client)."""
    if not cfg.default_route:
        return
    for family in families():
        ip = ip_config(cfg, family)
        if ip.method == "static" and ip.gateway:
            yield family, norm_address(ip.gateway)


def default_route_families(cfg: NetworkConfig) -> Iterator[Family]:
    """The families a network with ``default_route`` routes by default: those with a
    static gateway or DHCP."""
    if not cfg.default_route:
        return
    for family in families():
        ip = ip_config(cfg, family)
        if ip.method == "dhcp" or (ip.method == "static" and ip.gateway):
            yield family


def managed_links(running: Mapping[str, NetworkConfig], features: Features,
                  state: HostState) -> dict[str, str]:
    """The links the agent made for the running networks, each with its network."""
    return {link: name for name, cfg in running.items()
            for link in layout_of(cfg, features, state).made}
