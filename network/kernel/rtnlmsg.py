"""Rtnetlink messages turned into the shapes of :mod:`virtnode.network.model`: links
and addresses as :mod:`virtnode.network.kernel.rtnlwire` decodes them (:class:`LinkInfo`,
:class:`AddrInfo`), routes and bridge VLAN entries as pyroute2 decodes them. No I/O:
:mod:`virtnode.network.kernel.netlink` does the talking and hands the decoded messages here.

Numbers are the kernel's (``include/uapi/linux/rtnetlink.h``, ``if_bridge.h``...); words
are the ones ``ip`` prints, so what the agent reports reads like ``ip -d addr``.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from socket import AF_INET, AF_INET6
from typing import Any, Protocol

from virtnode.network.model import Address, BridgeVlan, Dns, Family, Link, Route

IFA_F_PERMANENT = 0x80
RTN_UNICAST = 1
RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
RTPROT_BOOT = 3
BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4
BRIDGE_FLAGS_SELF = 0x2
#: IFLA_EXT_MASK bits.
RTEXT_FILTER_BRVLAN = 0x2
RTEXT_FILTER_SKIP_STATS = 0x8

_SCOPES = {0: "universe", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
_PROTOS = {
    0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 8: "gated", 9: "ra",
    10: "mrt", 11: "zebra", 12: "bird", 13: "dnrouted", 14: "xorp", 15: "ntk", 16: "dhcp",
    17: "mrouted", 18: "keepalived", 42: "babel", 99: "openr", 186: "bgp", 187: "isis",
    188: "ospf", 189: "rip", 192: "eigrp",
}
#: Socket families of IP, as the model's families.
FAMILIES: dict[int, Family] = {AF_INET: 4, AF_INET6: 6}
#: IPv6 routes every link with IPv6 gets by itself; reporting them is noise.
_IMPLICIT_V6 = frozenset({"fe80::/64", "ff00::/8"})


class Message(Protocol):
    """What is used of a pyroute2 message: fields by name, NLAs by name."""

    def __getitem__(self, key: str) -> Any: ...

    def get_attr(self, name: str, default: Any = None) -> Any: ...


def family_number(family: int) -> int:
    """The socket family of a model family (4 or 6)."""
    return AF_INET if family == 4 else AF_INET6


def scope_word(scope: int, zero: str = "universe") -> str:
    """The name of a scope; addresses call scope 0 ``global``, routes ``universe``."""
    if scope == 0:
        return zero
    return _SCOPES.get(scope, str(scope))


def proto_word(proto: int) -> str:
    return _PROTOS.get(proto, str(proto))


# --- links ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkInfo:
    """One RTM_NEWLINK message with the indexes it refers to still unresolved."""

    index: int
    name: str
    kind: str
    mac: str | None
    mtu: int
    min_mtu: int | None
    max_mtu: int | None
    up: bool
    carrier: bool
    operstate: str
    master_index: int | None
    vlan_id: int | None = None
    parent_index: int | None = None
    stp: bool | None = None
    vlan_filtering: bool | None = None
    default_pvid: int | None = None
    bond_mode: str | None = None
    miimon: int | None = None


def to_link(info: LinkInfo, names: Mapping[int, str], speed: int | None = None,
            vlans: tuple[BridgeVlan, ...] = ()) -> Link:
    """The model's :class:`Link` of ``info``, indexes resolved through ``names``."""
    return Link(
        name=info.name,
        kind=info.kind,
        mac=info.mac,
        mtu=info.mtu,
        up=info.up,
        carrier=info.carrier,
        operstate=info.operstate,
        speed=speed,
        min_mtu=info.min_mtu,
        max_mtu=info.max_mtu,
        master=names.get(info.master_index) if info.master_index is not None else None,
        vlan_id=info.vlan_id,
        vlan_parent=names.get(info.parent_index) if info.parent_index is not None else None,
        stp=info.stp,
        vlan_filtering=info.vlan_filtering,
        default_pvid=info.default_pvid,
        vlans=vlans,
        bond_mode=info.bond_mode,
        miimon=info.miimon,
    )


def bridge_vlans(msg: Message) -> tuple[BridgeVlan, ...]:
    """The VLAN entries of an AF_BRIDGE RTM_NEWLINK (dumped with RTEXT_FILTER_BRVLAN)."""
    spec = msg.get_attr("IFLA_AF_SPEC")
    if spec is None:
        return ()
    found = []
    for name, value in spec["attrs"]:
        if name != "IFLA_BRIDGE_VLAN_INFO":
            continue
        flags = int(value["flags"])
        found.append(BridgeVlan(vid=int(value["vid"]),
                                pvid=bool(flags & BRIDGE_VLAN_INFO_PVID),
                                untagged=bool(flags & BRIDGE_VLAN_INFO_UNTAGGED)))
    return tuple(sorted(found, key=lambda v: v.vid))


