"""Rtnetlink messages into the model's shapes, without a kernel.

Messages are built with pyroute2's own classes and encoded to bytes; routes and VLAN
entries are decoded again by pyroute2, links and addresses by the agent's own decoder
(``rtnlwire``), so the code under test sees what it would see from a socket and the two
encoders check each other.
"""

from __future__ import annotations

import errno
from socket import AF_INET, AF_INET6
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from virtnode.network.kernel.rtnlmsg import (
    AddrInfo,
    LinkInfo,
    bridge_vlans,
    parse_resolv_conf,
    to_address,
    to_link,
    to_routes,
)
from virtnode.network.kernel.rtnlwire import decode_address, decode_link, split
from virtnode.network.model import Address, BridgeVlan, Dns, Route

NAMES = {1: "lo", 2: "eth0", 3: "br0"}


def encoded(cls: Any, fields: dict[str, Any], attrs: list[tuple[str, Any]]) -> bytes:
    msg = cls()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def decoded(cls: Any, fields: dict[str, Any], attrs: list[tuple[str, Any]]) -> Any:
    wire = cls(encoded(cls, fields, attrs))
    wire.decode()
    return wire


def body(data: bytes) -> bytes:
    ((_kind, _flags, _seq, found),) = split(data)
    return found


def route(dst: str | None, dst_len: int, *, family: int = AF_INET, table: int = 254,
          kind: int = 1, proto: int = 3, scope: int = 0, **attrs: Any) -> Any:
    nlas: list[tuple[str, Any]] = [("RTA_TABLE", table)]
    if dst is not None:
        nlas.append(("RTA_DST", dst))
    nlas += [(f"RTA_{key.upper()}", value) for key, value in attrs.items()]
    return decoded(rtmsg, {"family": family, "dst_len": dst_len, "table": table,
                           "type": kind, "proto": proto, "scope": scope}, nlas)


def test_main_table_unicast_routes() -> None:
    default = route(None, 0, gateway="192.0.2.1", oif=2, priority=100)
    onlink = route("192.0.2.0", 24, proto=2, scope=253, oif=2)
    assert list(to_routes(default, NAMES)) == [
        Route("default", 4, gateway="192.0.2.1", link="eth0", metric=100)]
    assert list(to_routes(onlink, NAMES)) == [
        Route("192.0.2.0/24", 4, link="eth0", proto="kernel", scope="link")]
    assert next(to_routes(route(None, 0, proto=77, oif=2), NAMES)).proto == "77"


def test_routes_left_out() -> None:
    left_out = [
        route("192.0.2.1", 32, table=255, kind=2, oif=2),  # local
        route("192.0.2.255", 32, table=255, kind=3, oif=2),  # broadcast
        route("198.51.100.0", 24, table=100, oif=2),  # another table
        route("203.0.113.0", 24, kind=6),  # blackhole
        route("fe80::", 64, family=AF_INET6, proto=2, oif=2),
        route("ff00::", 8, family=AF_INET6, kind=5, table=255, oif=2),
        route("ff00::", 8, family=AF_INET6, oif=2),  # in main on older kernels
    ]
    for msg in left_out:
        assert list(to_routes(msg, NAMES)) == []
    assert list(to_routes(route("fe80::", 10, family=AF_INET6, oif=2), NAMES)) == [
        Route("fe80::/10", 6, link="eth0")]


def test_multipath_routes_are_one_route_per_hop() -> None:
    hops = [{"oif": 2, "attrs": [("RTA_GATEWAY", "192.0.2.1")]},
            {"oif": 3, "attrs": [("RTA_GATEWAY", "198.51.100.1")]}]
    msg = route(None, 0, multipath=hops)
    assert list(to_routes(msg, NAMES)) == [
        Route("default", 4, gateway="192.0.2.1", link="eth0"),
        Route("default", 4, gateway="198.51.100.1", link="br0"),
    ]


def address(family: int, prefixlen: int, *, index: int = 2, flags: int = 0x80, scope: int = 0,
            wide_flags: int | None = None, **attrs: Any) -> AddrInfo | None:
    nlas = [(f"IFA_{key.upper()}", value) for key, value in attrs.items()]
    if wide_flags is not None:
        nlas.append(("IFA_FLAGS", wide_flags))
    return decode_address(body(encoded(ifaddrmsg, {
        "family": family, "prefixlen": prefixlen, "flags": flags, "scope": scope,
        "index": index}, nlas)))


