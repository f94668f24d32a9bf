"""Network.setup requests checked against a host before anything changes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from tests.fakes.netstates import ALL, bridge, link
from virtnode.errors import InvalidArgument, NotFound
from virtnode.network.model import (
    BOND_MODES,
    Address,
    BondConfig,
    Features,
    HostState,
    IpConfig,
    Link,
    NetworkConfig,
    Route,
)
from virtnode.network.validate import MAX_MIIMON, validate

#: net1 is managed: a bridge on eth5 with 10.1.0.1/24. eth0 carries the host's own
#: address and default route; br-ex, eth4 and eth0.100 belong to someone else.
STATE = HostState(
    links={
        "lo": link("lo", "loopback", mtu=65536),
        "eth0": link("eth0", "device"),
        "eth0.100": link("eth0.100", "vlan", vlan_id=100, vlan_parent="eth0"),
        "eth1": link("eth1"),
        "eth2": link("eth2"),
        "eth3": link("eth3", "device", max_mtu=9000),
        "averyverylongn": link("averyverylongn"),
        "br-ex": bridge("br-ex"),
        "eth4": link("eth4", master="br-ex"),
        "tap0": link("tap0", "tun", master="br-ex"),
        "net1": bridge("net1"),
        "eth5": link("eth5", master="net1"),
        "eth6": link("eth6"),
    },
    addresses=(
        Address("lo", "127.0.0.1/8", 4, scope="host"),
        Address("eth0", "192.0.2.10/24", 4, dynamic=True),
        Address("eth0", "fe80::1/64", 6, scope="link"),
        Address("eth1", "fe80::2/64", 6, scope="link"),
        Address("eth0.100", "198.51.100.10/24", 4),
        Address("net1", "10.1.0.1/24", 4),
    ),
    routes=(Route("default", 4, gateway="192.0.2.1", link="eth0", proto="dhcp"),),
)

NET1 = NetworkConfig(name="net1", ports=("eth5",), ipv4=IpConfig("static", "10.1.0.1/24"))
RUNNING = {"net1": NET1}


def net(name: str = "net2", **kw: Any) -> NetworkConfig:
    kw.setdefault("ports", ("eth1",))
    return NetworkConfig(name=name, **kw)


def static4(address: str, gateway: str | None = None) -> IpConfig:
    return IpConfig("static", address, gateway)


def static6(address: str, gateway: str | None = None) -> IpConfig:
    return IpConfig("static", address, gateway)


def refused(requested: dict[str, NetworkConfig | None], *, state: HostState = STATE,
            features: Features = ALL) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        validate(requested, RUNNING, state, features)
    return caught.value


@pytest.mark.parametrize("requested", [
    {"net2": net()},
    {"net2": net(ports=())},
    {"net2": net(bridge=False, ipv4=static4("10.2.0.1/24", "10.2.0.254"), default_route=False)},
    {"net2": net(vlan=10, mtu=9000, stp=True, ipv6=static6("2001:db8:2::1/64", "fe80::1"),
                 default_route=True)},
    {"net2": net(bridge=False, vlan=4094, ipv4=IpConfig("dhcp"), default_route=False)},
    {"net2": net(ipv4=static4("10.2.0.1/31", "10.2.0.0"))},
    {"net2": net(ports=("eth3",), mtu=9000)},
    {"net1": None},
    {"net1": replace(NET1, ports=("eth1",), vlan=20, mtu=1280,
                     ipv4=static4("10.1.0.2/24"), ipv6=IpConfig("dhcp"))},
    # net1 turns bridgeless on its own NIC: its address may move off the bridge.
    {"net1": replace(NET1, bridge=False)},
    # A NIC and an address move from one network to another in one request.
    {"net1": None, "net2": net(ports=("eth5",), ipv4=static4("10.1.0.1/24"))},
    {"net1": replace(NET1, ports=("eth6",)), "net2": net(ports=("eth5",))},
    # The longest names that fit.
    {"net2-456789abcd": net("net2-456789abcd")},
    {"net2": net(ports=("averyverylongn",), vlan=4)},
])
def test_acceptable(requested: dict[str, NetworkConfig | None]) -> None:
    validate(requested, RUNNING, STATE, ALL)


def test_running_networks_check_out_against_their_own_state() -> None:
    validate(RUNNING, RUNNING, STATE, ALL)


@pytest.mark.parametrize("name", [
    "", ".", "..", "net/2", "net 2", "net\t2", "net:2", "net\x002", "net2-456789abcde", "-nw",
    "r\u00e9seau-r\u00e9seau1",  # 14 characters, 16 bytes
    "\u00e9" * 8,
])
def test_bad_name(name: str) -> None:
    error = refused({name: net(name)})
    assert (error.reason, error.id, error.details) == ("bad_name", name,
                                                       {"field": f"networks.{name}"})


@pytest.mark.parametrize("name", ["eth1", "br-ex", "eth0.100", "lo"])
def test_name_of_an_unmanaged_link(name: str) -> None:
    error = refused({name: net(name, ports=("eth2",))})
    assert (error.reason, error.details) == ("name_in_use", {"field": f"networks.{name}"})


def test_name_of_another_networks_link() -> None:
    # net1 runs with VLAN 7 over 802.1q device eth5.7; "eth5.7" is taken.
    state = _with(STATE, eth5=link("eth5"), **{
        "eth5.7": link("eth5.7", "vlan", vlan_id=7, vlan_parent="eth5", master="net1")})
    running = {"net1": replace(NET1, vlan=7)}
    with pytest.raises(InvalidArgument) as caught:
        validate({"eth5.7": net("eth5.7")}, running, state, ALL)
    assert caught.value.reason == "name_in_use"
    # ...unless net1 gives it up in the same request.
    validate({"eth5.7": net("eth5.7"), "net1": None}, running, state, ALL)


def test_two_networks_want_the_same_vlan_device() -> None:
    error = refused({"eth1.5": net("eth1.5", ports=("eth2",)),
                     "net2": net(bridge=False, vlan=5)})
    assert (error.reason, error.id) == ("name_in_use", "net2")
    assert "eth1.5" in error.message


def test_removing_an_unmanaged_network() -> None:
    with pytest.raises(NotFound) as caught:
        validate({"br-ex": None}, RUNNING, STATE, ALL)
    assert (caught.value.reason, caught.value.object, caught.value.id) == (
        "no_network", "network", "br-ex")


def test_unknown_nic() -> None:
    error = refused({"net2": net(ports=("eth9",))})
    assert (error.reason, error.details) == ("unknown_nic", {"field": "networks.net2.ports"})
    assert "eth9" in error.message and "net2" in error.message


@pytest.mark.parametrize("port", ["br-ex", "lo", "eth0.100", "tap0", "net1"])
def test_bad_port(port: str) -> None:
    error = refused({"net2": net(ports=(port,))})
    assert (error.reason, error.details) == ("bad_port", {"field": "networks.net2.ports"})


@pytest.mark.parametrize("kind", ["device", "veth", "bond"])
def test_nic_kinds(kind: str) -> None:
    state = _with(STATE, eth1=link("eth1", kind))
    validate({"net2": net()}, RUNNING, state, ALL)


@pytest.mark.parametrize(("requested", "holder"), [
    ({"net2": net(ports=("eth5",))}, "'net1'"),                       # net1's port
    ({"net2": net(ports=("eth4",))}, "'br-ex'"),                      # enslaved to br-ex
    ({"net2": net(), "net3": net("net3", bridge=False)}, "'net3'"),   # both want eth1
])
def test_nic_in_use(requested: dict[str, NetworkConfig | None], holder: str) -> None:
    error = refused(requested)
    assert (error.reason, error.details) == ("nic_in_use", {"field": "networks.net2.ports"})
    assert holder in error.message


def test_nic_in_a_managed_bridge_that_is_not_its_network() -> None:
    state = _with(STATE, eth1=link("eth1", master="net1"))
    assert refused({"net2": net()}, state=state).reason == "nic_in_use"


def test_too_many_ports() -> None:
    for ports in (("eth1", "eth2"), ("eth1", "eth1")):
        error = refused({"net2": net(ports=ports)})
        assert (error.reason, error.details) == ("too_many_ports",
                                                 {"field": "networks.net2.ports"})


@pytest.mark.parametrize("cfg", [net(bridge=False, ports=()), net(ports=(), vlan=10)])
def test_no_port(cfg: NetworkConfig) -> None:
    error = refused({"net2": cfg})
    assert (error.reason, error.details) == ("no_port", {"field": "networks.net2.ports"})


@pytest.mark.parametrize("address", [
    Address("eth1", "203.0.113.5/24", 4),
    Address("eth1", "2001:db8:9::5/64", 6, dynamic=True),
])
def test_port_has_addresses(address: Address) -> None:
    state = replace(STATE, addresses=(*STATE.addresses, address))
    error = refused({"net2": net()}, state=state)
    assert (error.reason, error.details) == ("port_has_addresses",
                                             {"field": "networks.net2.ports"})
    assert address.address in error.message


@pytest.mark.parametrize("vid", [0, 4095, -1, 5000])
def test_bad_vlan(vid: int) -> None:
    error = refused({"net2": net(vlan=vid)})
    assert (error.reason, error.details) == ("bad_vlan", {"field": "networks.net2.vlan"})


@pytest.mark.parametrize(("cfg", "features", "field"), [
    (net(bridge=False, vlan=10), replace(ALL, vlan_8021q=False), "vlan"),
    (net(vlan=10), replace(ALL, vlan_8021q=False, vlan_filtering=False), "vlan"),
    (net(), replace(ALL, bridge=False), "bridge"),
])
def test_unsupported(cfg: NetworkConfig, features: Features, field: str) -> None:
    error = refused({"net2": cfg}, features=features)
    assert (error.reason, error.details) == ("unsupported", {"field": f"networks.net2.{field}"})


@pytest.mark.parametrize("features", [replace(ALL, vlan_filtering=False),
                                      replace(ALL, vlan_8021q=False)])
def test_bridged_vlan_needs_either_way(features: Features) -> None:
    validate({"net2": net(vlan=10)}, RUNNING, STATE, features)


def test_vlan_device_name_too_long() -> None:
    # averyverylongn.40 is 17 bytes; with filtering no such device is made.
    cfg = net(ports=("averyverylongn",), vlan=40)
    validate({"net2": cfg}, RUNNING, STATE, ALL)
    for c, f in ((cfg, replace(ALL, vlan_filtering=False)), (replace(cfg, bridge=False), ALL)):
        error = refused({"net2": c}, features=f)
        assert (error.reason, error.details) == ("bad_name", {"field": "networks.net2.vlan"})
        assert "averyverylongn.40" in error.message


def test_vlan_device_of_someone_else() -> None:
    state = _with(STATE, **{"eth1.7": link("eth1.7", "vlan", vlan_id=7, vlan_parent="eth1")})
    error = refused({"net2": net(bridge=False, vlan=7)}, state=state)
    assert (error.reason, error.details) == ("name_in_use", {"field": "networks.net2.vlan"})


@pytest.mark.parametrize("cfg", [
    net(mtu=67), net(mtu=65536), net(mtu=0),
    net(ports=("eth3",), mtu=9001),
    net(mtu=1279, ipv6=IpConfig("dhcp")),
    net(mtu=1000, ipv6=static6("2001:db8:2::1/64")),
])
def test_bad_mtu(cfg: NetworkConfig) -> None:
    error = refused({"net2": cfg})
    assert (error.reason, error.details) == ("bad_mtu", {"field": "networks.net2.mtu"})


def test_default_mtu_must_fit_the_port() -> None:
    state = _with(STATE, eth1=link("eth1", max_mtu=1400))
    error = refused({"net2": net()}, state=state)
    assert error.reason == "bad_mtu" and "default" in error.message
    validate({"net2": net(mtu=1400)}, RUNNING, state, ALL)


@pytest.mark.parametrize(("ipv4", "ipv6", "field"), [
    (IpConfig("static"), IpConfig(), "ipv4.address"),
    (IpConfig(), IpConfig("static"), "ipv6.address"),
    (IpConfig("dhcp", "10.2.0.1/24"), IpConfig(), "ipv4.address"),
    (IpConfig("none", "10.2.0.1/24"), IpConfig(), "ipv4.address"),
    (IpConfig("dhcp", gateway="10.2.0.1"), IpConfig(), "ipv4.gateway"),
    (IpConfig("none", gateway="10.2.0.1"), IpConfig(), "ipv4.gateway"),
    (static4("10.2.0.1"), IpConfig(), "ipv4.address"),
    (static4("10.2.0.300/24"), IpConfig(), "ipv4.address"),
    (static4("10.2.0.1/33"), IpConfig(), "ipv4.address"),
    (static4("eth1"), IpConfig(), "ipv4.address"),
    (static4("2001:db8::1/64"), IpConfig(), "ipv4.address"),
    (IpConfig(), static6("10.2.0.1/24"), "ipv6.address"),
    (static4("10.2.0.0/24"), IpConfig(), "ipv4.address"),
    (static4("10.2.0.255/24"), IpConfig(), "ipv4.address"),
    (static4("224.0.0.5/24"), IpConfig(), "ipv4.address"),
    (static4("0.0.0.0/8"), IpConfig(), "ipv4.address"),
    (static4("127.0.0.2/8"), IpConfig(), "ipv4.address"),
    (IpConfig(), static6("2001:db8:2::/64"), "ipv6.address"),
    (IpConfig(), static6("::1/128"), "ipv6.address"),
    (IpConfig(), static6("ff02::1/64"), "ipv6.address"),
    (static4("10.2.0.1/24", "10.3.0.1"), IpConfig(), "ipv4.gateway"),
    (static4("10.2.0.1/24", "10.2.0.1"), IpConfig(), "ipv4.gateway"),
    (static4("10.2.0.1/24", "10.2.0.0"), IpConfig(), "ipv4.gateway"),
    (static4("10.2.0.1/24", "10.2.0.255"), IpConfig(), "ipv4.gateway"),
    (static4("10.2.0.1/24", "2001:db8::1"), IpConfig(), "ipv4.gateway"),
    (static4("10.2.0.1/24", "10.2.0"), IpConfig(), "ipv4.gateway"),
    (static4("10.2.0.1/32", "10.2.0.2"), IpConfig(), "ipv4.gateway"),
    (IpConfig(), static6("2001:db8:2::1/64", "2001:db8:3::1"), "ipv6.gateway"),
    (IpConfig(), static6("2001:db8:2::1/64", "10.2.0.254"), "ipv6.gateway"),
])
def test_bad_address(ipv4: IpConfig, ipv6: IpConfig, field: str) -> None:
    error = refused({"net2": net(ipv4=ipv4, ipv6=ipv6)})
    assert (error.reason, error.details) == ("bad_address", {"field": f"networks.net2.{field}"})


@pytest.mark.parametrize(("requested", "other"), [
    # the same subnet as the running net1, a wider one, a narrower one
    ({"net2": net(ipv4=static4("10.1.0.2/24"))}, "net1"),
    ({"net2": net(ipv4=static4("10.0.0.1/8"))}, "net1"),
    ({"net2": net(ipv4=static4("10.1.0.130/25"))}, "net1"),
    # two requested networks
    ({"net2": net(ipv6=static6("2001:db8::1/64")),
      "net3": net("net3", ports=("eth2",), ipv6=static6("2001:db8::2/48"))}, "net3"),
    # an unmanaged link's address, dynamic or not
    ({"net2": net(ipv4=static4("192.0.2.99/24"))}, "eth0"),
    ({"net2": net(ipv4=static4("198.51.100.1/16"))}, "eth0.100"),
])
def test_address_overlap(requested: dict[str, NetworkConfig | None], other: str) -> None:
    error = refused(requested)
    assert error.reason == "address_overlap"
    assert error.details["field"].endswith(".address")
    assert repr(other) in error.message


def test_an_address_leaving_frees_its_subnet() -> None:
    validate({"net1": replace(NET1, ipv4=static4("10.9.0.1/24")),
              "net2": net(ipv4=static4("10.1.0.2/24"))}, RUNNING, STATE, ALL)


def test_overlap_ignores_other_families_loopback_and_link_scope() -> None:
    validate({"net2": net(ipv4=static4("10.1.1.1/24"), ipv6=static6("fe80::99/64"))},
             RUNNING, STATE, ALL)


@pytest.mark.parametrize(("requested", "state"), [
    ({"net2": net(default_route=True)}, STATE),
    ({"net2": net(default_route=True, ipv4=static4("10.2.0.1/24"))}, STATE),
    # eth0's unmanaged default route is in the way
    ({"net2": net(default_route=True, ipv4=IpConfig("dhcp"))}, STATE),
    # two networks with the IPv6 default route
    ({"net2": net(default_route=True, ipv6=static6("2001:db8:2::1/64", "fe80::1")),
      "net3": net("net3", ports=("eth2",), default_route=True, ipv6=IpConfig("dhcp"))},
     STATE),
])
def test_bad_route(requested: dict[str, NetworkConfig | None], state: HostState) -> None:
    error = refused(requested, state=state)
    assert (error.reason, error.details) == ("bad_route",
                                             {"field": "networks.net2.default_route"})


def test_default_route_against_a_running_network() -> None:
    running = {"net1": replace(NET1, default_route=True,
                               ipv4=static4("10.1.0.1/24", "10.1.0.254"))}
    state = replace(STATE, routes=(
        Route("default", 4, gateway="10.1.0.254", link="net1", proto="static"),))
    requested = {"net2": net(default_route=True, ipv4=IpConfig("dhcp"))}
    with pytest.raises(InvalidArgument) as caught:
        validate(requested, running, state, ALL)
    assert caught.value.reason == "bad_route" and "'net1'" in caught.value.message
    # Moving the default route from net1 to net2 in one request is fine.
    validate({**requested, "net1": NET1}, running, state, ALL)
    # So is a default route per family.
    validate({"net2": net(default_route=True, ipv6=IpConfig("dhcp"))}, running, state, ALL)


def test_bad_option() -> None:
    error = refused({"net2": net(bridge=False, stp=True)})
    assert (error.reason, error.details) == ("bad_option", {"field": "networks.net2.stp"})


def test_first_problem_wins_in_name_order() -> None:
    error = refused({"b": net("b", ports=("eth9",)), "a": net("a", vlan=0)})
    assert (error.reason, error.id) == ("bad_vlan", "a")


def test_error_data_names_the_network() -> None:
    error = refused({"net2": net(ports=("eth9",))})
    assert error.to_error()["data"] == {
        "name": "InvalidArgument", "reason": "unknown_nic", "object": "network",
        "id": "net2", "field": "networks.net2.ports"}


# --- bonds -----------------------------------------------------------------------------------

#: STATE with bond0, a managed bond of eth7 and eth8, that net3 has as its port, and bond9,
#: a bond the agent does not manage.
BONDED = replace(STATE, links={
    **STATE.links,
    "bond0": link("bond0", "bond", bond_mode="active-backup", miimon=100, master="net3"),
    "eth7": link("eth7", master="bond0"),
    "eth8": link("eth8", master="bond0"),
    "net3": bridge("net3"),
    "bond9": link("bond9", "bond", bond_mode="balance-rr", miimon=0),
})
BOND0 = BondConfig("bond0", ("eth7", "eth8"))
NET3 = NetworkConfig(name="net3", ports=("bond0",))
BONDED_RUNNING = {"net1": NET1, "net3": NET3}


def bond(name: str = "bond1", *slaves: str, **kw: Any) -> BondConfig:
    return BondConfig(name, slaves or ("eth1", "eth2"), **kw)


def check(bonds: dict[str, BondConfig | None],
          requested: dict[str, NetworkConfig | None] | None = None, *,
          features: Features = ALL) -> None:
    validate(requested or {}, BONDED_RUNNING, BONDED, features, bond_request=bonds,
             running_bonds={"bond0": BOND0})


def refused_bond(bonds: dict[str, BondConfig | None],
                 requested: dict[str, NetworkConfig | None] | None = None, *,
                 features: Features = ALL) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        check(bonds, requested, features=features)
    return caught.value


def what(error: InvalidArgument) -> tuple[Any, ...]:
    return error.reason, error.object, error.id, error.details


@pytest.mark.parametrize(("bonds", "requested"), [
    ({"bond1": bond()}, {}),
    ({"bond1": bond("bond1", "eth1")}, {}),
    ({"bond1": bond(mode="802.3ad", miimon=0)}, {}),
    ({"bond1": bond(miimon=MAX_MIIMON)}, {}),
    *[({"bond1": bond(mode=mode)}, {}) for mode in BOND_MODES],
    # A network may name as its port a bond made in the same request.
    ({"bond1": bond()}, {"net2": net(ports=("bond1",), mtu=9000, ipv4=static4("10.2.0.1/24"))}),
    ({"bond1": bond()}, {"net2": net(bridge=False, ports=("bond1",), vlan=10)}),
    # net1 gives its NIC to a bond and takes the bond as its port.
    ({"bond1": bond("bond1", "eth5", "eth6")}, {"net1": replace(NET1, ports=("bond1",))}),
    # A running bond changes its slaves and mode; one of them moves to a new bond.
    ({"bond0": replace(BOND0, slaves=("eth7", "eth1"), mode="balance-xor")}, {}),
    ({"bond0": replace(BOND0, slaves=("eth7",)), "bond1": bond("bond1", "eth8")}, {}),
    # A bond goes with the network that has it as its port, or once that network has
    # another port.
    ({"bond0": None}, {"net3": None}),
    ({"bond0": None}, {"net3": replace(NET3, ports=("eth1",))}),
    # The longest name that fits.
    ({"bond-456789abcd": bond("bond-456789abcd")}, {}),
])
def test_acceptable_bonds(bonds: dict[str, BondConfig | None],
                          requested: dict[str, NetworkConfig | None]) -> None:
    check(bonds, requested)


def test_running_bonds_check_out_against_their_own_state() -> None:
    check({"bond0": BOND0}, BONDED_RUNNING)


def test_bond_unsupported_without_bonding() -> None:
    error = refused_bond({"bond1": bond()}, features=replace(ALL, bond=False))
    assert what(error) == ("unsupported", "bond", "bond1", {"field": "bonds.bond1"})


@pytest.mark.parametrize("name", ["", "..", "bond/1", "bond 1", "-bond", "bond-456789abcde"])
def test_bond_bad_name(name: str) -> None:
    error = refused_bond({name: bond(name)})
    assert what(error) == ("bad_name", "bond", name, {"field": f"bonds.{name}"})


@pytest.mark.parametrize("name", ["eth1", "br-ex", "eth0.100", "lo", "bond9"])
def test_bond_named_as_an_unmanaged_link(name: str) -> None:
    error = refused_bond({name: bond(name, "eth2")})
    assert what(error) == ("name_in_use", "bond", name, {"field": f"bonds.{name}"})


@pytest.mark.parametrize(("name", "requested"), [
    ("net1", {}),                                     # a running network's bridge
    ("net2", {"net2": net(ports=("eth6",))}),         # a network of the same request
    ("eth6.7", {"net2": net(bridge=False, ports=("eth6",), vlan=7)}),  # its 802.1q device
])
def test_bond_named_as_a_network_or_its_link(name: str,
                                             requested: dict[str, NetworkConfig | None]) -> None:
    error = refused_bond({name: bond(name)}, requested)
    assert what(error) == ("name_in_use", "bond", name, {"field": f"bonds.{name}"})


def test_network_named_as_a_bond() -> None:
    error = refused_bond({}, {"bond0": net("bond0", ports=("eth6",))})
    assert what(error) == ("name_in_use", "network", "bond0", {"field": "networks.bond0"})
    assert "bond" in error.message


@pytest.mark.parametrize(("cfg", "field"), [
    (bond(mode="round-robin"), "mode"),
    (bond(mode=""), "mode"),
    (bond(mode="802.3AD"), "mode"),
    (bond(miimon=-1), "miimon"),
    (bond(miimon=MAX_MIIMON + 1), "miimon"),
])
def test_bond_bad_option(cfg: BondConfig, field: str) -> None:
    error = refused_bond({"bond1": cfg})
    assert what(error) == ("bad_option", "bond", "bond1", {"field": f"bonds.bond1.{field}"})


def test_bond_without_slaves() -> None:
    error = refused_bond({"bond1": BondConfig("bond1")})
    assert what(error) == ("no_port", "bond", "bond1", {"field": "bonds.bond1.slaves"})


def test_bond_slave_unknown() -> None:
    error = refused_bond({"bond1": bond("bond1", "eth1", "eth9")})
    assert what(error) == ("unknown_nic", "bond", "bond1", {"field": "bonds.bond1.slaves"})
    assert "'eth9'" in error.message


@pytest.mark.parametrize("slave", ["br-ex", "net1", "eth0.100", "tap0", "lo", "bond9", "bond0"])
def test_bond_slave_not_a_nic(slave: str) -> None:
    error = refused_bond({"bond1": bond("bond1", "eth1", slave)})
    assert what(error) == ("bad_port", "bond", "bond1", {"field": "bonds.bond1.slaves"})
    assert repr(slave) in error.message


def test_bond_slave_listed_twice() -> None:
    error = refused_bond({"bond1": bond("bond1", "eth1", "eth2", "eth1")})
    assert what(error) == ("bad_port", "bond", "bond1", {"field": "bonds.bond1.slaves"})
    assert "twice" in error.message


@pytest.mark.parametrize(("bonds", "requested", "holder"), [
    ({"bond1": bond("bond1", "eth1", "eth5")}, {}, "network 'net1'"),     # net1's port
    ({"bond1": bond("bond1", "eth1")}, {"net2": net()}, "network 'net2'"),  # net2's, new
    ({"bond1": bond("bond1", "eth7")}, {}, "bond 'bond0'"),               # bond0's slave
    ({"bond1": bond("bond1", "eth1"), "bond2": bond("bond2", "eth1")}, {}, "bond 'bond2'"),
    ({"bond1": bond("bond1", "eth4")}, {}, "'br-ex'"),                    # unmanaged master
])
def test_bond_slave_in_use(bonds: dict[str, BondConfig | None],
                           requested: dict[str, NetworkConfig | None], holder: str) -> None:
    error = refused_bond(bonds, requested)
    assert what(error) == ("nic_in_use", "bond", "bond1", {"field": "bonds.bond1.slaves"})
    assert holder in error.message


def test_bond_slave_in_a_managed_bridge_that_does_not_change() -> None:
    # eth6 sits in net1's bridge although it is not net1's port; net1 is not requested.
    state = _with(BONDED, eth6=link("eth6", master="net1"))
    with pytest.raises(InvalidArgument) as caught:
        validate({}, BONDED_RUNNING, state, ALL, bond_request={"bond1": bond("bond1", "eth6")},
                 running_bonds={"bond0": BOND0})
    assert what(caught.value) == ("nic_in_use", "bond", "bond1",
                                  {"field": "bonds.bond1.slaves"})


@pytest.mark.parametrize("address", [
    Address("eth2", "203.0.113.5/24", 4),
    Address("eth2", "2001:db8:9::5/64", 6, dynamic=True),
])
def test_bond_slave_has_addresses(address: Address) -> None:
    state = replace(BONDED, addresses=(*BONDED.addresses, address))
    with pytest.raises(InvalidArgument) as caught:
        validate({}, BONDED_RUNNING, state, ALL, bond_request={"bond1": bond()},
                 running_bonds={"bond0": BOND0})
    assert what(caught.value) == ("port_has_addresses", "bond", "bond1",
                                  {"field": "bonds.bond1.slaves"})
    assert address.address in caught.value.message


def test_a_bridgeless_networks_nic_may_become_a_slave_with_the_network_on_the_bond() -> None:
    running = {**BONDED_RUNNING, "net2": net(bridge=False, ipv4=static4("10.2.0.1/24"))}
    state = replace(BONDED, addresses=(*BONDED.addresses, Address("eth1", "10.2.0.1/24", 4)))
    validate({"net2": net(bridge=False, ports=("bond1",), ipv4=static4("10.2.0.1/24"))},
             running, state, ALL, bond_request={"bond1": bond()},
             running_bonds={"bond0": BOND0})


def test_removing_a_bond_a_network_keeps() -> None:
    error = refused_bond({"bond0": None})
    assert what(error) == ("bond_in_use", "bond", "bond0", {"field": "bonds.bond0"})
    assert "'net3'" in error.message
    # ...also when the network is requested with the bond still its port.
    error = refused_bond({"bond0": None}, {"net3": replace(NET3, mtu=9000)})
    assert error.reason == "bond_in_use"


@pytest.mark.parametrize(("requested", "bonds"), [
    ({"net2": net(ports=("eth8",))}, {"bond0": replace(BOND0, slaves=("eth7",))}),
    ({"net2": net(bridge=False, ports=("eth8",), vlan=5)},
     {"bond0": replace(BOND0, slaves=("eth7",), mode="802.3ad")}),
    # The bond is dissolved and its network stays on one of its NICs.
    ({"net3": replace(NET3, ports=("eth7",))}, {"bond0": None}),
    ({"net3": None, "net2": net(ports=("eth7",)), "net4": net("net4", ports=("eth8",))},
     {"bond0": None}),
])
def test_a_nic_a_bond_lets_go_may_be_a_network_port(requested: dict[str, NetworkConfig | None],
                                                    bonds: dict[str, BondConfig | None]) -> None:
    check(bonds, requested)


def test_a_nic_in_a_bond_the_agent_does_not_manage_is_in_use() -> None:
    state = _with(BONDED, eth6=link("eth6", master="bond9"))
    with pytest.raises(InvalidArgument) as caught:
        validate({"net2": net(ports=("eth6",))}, BONDED_RUNNING, state, ALL,
                 running_bonds={"bond0": BOND0})
    assert what(caught.value) == ("nic_in_use", "network", "net2",
                                  {"field": "networks.net2.ports"})
    assert "'bond9'" in caught.value.message


@pytest.mark.parametrize("name", ["bond9", "bond5"])
def test_removing_a_bond_the_agent_does_not_manage(name: str) -> None:
    with pytest.raises(NotFound) as caught:
        check({name: None})
    assert what(caught.value) == ("no_bond", "bond", name, {"field": f"bonds.{name}"})


@pytest.mark.parametrize(("requested", "bonds", "holder"), [
    ({"net2": net(ports=("eth7",))}, {}, "bond 'bond0'"),
    ({"net2": net(ports=("eth8",), vlan=5)}, {}, "bond 'bond0'"),
    ({"net2": net(bridge=False, ports=("eth8",), vlan=5)}, {}, "bond 'bond0'"),
])
def test_network_port_that_is_a_bond_slave(requested: dict[str, NetworkConfig | None],
                                           bonds: dict[str, BondConfig | None],
                                           holder: str) -> None:
    error = refused_bond(bonds, requested)
    assert what(error) == ("nic_in_use", "network", "net2", {"field": "networks.net2.ports"})
    assert holder in error.message


@pytest.mark.parametrize(("requested", "bonds", "holder"), [
    # net3 runs on bond0 and is not part of the request.
    ({"net2": net(ports=("bond0",))}, {}, "'net3'"),
    ({"net2": net(bridge=False, ports=("bond0",), vlan=7)}, {}, "'net3'"),
    # Two networks of one request want a new bond.
    ({"net2": net(ports=("bond1",)), "net4": net("net4", ports=("bond1",))},
     {"bond1": bond()}, "'net4'"),
])
def test_a_bond_is_the_port_of_one_network(requested: dict[str, NetworkConfig | None],
                                           bonds: dict[str, BondConfig | None],
                                           holder: str) -> None:
    error = refused_bond(bonds, requested)
    assert what(error) == ("nic_in_use", "network", "net2", {"field": "networks.net2.ports"})
    assert holder in error.message
    # Once net3 lets it go, bond0 may move.
    check({}, {"net3": None, "net2": net(ports=("bond0",))})


def test_bond_port_mtu_must_fit_every_slave() -> None:
    # eth3 takes at most 9000.
    bonds: dict[str, BondConfig | None] = {"bond1": bond("bond1", "eth1", "eth3")}
    check(bonds, {"net2": net(ports=("bond1",), mtu=9000)})
    error = refused_bond(bonds, {"net2": net(ports=("bond1",), mtu=9001)})
    assert what(error) == ("bad_mtu", "network", "net2", {"field": "networks.net2.mtu"})
    assert "'eth3'" in error.message and "9000" in error.message
    state = _with(BONDED, eth8=link("eth8", master="bond0", max_mtu=1400))
    with pytest.raises(InvalidArgument) as caught:
        validate({"net3": NET3}, BONDED_RUNNING, state, ALL, running_bonds={"bond0": BOND0})
    assert (caught.value.reason, caught.value.details) == ("bad_mtu",
                                                           {"field": "networks.net3.mtu"})
    assert "'eth8'" in caught.value.message


def test_a_network_on_a_bond_that_lost_a_slave_may_still_change() -> None:
    # eth8 went away (unplugged, its driver unloaded): the kernel took it out of bond0,
    # and the running bond0 still lists it.
    state = replace(BONDED, links={n: x for n, x in BONDED.links.items() if n != "eth8"})
    validate({"net3": replace(NET3, mtu=9000)}, BONDED_RUNNING, state, ALL,
             running_bonds={"bond0": BOND0})
    state = _with(state, eth7=link("eth7", master="bond0", max_mtu=1500))
    with pytest.raises(InvalidArgument) as caught:
        validate({"net3": replace(NET3, mtu=9000)}, BONDED_RUNNING, state, ALL,
                 running_bonds={"bond0": BOND0})
    assert (caught.value.reason, caught.value.details) == ("bad_mtu",
                                                           {"field": "networks.net3.mtu"})


def test_bonds_are_checked_before_networks_in_name_order() -> None:
    error = refused_bond({"bond2": bond("bond2", "eth9"), "bond1": bond(miimon=-5)},
                         {"a": net("a", vlan=0)})
    assert (error.reason, error.id) == ("bad_option", "bond1")


def test_error_data_names_the_bond() -> None:
    error = refused_bond({"bond1": bond("bond1", "eth9")})
    assert error.to_error()["data"] == {
        "name": "InvalidArgument", "reason": "unknown_nic", "object": "bond",
        "id": "bond1", "field": "bonds.bond1.slaves"}


def _with(state: HostState, **links: Link) -> HostState:
    return replace(state, links={**state.links, **links})