def vlan_flags(pvid: bool, untagged: bool) -> int:
    return (BRIDGE_VLAN_INFO_PVID if pvid else 0) | (BRIDGE_VLAN_INFO_UNTAGGED if untagged else 0)


# --- addresses ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddrInfo:
    """One RTM_NEWADDR (or RTM_DELADDR) message of an IP family, the link unresolved."""

    index: int
    family: Family
    #: Interface form (``192.0.2.1/24``): IFA_LOCAL, else IFA_ADDRESS, with the prefix.
    address: str
    scope: int
    #: IFA_FLAGS when present (it supersedes the 8-bit field), else the 8-bit field.
    flags: int


def to_address(info: AddrInfo, names: Mapping[int, str]) -> Address | None:
    """The model's :class:`Address`; None for links not in ``names``."""
    link = names.get(info.index)
    if link is None:
        return None
    return Address(link=link, address=info.address, family=info.family,
                   scope=scope_word(info.scope, zero="global"),
                   dynamic=not info.flags & IFA_F_PERMANENT)


def address_key(address: Address) -> tuple[str, int, int, int]:
    iface = ipaddress.ip_interface(address.address)
    return (address.link, address.family, int(iface.ip), iface.network.prefixlen)


# --- routes ---------------------------------------------------------------------------------


def to_routes(msg: Message, names: Mapping[int, str]) -> Iterator[Route]:
    """The main-table unicast routes of an RTM_NEWROUTE: one per next hop.

    Local, broadcast, multicast, blackhole and other non-unicast routes, other tables,
    and the IPv6 link-local and multicast routes every link has are left out.
    """
    family = FAMILIES.get(msg["family"])
    table = msg.get_attr("RTA_TABLE")
    table = int(msg["table"] if table is None else table)
    if family is None or table != RT_TABLE_MAIN or msg["type"] != RTN_UNICAST:
        return
    dst_len = int(msg["dst_len"])
    if dst_len == 0:
        dst = "default"
    else:
        dst = str(ipaddress.ip_network(f"{msg.get_attr('RTA_DST')}/{dst_len}", strict=False))
        if family == 6 and dst in _IMPLICIT_V6:
            return
    common = {
        "dst": dst,
        "family": family,
        "metric": int(msg.get_attr("RTA_PRIORITY", 0)),
        "proto": proto_word(int(msg["proto"])),
        "scope": scope_word(int(msg["scope"])),
    }
    hops = msg.get_attr("RTA_MULTIPATH")
    if not hops:
        yield _route(common, msg.get_attr("RTA_GATEWAY"), msg.get_attr("RTA_OIF"), names)
        return
    for hop in hops:
        yield _route(common, hop.get_attr("RTA_GATEWAY"), hop["oif"], names)


def _route(common: Mapping[str, Any], gateway: Any, oif: Any,
           names: Mapping[int, str]) -> Route:
    return Route(gateway=str(gateway) if gateway else None,
                 link=names.get(int(oif)) if oif else None, **common)


def route_key(route: Route) -> tuple[int, int, int, int, int, str, str]:
    if route.dst == "default":
        address, length = 0, 0
    else:
        network = ipaddress.ip_network(route.dst)
        address, length = int(network.network_address), network.prefixlen
    return (route.family, length, address, route.metric, 0 if route.gateway is None else 1,
            route.gateway or "", route.link or "")


# --- DNS ------------------------------------------------------------------------------------


def parse_resolv_conf(lines: Iterable[str]) -> Dns:
    """Nameservers and the search list of resolv.conf text. As the resolver does, the
    last ``search`` line wins."""
    nameservers: list[str] = []
    search: tuple[str, ...] = ()
    for line in lines:
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            nameservers.append(words[1])
        elif words and words[0] == "search":
            search = tuple(words[1:])
    return Dns(nameservers=tuple(nameservers), search=search)


# --- errors ---------------------------------------------------------------------------------


def kernel_message(exc: BaseException) -> str:
    """The kernel's words in a pyroute2 NetlinkError (``args`` = code, message): its
    extended-ack message when it sent one, else the errno's text."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
    message = exc.args[1] if len(exc.args) > 1 and exc.args[1] else None
    return str(message) if message else os.strerror(code)


def kernel_error(exc: BaseException) -> OSError:
    """A pyroute2 NetlinkError as the OSError it stands for."""
    if isinstance(exc, OSError):
        return exc
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else errno.EIO
    return OSError(code, kernel_message(exc))