def address_text(info: AddrInfo | None) -> str | None:
    return info.address if info is not None else None


def test_addresses() -> None:
    v4 = address(AF_INET, 24, local="192.0.2.10", address="192.0.2.10")
    assert v4 is not None and to_address(v4, NAMES) == Address("eth0", "192.0.2.10/24", 4)
    # On a point-to-point link IFA_ADDRESS is the peer; the link's own is IFA_LOCAL.
    ptp = address(AF_INET, 32, local="192.0.2.10", address="192.0.2.99")
    assert address_text(ptp) == "192.0.2.10/32"
    slaac = address(AF_INET6, 64, flags=0, address="2001:db8::5054:ff:fe00:1")
    assert slaac is not None
    assert to_address(slaac, NAMES) == Address("eth0", "2001:db8::5054:ff:fe00:1/64", 6,
                                               dynamic=True)
    assert address_text(address(AF_INET6, 64, address="2001:DB8:0::1")) == "2001:db8::1/64"
    gone = address(AF_INET, 24, index=9, local="192.0.2.1")
    assert gone is not None and to_address(gone, NAMES) is None
    # Not IP, or no address at all: nothing to report.
    assert address(17, 0, index=2) is None
    assert address(AF_INET, 24) is None


def test_address_flags_attribute_wins() -> None:
    # IFA_FLAGS (32 bits) supersedes the 8-bit flags field.
    msg = address(AF_INET6, 64, flags=0, scope=253, address="fe80::1", wide_flags=0x80)
    assert msg is not None
    assert to_address(msg, NAMES) == Address("eth0", "fe80::1/64", 6, scope="link")


def link_info(index: int, name: str, ifi_type: int = 1, flags: int = 0,
              **attrs: Any) -> LinkInfo:
    nlas: list[tuple[str, Any]] = [("IFLA_IFNAME", name), ("IFLA_MTU", 1500)]
    nlas += [(key, value) for key, value in attrs.items()]
    return decode_link(body(encoded(ifinfmsg, {"index": index, "ifi_type": ifi_type,
                                               "flags": flags}, nlas)))


def test_links() -> None:
    lo = link_info(1, "lo", ifi_type=772, IFLA_MAX_MTU=0, IFLA_MIN_MTU=0)
    assert (lo.kind, lo.max_mtu, lo.min_mtu, lo.mtu, lo.mac) == ("loopback", None, 0, 1500,
                                                                 None)
    nic = link_info(2, "eth0", flags=1, IFLA_MASTER=3, IFLA_CARRIER=1,
                    IFLA_OPERSTATE="UP", IFLA_ADDRESS="52:54:00:00:00:01")
    assert (nic.kind, nic.up, nic.carrier, nic.operstate, nic.mac, nic.name) == (
        "device", True, True, "up", "52:54:00:00:00:01", "eth0")
    assert to_link(nic, NAMES).master == "br0"
    assert link_info(5, "eth1", IFLA_OPERSTATE="LOWERLAYERDOWN").operstate == "lowerlayerdown"
    assert link_info(5, "eth1").operstate == "unknown"
    bridge = link_info(3, "br0", IFLA_LINKINFO={"attrs": [
        ("IFLA_INFO_KIND", "bridge"),
        ("IFLA_INFO_DATA", {"attrs": [("IFLA_BR_STP_STATE", 1),
                                      ("IFLA_BR_VLAN_FILTERING", 1),
                                      ("IFLA_BR_VLAN_DEFAULT_PVID", 1)]})]})
    assert (bridge.kind, bridge.stp, bridge.vlan_filtering, bridge.default_pvid) == (
        "bridge", True, True, 1)
    vlan = link_info(4, "eth0.20", IFLA_LINK=2, IFLA_LINKINFO={"attrs": [
        ("IFLA_INFO_KIND", "vlan"), ("IFLA_INFO_DATA", {"attrs": [("IFLA_VLAN_ID", 20)]})]})
    assert (to_link(vlan, NAMES).vlan_parent, vlan.vlan_id) == ("eth0", 20)


def bond_info(**data: Any) -> dict[str, Any]:
    return {"attrs": [("IFLA_INFO_KIND", "bond"), ("IFLA_INFO_DATA", {"attrs": [
        (f"IFLA_BOND_{key.upper()}", value) for key, value in data.items()]})]}


