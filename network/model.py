"""The shapes host networking is described in: the kernel's state as read over netlink,
what a client wants a network to be, and the primitive steps that take one to the other.

Everything here is plain data. Reading the kernel and applying steps is
:mod:`virtnode.network.kernel.netlink`; deciding which steps to take is
:mod:`virtnode.network.plan`.

Names follow the kernel: a *link* is a network device (``eth0``, a bridge, a veth end, a
VLAN device); an *address* is written in interface form, ``192.0.2.10/24`` or
``2001:db8::10/64``; a route's ``dst`` is ``default`` or a network such as ``192.0.2.0/24``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

#: Longest link name the kernel takes (IFNAMSIZ - 1), in bytes.
MAX_NAME_BYTES = 15

Family = Literal[4, 6]
IpMethod = Literal["static", "dhcp", "none"]
C = TypeVar("C")


# --- the kernel's state ---------------------------------------------------------------------


@dataclass(frozen=True)
class BridgeVlan:
    """One VLAN on a bridge port, or on the bridge itself (``self``), with filtering on."""

    vid: int
    pvid: bool = False
    untagged: bool = False


@dataclass(frozen=True)
class Link:
    """A network device as the kernel reports it.

    ``kind`` is the rtnetlink kind (``bridge``, ``veth``, ``vlan``, ``bond``, ``tun``,
    ``vxlan``...), ``loopback`` for ``lo`` and ``device`` for a device with no kind (a
    physical NIC). ``up`` is the administrative state (IFF_UP); ``carrier`` whether the
    device has a link; ``operstate`` the kernel's word (``up``, ``down``, ``unknown``...).
    ``speed`` is in Mb/s where the driver reports one. ``min_mtu``/``max_mtu`` are what the
    device accepts, where the kernel says.
    """

    name: str
    kind: str
    mac: str | None
    mtu: int
    up: bool
    carrier: bool
    operstate: str
    speed: int | None = None
    min_mtu: int | None = None
    max_mtu: int | None = None
    master: str | None = None
    #: ``vlan`` (802.1q) devices: the tag and the device it sits on.
    vlan_id: int | None = None
    vlan_parent: str | None = None
    #: Bridges only.
    stp: bool | None = None
    vlan_filtering: bool | None = None
    default_pvid: int | None = None
    #: Bridge ports, and a bridge itself, when its bridge filters VLANs; sorted by vid.
    vlans: tuple[BridgeVlan, ...] = ()
    #: Bonds only: the mode's name (:data:`BOND_MODES`) and the MII link check interval
    #: in milliseconds (0: off).
    bond_mode: str | None = None
    miimon: int | None = None


@dataclass(frozen=True)
class Address:
    """An address on a link. ``dynamic`` is an address the kernel or a DHCP client will
    expire (not IFA_F_PERMANENT): SLAAC, DHCP."""

    link: str
    address: str
    family: Family
    scope: str = "global"
    dynamic: bool = False


@dataclass(frozen=True)
class Route:
    """A route of the main table. ``proto`` is the kernel's word (``kernel``, ``boot``,
    ``static``, ``dhcp``, ``ra``...); ``kernel`` routes come and go with addresses and are
    never added or removed by steps."""

    dst: str
    family: Family
    gateway: str | None = None
    link: str | None = None
    metric: int = 0
    proto: str = "boot"
    scope: str = "universe"


@dataclass(frozen=True)
class Dns:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()


@dataclass(frozen=True)
class Features:
    """What the running kernel can do, found by trying, not assumed."""

    bridge: bool
    vlan_filtering: bool
    vlan_8021q: bool
    bond: bool
    #: A DHCP client (dhclient) is installed: ``method: dhcp`` can be run.
    dhcp_client: bool = False


@dataclass(frozen=True)
class HostState:
    """Everything :func:`netlink.read_state` reads: links by name, addresses, main-table
    routes (sorted, so two reads of an unchanged host compare equal), and DNS."""

    links: Mapping[str, Link]
    addresses: tuple[Address, ...]
    routes: tuple[Route, ...]
    dns: Dns = field(default_factory=Dns)

    def addresses_of(self, link: str) -> tuple[Address, ...]:
        return tuple(a for a in self.addresses if a.link == link)

    def ports_of(self, bridge: str) -> tuple[str, ...]:
        return tuple(sorted(name for name, link in self.links.items() if link.master == bridge))


#: The kernel's bonding modes (IFLA_BOND_MODE values), by the names ``ip`` and
#: ``/proc/net/bonding`` use.
BOND_MODES = ("balance-rr", "active-backup", "balance-xor", "broadcast", "802.3ad",
              "balance-tlb", "balance-alb")


# --- what a client wants --------------------------------------------------------------------


@dataclass(frozen=True)
class IpConfig:
    """One family's configuration of a network. ``address`` in interface form."""

    method: IpMethod = "none"
    address: str | None = None
    gateway: str | None = None