def test_bonds() -> None:
    # As the kernel sends them: the mode and miimon among the bond's other options.
    lacp = link_info(6, "bond0", flags=1, IFLA_LINKINFO=bond_info(
        mode=4, active_slave=2, miimon=100, updelay=200, downdelay=0, min_links=1,
        ad_lacp_rate=1))
    assert (lacp.kind, lacp.bond_mode, lacp.miimon, lacp.up) == ("bond", "802.3ad", 100, True)
    backup = link_info(7, "bond1", IFLA_MASTER=3, IFLA_LINKINFO=bond_info(miimon=0, mode=1))
    assert (backup.bond_mode, backup.miimon) == ("active-backup", 0)
    found = to_link(backup, NAMES)
    assert (found.kind, found.bond_mode, found.miimon, found.master) == (
        "bond", "active-backup", 0, "br0")
    assert link_info(8, "bond2", IFLA_LINKINFO=bond_info(mode=0)).bond_mode == "balance-rr"
    assert link_info(8, "bond2", IFLA_LINKINFO=bond_info(mode=6)).bond_mode == "balance-alb"


def test_bond_mode_the_agent_does_not_know() -> None:
    bond = link_info(6, "bond0", IFLA_LINKINFO=bond_info(mode=7, miimon=50))
    assert (bond.kind, bond.bond_mode, bond.miimon) == ("bond", None, 50)
    bare = link_info(6, "bond0", IFLA_LINKINFO={"attrs": [("IFLA_INFO_KIND", "bond")]})
    assert (bare.kind, bare.bond_mode, bare.miimon) == ("bond", None, None)


def test_a_bond_slave_is_still_a_nic() -> None:
    # A slave's IFLA_LINKINFO carries the bond's kind as IFLA_INFO_SLAVE_KIND only.
    slave = link_info(2, "eth0", flags=1, IFLA_MASTER=6, IFLA_LINKINFO={"attrs": [
        ("IFLA_INFO_SLAVE_KIND", "bond"),
        ("IFLA_INFO_SLAVE_DATA", {"attrs": [("IFLA_BOND_SLAVE_STATE", 0),
                                            ("IFLA_BOND_SLAVE_MII_STATUS", 0)]})]})
    assert (slave.kind, slave.master_index, slave.bond_mode, slave.miimon) == (
        "device", 6, None, None)
    assert to_link(slave, {**NAMES, 6: "bond0"}).master == "bond0"


def test_bridge_vlans_sorted_with_their_flags() -> None:
    msg = decoded(ifinfmsg, {"family": 7, "index": 2}, [("IFLA_AF_SPEC", {"attrs": [
        ("IFLA_BRIDGE_VLAN_INFO", {"flags": 0, "vid": 30}),
        ("IFLA_BRIDGE_VLAN_INFO", {"flags": 6, "vid": 1}),
        ("IFLA_BRIDGE_VLAN_INFO", {"flags": 4, "vid": 20}),
    ]})])
    assert bridge_vlans(msg) == (BridgeVlan(1, pvid=True, untagged=True),
                                 BridgeVlan(20, untagged=True), BridgeVlan(30))


def test_resolv_conf() -> None:
    text = """# comment
    nameserver 192.0.2.53
    nameserver 2001:db8::53  # trailing
    domain ignored.example
    search first.example
    search example.org example.net
    options ndots:2
    nameserver
    """
    assert parse_resolv_conf(text.splitlines()) == Dns(
        nameservers=("192.0.2.53", "2001:db8::53"), search=("example.org", "example.net"))
    assert parse_resolv_conf([]) == Dns()


def test_messages_that_do_not_decode_are_os_errors() -> None:
    whole = encoded(ifinfmsg, {"index": 2}, [("IFLA_IFNAME", "eth0")])
    for broken in (whole[:-3], whole[:10], whole[:16] + b"\x00" * 3):
        with pytest.raises(OSError) as failed:
            for _kind, _flags, _seq, found in split(broken):
                decode_link(found)
        assert failed.value.errno == errno.EBADMSG
    with pytest.raises(OSError):
        decode_address(b"\x02\x18")
    # A message without any attributes still decodes.
    assert decode_link(body(encoded(ifinfmsg, {"index": 7}, []))).index == 7