@dataclass(frozen=True)
class NetworkConfig:
    """A managed network, as ``Network.setup`` takes it and ``Network.list`` gives it.

    A bridged network is a bridge named ``name`` with ``ports`` (at most one NIC, the
    uplink; VMs' taps join it too). A VLAN network tags its uplink: through bridge VLAN
    filtering on a bridged network, through an 802.1q device ``<nic>.<vlan>`` on a
    bridgeless one (which needs the kernel's 8021q). A bridgeless network without a VLAN
    puts its addresses on its one port.
    """

    name: str
    bridge: bool = True
    ports: tuple[str, ...] = ()
    vlan: int | None = None
    mtu: int | None = None
    stp: bool = False
    ipv4: IpConfig = IpConfig()
    ipv6: IpConfig = IpConfig()
    default_route: bool = False


@dataclass(frozen=True)
class BondConfig:
    """A managed bond, as ``Network.setup`` takes it in ``bonds`` and ``Network.list``
    gives it. A network uses it by naming it as its port.

    ``mode`` defaults to active-backup, the one mode that needs nothing of the switch;
    ``miimon`` (ms) to 100, so that a slave losing its carrier is noticed.
    """

    name: str
    slaves: tuple[str, ...] = ()
    mode: str = "active-backup"
    miimon: int = 100


def after_request(running: Mapping[str, C], requested: Mapping[str, C | None]) -> dict[str, C]:
    """The configs (networks or bonds) that run once ``requested`` applies to ``running``:
    ``None`` removes one, a config adds or replaces it, the rest stay."""
    result = {name: cfg for name, cfg in running.items() if name not in requested}
    result.update({name: cfg for name, cfg in requested.items() if cfg is not None})
    return result


@dataclass(frozen=True)
class SetupOptions:
    connectivity_check: bool = True
    connectivity_timeout: float = 10.0
    persist: bool = False


# --- steps ----------------------------------------------------------------------------------

#: Every step's ``action`` and the ``args`` it takes:
#:
#: - ``add_bridge`` {mtu?, stp, vlan_filtering, default_pvid?, mac?}: a new bridge, down.
#: - ``add_vlan`` {parent, vid, mtu?, mac?}: a new 802.1q device, down.
#: - ``add_bond`` {mode, miimon, mtu?, mac?}: a new bond, down, with no slaves.
#: - ``del_link`` {}: delete a bridge, VLAN device or bond the agent made.
#: - ``set_master`` {master: str | None}: join a bridge or bond, or leave it. A link
#:   joins a bond only while down; the bond brings it up, and takes it down again when
#:   it leaves.
#: - ``set_mtu`` {mtu}
#: - ``set_up`` {up: bool}
#: - ``set_bridge`` {stp?, vlan_filtering?, default_pvid?}
#: - ``set_bond`` {mode?, miimon?}: a bond's mode changes only while it is down and has
#:   no slaves.
#: - ``add_vlan_entry`` / ``del_vlan_entry`` {vid, pvid, untagged, self: bool}: bridge VLAN
#:   filtering entries of a port (``self`` false) or of the bridge itself (``self`` true).
#:   Adding an entry that exists replaces its flags.
#: - ``add_address`` / ``del_address`` {address}
#: - ``add_route`` / ``del_route`` {dst, family, gateway?, metric}: in the main table, on
#:   ``link``.
#: - ``start_dhcp`` / ``stop_dhcp`` {family}; ``start_dhcp`` also {default_route: bool}:
#:   whether the client may install the default route it is offered.
StepAction = Literal[
    "add_bridge", "add_vlan", "add_bond", "del_link", "set_master", "set_mtu", "set_up",
    "set_bridge", "set_bond",
    "add_vlan_entry", "del_vlan_entry", "add_address", "del_address", "add_route",
    "del_route", "start_dhcp", "stop_dhcp",
]


@dataclass(frozen=True)
class Step:
    """One primitive change to one link. ``describe()`` is how logs and errors name it."""

    action: StepAction
    link: str
    args: Mapping[str, object] = field(default_factory=dict)

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in sorted(self.args.items()))
        return f"{self.action} {self.link}" + (f" {extra}" if extra else "")
