"""Planning network changes and undoing them, checked on the kernel simulator of
:mod:`tests.fakes.kernel`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest

from tests.fakes.kernel import BASE, UNMANAGED, Host, Kernel, Refused
from tests.fakes.netstates import ALL, link
from virtnode.network.model import (
    Address,
    BondConfig,
    BridgeVlan,
    Features,
    HostState,
    IpConfig,
    NetworkConfig,
    Route,
    Step,
    after_request,
)
from virtnode.network.plan import (
    dhcp_clients,
    dhcp_steps,
    plan,
    restore,
    touched,
)

DOT1Q = replace(ALL, vlan_filtering=False)
FILTERING = replace(ALL, vlan_8021q=False)


def view(state: HostState, links: Iterable[str]) -> tuple[Any, ...]:
    """What restore promises to bring back on ``links``."""
    names = set(links)
    return (
        {n: state.links.get(n) for n in sorted(names)},
        sorted((a.link, a.address) for a in state.addresses if a.link in names
               and not a.dynamic and not (a.family == 6 and a.scope == "link")),
        sorted((r.dst, r.family, r.gateway, r.link, r.metric) for r in state.routes
               if r.link in names and r.proto != "kernel"),
    )


# --- networks ------------------------------------------------------------------------------


def net(name: str = "net1", **kw: Any) -> NetworkConfig:
    kw.setdefault("ports", ("eth1",))
    return NetworkConfig(name=name, **kw)


def v4(address: str, gateway: str | None = None) -> IpConfig:
    return IpConfig("static", address, gateway)


v6 = v4


def s(action: str, link_name: str, **args: Any) -> Step:
    return Step(action, link_name, args)  # type: ignore[arg-type]


# --- additions -------------------------------------------------------------------------------


def test_add_bridged_with_static_ipv4_and_default_route() -> None:
    host = Host.with_networks()
    cfg = net(ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True)
    assert host.setup({"net1": cfg}) == [
        s("add_bridge", "net1", stp=False, vlan_filtering=False, mtu=1500),
        s("set_master", "eth1", master="net1"),
        s("set_up", "net1", up=True),
        s("add_address", "net1", address="10.1.0.1/24"),
        s("add_route", "net1", dst="default", family=4, gateway="10.1.0.254", metric=0),
    ]
    state = host.state
    assert state.links["eth1"].master == "net1" and state.links["net1"].up
    assert host.plan({"net1": cfg}) == []


def test_add_bridged_vlan_with_filtering_and_jumbo_mtu() -> None:
    host = Host.with_networks()
    cfg = net(vlan=10, mtu=9000, stp=True, ipv6=v6("2001:db8:1::1/64", "fe80::1"),
              default_route=True)
    assert host.setup({"net1": cfg}) == [
        s("set_mtu", "eth1", mtu=9000),
        s("add_bridge", "net1", stp=True, vlan_filtering=True, default_pvid=10, mtu=9000),
        s("set_master", "eth1", master="net1"),
        s("add_vlan_entry", "eth1", vid=10, pvid=False, untagged=False, self=False),
        s("add_vlan_entry", "net1", vid=10, pvid=True, untagged=True, self=True),
        s("set_up", "net1", up=True),
        s("add_address", "net1", address="2001:db8:1::1/64"),
        s("add_route", "net1", dst="default", family=6, gateway="fe80::1", metric=1024),
    ]
    state = host.state
    assert state.links["eth1"].vlans == (BridgeVlan(10, False, False),)
    assert state.links["net1"].vlans == (BridgeVlan(10, True, True),)
    assert host.plan({"net1": cfg}) == []


def test_add_bridged_vlan_with_8021q() -> None:
    host = Host.with_networks(DOT1Q)
    cfg = net(vlan=10, ports=("eth3",), ipv4=v4("10.1.0.1/24"))
    assert host.setup({"net1": cfg}) == [
        s("add_vlan", "eth3.10", parent="eth3", vid=10, mtu=1500),
        s("add_bridge", "net1", stp=False, vlan_filtering=False, mtu=1500),
        s("set_master", "eth3.10", master="net1"),
        s("set_up", "eth3", up=True),
        s("set_up", "eth3.10", up=True),
        s("set_up", "net1", up=True),
        s("add_address", "net1", address="10.1.0.1/24"),
    ]
    assert host.state.links["eth3"].master is None
    assert host.plan({"net1": cfg}) == []


def test_add_bridgeless_vlan() -> None:
    host = Host.with_networks()
    cfg = net(bridge=False, vlan=10, mtu=9000, ports=("eth4",),
              ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True)
    assert host.setup({"net1": cfg}) == [
        s("add_vlan", "eth4.10", parent="eth4", vid=10, mtu=9000),
        s("set_up", "eth4.10", up=True),
        s("add_address", "eth4.10", address="10.1.0.1/24"),
        s("add_route", "eth4.10", dst="default", family=4, gateway="10.1.0.254", metric=0),
    ]
    assert host.plan({"net1": cfg}) == []


def test_add_bridgeless_with_dhcp_and_static_ipv6() -> None:
    host = Host.with_networks()
    cfg = net(bridge=False, ports=("eth3",), mtu=1400, ipv4=IpConfig("dhcp"),
              ipv6=v6("2001:DB8:1::1/64"))
    assert host.setup({"net1": cfg}) == [
        s("set_mtu", "eth3", mtu=1400),
        s("set_up", "eth3", up=True),
        s("add_address", "eth3", address="2001:db8:1::1/64"),
        s("start_dhcp", "eth3", family=4, default_route=False),
    ]
    assert host.plan({"net1": cfg}) == []


def test_dhcp_to_static_with_the_leased_router_as_gateway() -> None:
    # The lease gave the address and default route the static config wants: the client
    # releases them when it stops, so they are added again, not taken as present.
    leased = net(ipv4=IpConfig("dhcp"), default_route=True)
    host = Host.with_networks(net1=leased)
    host.kernel.lease("net1", "10.1.0.1/24", "10.1.0.254")
    static = net(ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True)
    assert host.setup({"net1": static}) == [
        s("stop_dhcp", "net1", family=4),
        s("add_address", "net1", address="10.1.0.1/24"),
        s("add_route", "net1", dst="default", family=4, gateway="10.1.0.254", metric=0),
    ]
    assert host.kernel.dhcp == set()
    assert host.plan({"net1": static}) == []


def test_dhcp_clients_put_back_as_the_running_networks_want() -> None:
    host = Host.with_networks(net1=net(ipv4=IpConfig("dhcp"), default_route=True),
                              net2=net("net2", ports=("eth2",), ipv6=IpConfig("dhcp")))
    wanted = dhcp_clients(host.state, host.running, host.features)
    assert wanted == {("net1", 4, True), ("net2", 6, False)}
    assert dhcp_steps(wanted, {("net1", 4), ("net2", 6)}) == []
    assert dhcp_steps(wanted, {("net1", 4), ("net3", 4), ("net2", 4)}) == [
        s("stop_dhcp", "net2", family=4), s("stop_dhcp", "net3", family=4),
        s("start_dhcp", "net2", family=6, default_route=False)]


def test_add_a_bridge_without_ports() -> None:
    host = Host.with_networks()
    assert host.setup({"vms": net("vms", ports=())}) == [
        s("add_bridge", "vms", stp=False, vlan_filtering=False, mtu=1500),
        s("set_up", "vms", up=True),
    ]


def test_mtu_defaults_to_1500_even_on_a_jumbo_nic() -> None:
    host = Host.with_networks()
    assert host.setup({"net1": net(ports=("eth4",))})[:2] == [
        s("set_mtu", "eth4", mtu=1500),
        s("add_bridge", "net1", stp=False, vlan_filtering=False, mtu=1500),
    ]


# --- removals --------------------------------------------------------------------------------


@pytest.mark.parametrize(("features", "cfg", "steps"), [
    (ALL, net(ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True),
     [s("set_master", "eth1", master=None), s("del_link", "net1")]),
    (ALL, net(vlan=10),
     [s("set_master", "eth1", master=None), s("del_link", "net1")]),
    (DOT1Q, net(vlan=10, ipv4=IpConfig("dhcp")),
     [s("stop_dhcp", "net1", family=4), s("del_link", "net1"), s("del_link", "eth1.10")]),
    (ALL, net(bridge=False, vlan=10, ipv6=v6("2001:db8:1::1/64")),
     [s("del_link", "eth1.10")]),
    (ALL, net(bridge=False, ipv4=v4("10.1.0.1/24", "10.1.0.254"), ipv6=IpConfig("dhcp"),
              default_route=True),
     [s("stop_dhcp", "eth1", family=6),
      s("del_route", "eth1", dst="default", family=4, gateway="10.1.0.254", metric=0),
      s("del_address", "eth1", address="10.1.0.1/24")]),
])
def test_remove(features: Features, cfg: NetworkConfig, steps: list[Step]) -> None:
    host = Host.with_networks(features, net1=cfg)
    assert host.setup({"net1": None}) == steps
    assert view(host.state, BASE.links) == view(BASE, BASE.links)
    assert host.kernel.dhcp == set()


# --- changes ---------------------------------------------------------------------------------


STATIC = net(ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True)


@pytest.mark.parametrize(("before", "after", "features", "steps"), [
    pytest.param(STATIC, replace(STATIC, ipv4=v4("10.2.0.1/24", "10.2.0.254")), ALL, [
        s("del_route", "net1", dst="default", family=4, gateway="10.1.0.254", metric=0),
        s("del_address", "net1", address="10.1.0.1/24"),
        s("add_address", "net1", address="10.2.0.1/24"),
        s("add_route", "net1", dst="default", family=4, gateway="10.2.0.254", metric=0),
    ], id="address-and-gateway"),
    pytest.param(STATIC, replace(STATIC, ipv4=v4("10.1.0.1/24", "10.1.0.253")), ALL, [
        s("del_route", "net1", dst="default", family=4, gateway="10.1.0.254", metric=0),
        s("add_route", "net1", dst="default", family=4, gateway="10.1.0.253", metric=0),
    ], id="gateway"),
    # The kernel drops a link's IPv4 routes with its last IPv4 address: the route
    # comes back after the new address.
    pytest.param(STATIC, replace(STATIC, ipv4=v4("10.1.0.2/24", "10.1.0.254")), ALL, [
        s("del_address", "net1", address="10.1.0.1/24"),
        s("add_address", "net1", address="10.1.0.2/24"),
        s("add_route", "net1", dst="default", family=4, gateway="10.1.0.254", metric=0),
    ], id="address-same-subnet"),
    pytest.param(STATIC, replace(STATIC, default_route=False), ALL, [
        s("del_route", "net1", dst="default", family=4, gateway="10.1.0.254", metric=0),
    ], id="default-route-off"),
    pytest.param(net(vlan=10), net(vlan=10, mtu=9000), ALL, [
        s("set_mtu", "eth1", mtu=9000),
        s("set_mtu", "net1", mtu=9000),
    ], id="mtu-up"),
    pytest.param(net(vlan=10, mtu=9000), net(vlan=10, mtu=1500), ALL, [
        s("set_mtu", "net1", mtu=1500),
        s("set_mtu", "eth1", mtu=1500),
    ], id="mtu-down"),
    pytest.param(net(vlan=10), net(vlan=10, mtu=9000), DOT1Q, [
        s("set_mtu", "eth1", mtu=9000),
        s("set_mtu", "eth1.10", mtu=9000),
        s("set_mtu", "net1", mtu=9000),
    ], id="mtu-up-8021q"),
    pytest.param(net(vlan=10, mtu=9000), net(vlan=10, mtu=1500), DOT1Q, [
        s("set_mtu", "net1", mtu=1500),
        s("set_mtu", "eth1.10", mtu=1500),
        s("set_mtu", "eth1", mtu=1500),
    ], id="mtu-down-8021q"),
    pytest.param(net(), net(stp=True), ALL, [
        s("set_bridge", "net1", stp=True),
    ], id="stp"),
    pytest.param(net(ipv4=v4("10.1.0.1/24")), net(ports=("eth2",), ipv4=v4("10.1.0.1/24")),
                 ALL, [
        s("set_master", "eth1", master=None),
        s("set_master", "eth2", master="net1"),
    ], id="port-swap"),
    pytest.param(net(vlan=10), net(ports=("eth2",), vlan=10), ALL, [
        s("set_master", "eth1", master=None),
        s("set_master", "eth2", master="net1"),
        s("add_vlan_entry", "eth2", vid=10, pvid=False, untagged=False, self=False),
    ], id="port-swap-filtering"),
    pytest.param(net(vlan=10), net(vlan=20), ALL, [
        s("del_vlan_entry", "eth1", vid=10, pvid=False, untagged=False, self=False),
        s("del_vlan_entry", "net1", vid=10, pvid=True, untagged=True, self=True),
        s("set_bridge", "net1", default_pvid=20),
        s("add_vlan_entry", "eth1", vid=20, pvid=False, untagged=False, self=False),
        s("add_vlan_entry", "net1", vid=20, pvid=True, untagged=True, self=True),
    ], id="vlan-filtering"),
    pytest.param(net(vlan=10, ipv4=v4("10.1.0.1/24")), net(vlan=20, ipv4=v4("10.1.0.1/24")),
                 DOT1Q, [
        s("del_link", "eth1.10"),
        s("add_vlan", "eth1.20", parent="eth1", vid=20, mtu=1500),
        s("set_master", "eth1.20", master="net1"),
        s("set_up", "eth1.20", up=True),
    ], id="vlan-8021q"),
    pytest.param(net(), net(vlan=10), ALL, [
        s("set_bridge", "net1", vlan_filtering=True, default_pvid=10),
        s("add_vlan_entry", "eth1", vid=10, pvid=False, untagged=False, self=False),
        s("add_vlan_entry", "net1", vid=10, pvid=True, untagged=True, self=True),
    ], id="vlan-added-filtering"),
    pytest.param(net(vlan=10), net(), ALL, [
        s("del_vlan_entry", "eth1", vid=10, pvid=False, untagged=False, self=False),
        s("del_vlan_entry", "net1", vid=10, pvid=True, untagged=True, self=True),
        s("set_bridge", "net1", vlan_filtering=False),
    ], id="vlan-removed-filtering"),
    pytest.param(net(), net(vlan=10), DOT1Q, [
        s("set_master", "eth1", master=None),
        s("add_vlan", "eth1.10", parent="eth1", vid=10, mtu=1500),
        s("set_master", "eth1.10", master="net1"),
        s("set_up", "eth1.10", up=True),
    ], id="vlan-added-8021q"),
    pytest.param(net(ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True),
                 net(bridge=False, ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True),
                 ALL, [
        s("set_master", "eth1", master=None),
        s("del_link", "net1"),
        s("add_address", "eth1", address="10.1.0.1/24"),
        s("add_route", "eth1", dst="default", family=4, gateway="10.1.0.254", metric=0),
    ], id="bridge-to-bridgeless"),
    pytest.param(net(bridge=False, ipv4=IpConfig("dhcp")), net(ipv4=IpConfig("dhcp")), ALL, [
        s("stop_dhcp", "eth1", family=4),
        s("add_bridge", "net1", stp=False, vlan_filtering=False, mtu=1500),
        s("set_master", "eth1", master="net1"),
        s("set_up", "net1", up=True),
        s("start_dhcp", "net1", family=4, default_route=False),
    ], id="bridgeless-to-bridge-dhcp"),
    pytest.param(net(ipv6=IpConfig("dhcp")), net(ipv6=IpConfig("dhcp"), default_route=True),
                 ALL, [
        s("stop_dhcp", "net1", family=6),
        s("start_dhcp", "net1", family=6, default_route=True),
    ], id="dhcp-default-route"),
])
def test_change(before: NetworkConfig, after: NetworkConfig, features: Features,
                steps: list[Step]) -> None:
    host = Host.with_networks(features, net1=before)
    assert host.setup({"net1": after}) == steps
    assert host.plan({"net1": after}) == []


def test_multi_network_change_releases_everything_first() -> None:
    host = Host.with_networks(
        a=net("a", ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True),
        b=net("b", ports=("eth2",), vlan=10),
        c=net("c", bridge=False, ports=("eth3",), ipv4=v4("10.3.0.1/24")))
    requested: dict[str, NetworkConfig | None] = {
        # a goes; d takes its NIC, its address and the default route
        "a": None,
        "d": net("d", bridge=False, ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True),
        # b changes VLAN and MTU, c moves to another NIC and drops its address
        "b": net("b", ports=("eth2",), vlan=20, mtu=1400),
        "c": net("c", bridge=False, ports=("eth4",), mtu=9000),
    }
    assert host.setup(requested) == [
        s("set_master", "eth1", master=None),
        s("del_link", "a"),
        s("del_vlan_entry", "eth2", vid=10, pvid=False, untagged=False, self=False),
        s("del_vlan_entry", "b", vid=10, pvid=True, untagged=True, self=True),
        s("del_address", "eth3", address="10.3.0.1/24"),
        s("set_mtu", "b", mtu=1400),
        s("set_mtu", "eth2", mtu=1400),
        s("set_bridge", "b", default_pvid=20),
        s("add_vlan_entry", "eth2", vid=20, pvid=False, untagged=False, self=False),
        s("add_vlan_entry", "b", vid=20, pvid=True, untagged=True, self=True),
        s("add_address", "eth1", address="10.1.0.1/24"),
        s("add_route", "eth1", dst="default", family=4, gateway="10.1.0.254", metric=0),
    ]
    assert host.plan(dict(host.running)) == []
    assert set(host.running) == {"b", "c", "d"}


def test_networks_not_requested_are_left_alone() -> None:
    host = Host.with_networks(a=net("a"), b=net("b", ports=("eth2",)))
    host.kernel.set_up("b", up=False)    # drift on b...
    assert host.plan({"a": net("a", stp=True)}) == [s("set_bridge", "a", stp=True)]
    # ...which planning b repairs
    assert host.plan({"b": net("b", ports=("eth2",))}) == [s("set_up", "b", up=True)]


def test_a_request_repairs_what_drifted() -> None:
    cfg = net(vlan=10, ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True)
    host = Host.with_networks(net1=cfg)
    host.kernel.del_route("net1", dst="default", family=4, gateway="10.1.0.254", metric=0)
    host.kernel.set_master("eth1", master=None)
    assert host.plan({"net1": cfg}) == [
        s("set_master", "eth1", master="net1"),
        s("add_vlan_entry", "eth1", vid=10, pvid=False, untagged=False, self=False),
        s("add_route", "net1", dst="default", family=4, gateway="10.1.0.254", metric=0),
    ]


def test_a_vm_tap_on_a_filtering_bridge_follows_the_vlan() -> None:
    host = Host.with_networks(net1=net(vlan=10))
    host.kernel.links["vnet0"] = link("vnet0", "tun")
    host.kernel.set_master("vnet0", master="net1")
    before = host.state
    steps = host.setup({"net1": net(vlan=20)})
    assert "vnet0" not in touched(steps, before)
    assert host.state.links["vnet0"].vlans == (BridgeVlan(20, True, True),)


# --- bonds -----------------------------------------------------------------------------------


def bond(name: str = "bond0", *slaves: str, **kw: Any) -> BondConfig:
    return BondConfig(name, slaves or ("eth1", "eth2"), **kw)


def test_a_new_bond_as_the_port_of_a_new_bridged_network() -> None:
    host = Host.with_networks()
    cfg = net(ports=("bond0",), mtu=9000, ipv4=v4("10.1.0.1/24"))
    bonds = {"bond0": bond("bond0", "eth1", "eth3", mode="802.3ad", miimon=50)}
    assert host.setup({"net1": cfg}, bonds) == [
        s("add_bond", "bond0", mode="802.3ad", miimon=50, mtu=9000),
        s("add_bridge", "net1", stp=False, vlan_filtering=False, mtu=9000),
        s("set_up", "eth1", up=False),
        s("set_master", "eth1", master="bond0"),
        s("set_master", "eth3", master="bond0"),
        s("set_master", "bond0", master="net1"),
        s("set_up", "bond0", up=True),
        s("set_up", "net1", up=True),
        s("add_address", "net1", address="10.1.0.1/24"),
    ]
    links = host.state.links
    assert (links["bond0"].master, links["bond0"].up, links["bond0"].mtu) == ("net1", True, 9000)
    assert (links["bond0"].bond_mode, links["bond0"].miimon) == ("802.3ad", 50)
    for slave in ("eth1", "eth3"):
        assert (links[slave].master, links[slave].up, links[slave].mtu) == ("bond0", True, 9000)
    assert host.state.ports_of("net1") == ("bond0",)
    assert host.plan({"net1": cfg}, bonds) == []


def test_a_bond_without_a_network() -> None:
    host = Host.with_networks()
    bonds = {"bond0": bond("bond0", "eth2", "eth3", mode="balance-rr", miimon=0)}
    assert host.setup({}, bonds) == [
        s("add_bond", "bond0", mode="balance-rr", miimon=0),
        s("set_up", "eth2", up=False),
        s("set_master", "eth2", master="bond0"),
        s("set_master", "eth3", master="bond0"),
        s("set_up", "bond0", up=True),
    ]
    links = host.state.links
    assert (links["bond0"].master, links["bond0"].up, links["bond0"].mtu) == (None, True, 1500)
    assert host.state.ports_of("bond0") == ("eth2", "eth3")
    assert links["eth2"].up and links["eth3"].up
    assert host.plan({}, bonds) == []


def test_a_slave_joins_a_running_bond_and_takes_its_mtu() -> None:
    host = Host.with_networks(net1=net(ports=("bond0",)), bonds=[bond()])
    bonds = {"bond0": bond("bond0", "eth1", "eth2", "eth3", "eth4")}
    assert host.setup({}, bonds) == [
        s("set_master", "eth3", master="bond0"),
        s("set_up", "eth4", up=False),
        s("set_master", "eth4", master="bond0"),
    ]
    links = host.state.links
    assert host.state.ports_of("bond0") == ("eth1", "eth2", "eth3", "eth4")
    assert (links["eth4"].up, links["eth4"].mtu) == (True, 1500)
    assert links["bond0"].master == "net1"
    assert host.plan({}, bonds) == []


def test_a_slave_leaves_a_running_bond_up_again_with_its_own_mtu() -> None:
    host = Host.with_networks(net1=net(ports=("bond0",)), bonds=[bond("bond0", "eth1", "eth4")])
    assert host.state.links["eth4"].mtu == 1500
    bonds = {"bond0": bond("bond0", "eth1")}
    # The driver takes it down as it lets it go; nothing else takes it, so it goes up.
    assert host.setup({}, bonds) == [s("set_master", "eth4", master=None),
                                     s("set_up", "eth4", up=True)]
    links = host.state.links
    assert (links["eth4"].master, links["eth4"].up, links["eth4"].mtu) == (None, True, 9000)
    assert host.state.ports_of("bond0") == ("eth1",)
    assert links["bond0"].up and links["eth1"].up
    assert host.plan({}, bonds) == []


def test_the_mode_of_a_bridged_bond_changes_while_it_is_empty_and_down() -> None:
    host = Host.with_networks(net1=net(ports=("bond0",), vlan=10, mtu=9000),
                              bonds=[bond("bond0", "eth1", "eth4")])
    bonds = {"bond0": bond("bond0", "eth1", "eth4", mode="802.3ad", miimon=200)}
    assert host.setup({}, bonds) == [
        s("set_master", "eth1", master=None),
        s("set_master", "eth4", master=None),
        s("set_up", "bond0", up=False),
        s("set_bond", "bond0", mode="802.3ad", miimon=200),
        s("set_master", "eth1", master="bond0"),
        s("set_master", "eth4", master="bond0"),
        s("set_up", "bond0", up=True),
    ]
    links = host.state.links
    assert (links["bond0"].bond_mode, links["bond0"].miimon) == ("802.3ad", 200)
    assert (links["bond0"].master, links["bond0"].up, links["bond0"].mtu) == ("net1", True, 9000)
    assert links["bond0"].vlans == (BridgeVlan(10),)
    for slave in ("eth1", "eth4"):
        assert (links[slave].master, links[slave].up, links[slave].mtu) == ("bond0", True, 9000)
    assert host.plan({}, bonds) == []


def test_miimon_changes_without_letting_go_of_the_slaves() -> None:
    host = Host.with_networks(net1=net(ports=("bond0",)), bonds=[bond()])
    assert host.setup({}, {"bond0": bond(miimon=0)}) == [s("set_bond", "bond0", miimon=0)]
    assert host.state.ports_of("bond0") == ("eth1", "eth2")


def test_a_mode_change_with_the_bonds_network_changing_too() -> None:
    host = Host.with_networks(net1=net(ports=("bond0",)), bonds=[bond()])
    cfg = net(ports=("bond0",), mtu=9000)
    bonds = {"bond0": bond(mode="balance-xor")}
    assert host.setup({"net1": cfg}, bonds) == [
        s("set_master", "eth1", master=None),
        s("set_master", "eth2", master=None),
        s("set_up", "bond0", up=False),
        s("set_mtu", "bond0", mtu=9000),
        s("set_bond", "bond0", mode="balance-xor"),
        s("set_mtu", "net1", mtu=9000),
        s("set_master", "eth1", master="bond0"),
        s("set_master", "eth2", master="bond0"),
        s("set_up", "bond0", up=True),
    ]
    assert host.state.links["eth2"].mtu == 9000
    assert host.plan({"net1": cfg}, bonds) == []


def test_a_network_and_its_bond_removed_together() -> None:
    host = Host.with_networks(net1=net(ports=("bond0",), ipv4=v4("10.1.0.1/24")),
                              bonds=[bond("bond0", "eth1", "eth4")])
    before = host.state
    steps = host.setup({"net1": None}, {"bond0": None})
    assert steps == [
        s("set_master", "bond0", master=None),
        s("del_link", "net1"),
        s("del_link", "bond0"),
        s("set_up", "eth1", up=True),
        s("set_up", "eth4", up=True),
    ]
    assert touched(steps, before) == {"net1", "bond0", "eth1", "eth4"}
    links = host.state.links
    assert "bond0" not in links and "net1" not in links
    assert (links["eth1"].master, links["eth1"].up, links["eth1"].mtu) == (None, True, 1500)
    assert (links["eth4"].master, links["eth4"].up, links["eth4"].mtu) == (None, True, 9000)
    assert host.running == {} and host.bonds == {}


def test_a_nic_moves_from_a_bridged_network_into_a_new_bond() -> None:
    host = Host.with_networks(net1=net(ipv4=v4("10.1.0.1/24")), net2=net("net2", ports=("eth2",)))
    cfg = net(ports=("bond0",), ipv4=v4("10.1.0.1/24"))
    bonds = {"bond0": bond()}
    assert host.setup({"net1": cfg, "net2": None}, bonds) == [
        s("set_master", "eth2", master=None),
        s("del_link", "net2"),
        s("set_master", "eth1", master=None),
        s("add_bond", "bond0", mode="active-backup", miimon=100, mtu=1500),
        s("set_up", "eth1", up=False),
        s("set_master", "eth1", master="bond0"),
        s("set_up", "eth2", up=False),
        s("set_master", "eth2", master="bond0"),
        s("set_master", "bond0", master="net1"),
        s("set_up", "bond0", up=True),
    ]
    assert host.state.ports_of("net1") == ("bond0",)
    assert host.state.ports_of("bond0") == ("eth1", "eth2")
    assert host.state.addresses_of("net1") == (Address("net1", "10.1.0.1/24", 4),)
    assert host.plan({"net1": cfg}, bonds) == []


def test_a_bond_dissolved_under_its_network_which_keeps_one_of_its_nics() -> None:
    host = Host.with_networks(net1=net(ports=("bond0",), ipv4=v4("10.1.0.1/24")),
                              bonds=[bond()])
    cfg = net(ports=("eth1",), ipv4=v4("10.1.0.1/24"))
    assert host.setup({"net1": cfg}, {"bond0": None}) == [
        s("set_master", "eth1", master=None),
        s("set_master", "bond0", master=None),
        s("del_link", "bond0"),
        s("set_up", "eth2", up=True),  # let go, and no longer used
        # The driver gave eth1 back the MTU it had before it joined: whatever it was, the
        # network's is set.
        s("set_mtu", "eth1", mtu=1500),
        s("set_master", "eth1", master="net1"),
        s("set_up", "eth1", up=True),
    ]
    links = host.state.links
    assert "bond0" not in links
    assert (links["eth1"].master, links["eth1"].up) == ("net1", True)
    assert (links["eth2"].master, links["eth2"].up) == (None, True)
    assert host.plan({"net1": cfg}) == []


def test_a_slave_leaves_its_bond_for_a_new_network() -> None:
    host = Host.with_networks(net1=net(ports=("bond0",)),
                              bonds=[bond("bond0", "eth1", "eth2", "eth3")])
    cfg = net("net2", ports=("eth3",), vlan=7)
    assert host.setup({"net2": cfg}, {"bond0": bond()}) == [
        s("set_master", "eth3", master=None),
        s("set_mtu", "eth3", mtu=1500),
        s("add_bridge", "net2", stp=False, vlan_filtering=True, default_pvid=7, mtu=1500),
        s("set_master", "eth3", master="net2"),
        s("add_vlan_entry", "eth3", vid=7, pvid=False, untagged=False, self=False),
        s("add_vlan_entry", "net2", vid=7, pvid=True, untagged=True, self=True),
        s("set_up", "eth3", up=True),
        s("set_up", "net2", up=True),
    ]
    assert host.state.ports_of("bond0") == ("eth1", "eth2")
    assert host.state.links["eth3"].up
    assert host.plan({"net2": cfg}) == []


@pytest.mark.parametrize(("bond_mtu", "slave", "mtu"), [
    (9000, "eth1", 9000),   # eth1 had 1500 before it joined: the driver gives that back
    (1500, "eth4", 1500),   # eth4 had 9000
    (9000, "eth4", 1500),
])
def test_a_slave_that_leaves_a_bond_for_a_network_gets_the_networks_mtu(
        bond_mtu: int, slave: str, mtu: int) -> None:
    host = Host.with_networks(net1=net(ports=("bond0",), mtu=bond_mtu),
                              bonds=[bond("bond0", "eth2", slave)])
    assert host.state.links[slave].mtu == bond_mtu
    cfg = net("net2", ports=(slave,), mtu=mtu)
    host.setup({"net2": cfg}, {"bond0": bond("bond0", "eth2")})
    links = host.state.links
    assert (links[slave].master, links[slave].up, links[slave].mtu) == ("net2", True, mtu)
    assert links["net2"].mtu == mtu
    assert host.plan({"net2": cfg}) == []


def test_a_bridgeless_network_with_a_static_address_on_a_bond() -> None:
    host = Host.with_networks()
    cfg = net(bridge=False, ports=("bond0",), ipv4=v4("10.1.0.1/24", "10.1.0.254"),
              default_route=True)
    bonds = {"bond0": bond()}
    assert host.setup({"net1": cfg}, bonds) == [
        s("add_bond", "bond0", mode="active-backup", miimon=100, mtu=1500),
        s("set_up", "eth1", up=False),
        s("set_master", "eth1", master="bond0"),
        s("set_up", "eth2", up=False),
        s("set_master", "eth2", master="bond0"),
        s("set_up", "bond0", up=True),
        s("add_address", "bond0", address="10.1.0.1/24"),
        s("add_route", "bond0", dst="default", family=4, gateway="10.1.0.254", metric=0),
    ]
    assert host.state.addresses_of("bond0") == (Address("bond0", "10.1.0.1/24", 4),)
    assert host.state.links["bond0"].master is None
    assert host.plan({"net1": cfg}, bonds) == []


def test_a_vlan_network_on_a_bond_with_vlan_filtering() -> None:
    host = Host.with_networks(FILTERING)
    cfg = net(ports=("bond0",), vlan=10)
    bonds = {"bond0": bond()}
    assert host.setup({"net1": cfg}, bonds) == [
        s("add_bond", "bond0", mode="active-backup", miimon=100, mtu=1500),
        s("add_bridge", "net1", stp=False, vlan_filtering=True, default_pvid=10, mtu=1500),
        s("set_up", "eth1", up=False),
        s("set_master", "eth1", master="bond0"),
        s("set_up", "eth2", up=False),
        s("set_master", "eth2", master="bond0"),
        s("set_master", "bond0", master="net1"),
        s("add_vlan_entry", "bond0", vid=10, pvid=False, untagged=False, self=False),
        s("add_vlan_entry", "net1", vid=10, pvid=True, untagged=True, self=True),
        s("set_up", "bond0", up=True),
        s("set_up", "net1", up=True),
    ]
    links = host.state.links
    assert links["bond0"].vlans == (BridgeVlan(10),)
    assert links["eth1"].vlans == () and links["eth1"].master == "bond0"
    assert host.plan({"net1": cfg}, bonds) == []


def test_a_vlan_network_on_a_bond_with_8021q() -> None:
    host = Host.with_networks(DOT1Q)
    cfg = net(ports=("bond0",), vlan=10, mtu=9000)
    bonds = {"bond0": bond("bond0", "eth1", "eth4")}
    assert host.setup({"net1": cfg}, bonds) == [
        s("add_bond", "bond0", mode="active-backup", miimon=100, mtu=9000),
        s("add_vlan", "bond0.10", parent="bond0", vid=10, mtu=9000),
        s("add_bridge", "net1", stp=False, vlan_filtering=False, mtu=9000),
        s("set_up", "eth1", up=False),
        s("set_master", "eth1", master="bond0"),
        s("set_up", "eth4", up=False),
        s("set_master", "eth4", master="bond0"),
        s("set_master", "bond0.10", master="net1"),
        s("set_up", "bond0", up=True),
        s("set_up", "bond0.10", up=True),
        s("set_up", "net1", up=True),
    ]
    links = host.state.links
    assert (links["bond0.10"].vlan_parent, links["bond0.10"].master) == ("bond0", "net1")
    assert links["bond0"].master is None
    assert (links["eth1"].mtu, links["eth4"].mtu) == (9000, 9000)
    assert host.plan({"net1": cfg}, bonds) == []


def test_the_network_mtu_goes_to_the_bond_and_the_bond_sets_its_slaves() -> None:
    host = Host.with_networks(net1=net(ports=("bond0",)), bonds=[bond("bond0", "eth1", "eth4")])
    assert host.setup({"net1": net(ports=("bond0",), mtu=9000)}) == [
        s("set_mtu", "bond0", mtu=9000),
        s("set_mtu", "net1", mtu=9000),
    ]
    assert {n: host.state.links[n].mtu for n in ("eth1", "eth4")} == {"eth1": 9000, "eth4": 9000}
    assert host.setup({"net1": net(ports=("bond0",), mtu=1400)}) == [
        s("set_mtu", "net1", mtu=1400),
        s("set_mtu", "bond0", mtu=1400),
    ]
    assert {n: host.state.links[n].mtu for n in ("eth1", "eth4")} == {"eth1": 1400, "eth4": 1400}


def test_a_network_on_a_bond_that_lost_a_slave_changes_its_mtu() -> None:
    host = Host.with_networks(net1=net(ports=("bond0",)), bonds=[bond()])
    del host.kernel.links["eth2"]   # unplugged: the kernel took it out of bond0
    cfg = net(ports=("bond0",), mtu=9000)
    assert host.setup({"net1": cfg}) == [
        s("set_mtu", "bond0", mtu=9000),
        s("set_mtu", "net1", mtu=9000),
    ]
    assert host.state.links["eth1"].mtu == 9000
    assert host.plan({"net1": cfg}) == []


@pytest.mark.parametrize(("steps", "refusal"), [
    ([s("set_master", "eth1", master="bond0")], "while up"),
    ([s("set_up", "eth3", up=True), s("set_master", "eth3", master="bond0")], "while up"),
    ([s("set_master", "tap9", master="bond0")], "while up"),
    ([s("set_up", "br-ex", up=False), s("set_master", "br-ex", master="bond0")], "bridge"),
    ([s("set_up", "eth1", up=False), s("set_master", "eth1", master="net1"),
      s("set_master", "eth1", master="bond0")], "enslaved"),
    ([s("set_master", "eth3", master="bond0"), s("set_up", "bond0", up=True),
      s("set_bond", "bond0", mode="802.3ad")], "mode"),
    ([s("set_master", "eth3", master="bond0"), s("set_bond", "bond0", mode="802.3ad")],
     "mode"),
    ([s("set_up", "bond0", up=True), s("set_bond", "bond0", mode="802.3ad")], "mode"),
    ([s("set_mtu", "bond0", mtu=9001), s("set_up", "eth4", up=False),
      s("set_master", "eth4", master="bond0")], "MTU 9001"),
    ([s("set_master", "eth3", master="bond0"), s("set_up", "eth4", up=False),
      s("set_master", "eth4", master="bond0"), s("set_mtu", "bond0", mtu=9001)], "eth4"),
])
def test_the_simulated_bonding_driver_refuses_what_the_kernel_does(
        steps: list[Step], refusal: str) -> None:
    kernel = Kernel(BASE)
    kernel.add_bond("bond0", mode="active-backup", miimon=100)
    kernel.add_bridge("net1", stp=False, vlan_filtering=False)
    with pytest.raises(Refused, match=refusal):
        kernel.apply(steps)


def test_the_simulated_bonding_driver_takes_a_mode_and_miimon_when_it_may() -> None:
    kernel = Kernel(BASE)
    kernel.add_bond("bond0", mode="active-backup", miimon=100)
    kernel.apply([s("set_bond", "bond0", mode="802.3ad", miimon=0),
                  s("set_master", "eth3", master="bond0"), s("set_up", "bond0", up=True),
                  s("set_bond", "bond0", miimon=250)])
    found = kernel.read().links["bond0"]
    assert (found.bond_mode, found.miimon, found.up) == ("802.3ad", 250, True)
    assert kernel.read().links["eth3"].up


# --- restore ---------------------------------------------------------------------------------


SCENARIOS: list[tuple[str, Features, dict[str, NetworkConfig],
                      dict[str, NetworkConfig | None]]] = [
    ("add-bridged", ALL, {}, {"net1": STATIC}),
    ("add-everything", ALL, {}, {
        "a": net("a", vlan=10, mtu=9000, ipv6=v6("2001:db8:1::1/64", "fe80::1"),
                 default_route=True),
        "b": net("b", ports=("eth2",), vlan=11, ipv4=v4("10.2.0.1/24")),
        "c": net("c", bridge=False, ports=("eth4",), vlan=12, mtu=9000,
                 ipv4=v4("10.3.0.1/24")),
        "d": net("d", bridge=False, ports=("eth3",), ipv4=IpConfig("dhcp"))}),
    ("add-8021q", DOT1Q, {}, {
        "a": net("a", vlan=10, mtu=9000, ports=("eth4",), ipv4=v4("10.1.0.1/24", "10.1.0.9"),
                 default_route=True)}),
    ("remove-all", ALL, {
        "a": net("a", vlan=10, ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True),
        "b": net("b", bridge=False, ports=("eth2",), ipv6=v6("2001:db8:2::1/64"))},
     {"a": None, "b": None}),
    ("remove-8021q", DOT1Q, {"a": net("a", vlan=10, mtu=9000, ports=("eth4",))}, {"a": None}),
    ("change-vlan-filtering", ALL, {"a": net("a", vlan=10, ipv4=v4("10.1.0.1/24"))},
     {"a": net("a", vlan=20, mtu=1400, ipv4=v4("10.1.0.5/24"), stp=True)}),
    ("change-vlan-8021q", DOT1Q, {"a": net("a", vlan=10, mtu=9000, ports=("eth4",))},
     {"a": net("a", vlan=20, mtu=1500, ports=("eth4",))}),
    ("vlan-on-off", ALL, {"a": net("a"), "b": net("b", ports=("eth2",), vlan=5)},
     {"a": net("a", vlan=7), "b": net("b", ports=("eth2",))}),
    ("shuffle", ALL, {
        "a": net("a", ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True),
        "b": net("b", ports=("eth2",), vlan=10),
        "c": net("c", bridge=False, ports=("eth3",), ipv4=v4("10.3.0.1/24"))},
     {"a": None,
      "d": net("d", bridge=False, ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True),
      "b": net("b", ports=("eth3",), vlan=20, mtu=1400),
      "c": net("c", ports=("eth2",), ipv4=v4("10.3.0.1/24"))}),
    ("bridge-to-bridgeless-and-back", ALL, {
        "a": net("a", ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True),
        "b": net("b", bridge=False, ports=("eth2",), ipv4=v4("10.2.0.1/24"))},
     {"a": net("a", bridge=False, ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True),
      "b": net("b", ports=("eth2",), ipv4=v4("10.2.0.1/24"))}),
]


#: As SCENARIOS, with the bonds that run and the bonds requested.
BOND_SCENARIOS: list[tuple[str, Features, dict[str, NetworkConfig], list[BondConfig],
                           dict[str, NetworkConfig | None], dict[str, BondConfig | None]]] = [
    ("bond-add-bridged", ALL, {}, [], {
        "a": net("a", ports=("bond0",), vlan=10, mtu=9000,
                 ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True)},
     {"bond0": bond("bond0", "eth1", "eth4")}),
    ("bond-add-alone", ALL, {}, [], {}, {"bond0": bond("bond0", "eth2", "eth3",
                                                       mode="balance-rr")}),
    ("bond-add-8021q-bridgeless", DOT1Q, {}, [], {
        "a": net("a", bridge=False, ports=("bond0",), vlan=10, ipv4=v4("10.1.0.1/24"))},
     {"bond0": bond()}),
    ("bond-slaves", ALL, {"a": net("a", ports=("bond0",))}, [bond()], {},
     {"bond0": bond("bond0", "eth2", "eth3", "eth4")}),
    ("bond-mode", ALL, {"a": net("a", ports=("bond0",), vlan=10, mtu=9000)},
     [bond("bond0", "eth1", "eth4")], {},
     {"bond0": bond("bond0", "eth1", "eth4", mode="802.3ad", miimon=0)}),
    ("bond-mode-and-network", DOT1Q, {"a": net("a", ports=("bond0",), vlan=10)}, [bond()],
     {"a": net("a", ports=("bond0",), vlan=20, mtu=9000)},
     {"bond0": bond(mode="balance-alb")}),
    ("bond-remove-with-network", ALL, {
        "a": net("a", ports=("bond0",), ipv4=v4("10.1.0.1/24", "10.1.0.254"),
                 default_route=True)},
     [bond("bond0", "eth1", "eth4")], {"a": None}, {"bond0": None}),
    ("bond-to-another-network", ALL, {"a": net("a", ports=("bond0",))}, [bond()],
     {"a": None, "b": net("b", ports=("bond0",), vlan=5)}, {}),
    ("nic-into-bond", ALL, {
        "a": net("a", ipv4=v4("10.1.0.1/24")), "b": net("b", ports=("eth2",))}, [],
     {"a": net("a", ports=("bond0",), ipv4=v4("10.1.0.1/24")), "b": None},
     {"bond0": bond()}),
    ("slave-to-another-bond", ALL, {}, [bond(), bond("bond1", "eth3")], {},
     {"bond0": bond("bond0", "eth1"), "bond1": bond("bond1", "eth3", "eth2")}),
    ("slave-to-a-network", ALL, {"a": net("a", ports=("bond0",))},
     [bond("bond0", "eth1", "eth2", "eth3")],
     {"b": net("b", ports=("eth3",), vlan=7, ipv4=v4("10.2.0.1/24"))}, {"bond0": bond()}),
    ("slave-to-a-jumbo-network", ALL, {"a": net("a", ports=("bond0",), mtu=9000)},
     [bond("bond0", "eth1", "eth4")], {"b": net("b", bridge=False, ports=("eth1",), mtu=9000)},
     {"bond0": bond("bond0", "eth4")}),
    ("bond-dissolved", ALL, {
        "a": net("a", ports=("bond0",), ipv4=v4("10.1.0.1/24", "10.1.0.254"),
                 default_route=True)},
     [bond()], {"a": net("a", ports=("eth1",), ipv4=v4("10.1.0.1/24", "10.1.0.254"),
                         default_route=True)}, {"bond0": None}),
]


@pytest.mark.parametrize(("features", "running", "bonds", "requested", "bond_request"),
                         [(*s[1:3], [], s[3], {}) for s in SCENARIOS]
                         + [s[1:] for s in BOND_SCENARIOS],
                         ids=[s[0] for s in SCENARIOS] + [s[0] for s in BOND_SCENARIOS])
def test_restore_after_any_part_of_a_plan(features: Features, running: dict[str, NetworkConfig],
                                          bonds: list[BondConfig],
                                          requested: dict[str, NetworkConfig | None],
                                          bond_request: dict[str, BondConfig | None]) -> None:
    host = Host.with_networks(features, bonds=bonds, **running)
    snapshot = host.state
    steps = host.plan(requested, bond_request)
    assert steps
    links = touched(steps, snapshot)
    assert not links & UNMANAGED
    assert restore(snapshot, snapshot, links) == []
    for applied in range(len(steps) + 1):
        kernel = Kernel(snapshot)
        kernel.apply(steps[:applied])
        undo = restore(kernel.read(), snapshot, links)
        assert {step.link for step in undo} <= links
        kernel.apply(undo)
        # Links the steps do not name are as they were too (a deleted bond's slaves).
        everything = set(snapshot.links) | set(kernel.links)
        assert view(kernel.read(), everything) == view(snapshot, everything), \
            f"after {applied} of {len(steps)} steps"
        assert restore(kernel.read(), snapshot, links) == []
    # The whole plan applied, a second plan finds nothing to do.
    host.kernel.apply(steps)
    after = {n: c for n, c in {**host.running, **requested}.items() if c is not None}
    after_bonds = after_request(host.bonds, bond_request)
    assert plan(host.state, after, after, features, running_bonds=after_bonds,
                requested_bonds=after_bonds) == []


def test_restore_orders_its_steps() -> None:
    before = Host.with_networks(a=net("a", vlan=10, mtu=9000, ports=("eth4",),
                                      ipv4=v4("10.1.0.1/24", "10.1.0.254"), default_route=True))
    snapshot = before.state
    steps = before.setup({"a": None, "b": net("b", ports=("eth4",), ipv4=v4("10.1.0.7/24"))})
    assert restore(before.state, snapshot, touched(steps, snapshot)) == [
        s("set_master", "eth4", master=None),
        s("del_link", "b"),
        s("set_mtu", "eth4", mtu=9000),
        s("add_bridge", "a", stp=False, vlan_filtering=True, default_pvid=10, mtu=9000,
          mac=snapshot.links["a"].mac),
        s("set_master", "eth4", master="a"),
        s("add_vlan_entry", "eth4", vid=10, pvid=False, untagged=False, self=False),
        s("add_vlan_entry", "a", vid=10, pvid=True, untagged=True, self=True),
        s("set_up", "a", up=True),
        s("add_address", "a", address="10.1.0.1/24"),
        s("add_route", "a", dst="default", family=4, gateway="10.1.0.254", metric=0),
    ]


def test_restore_recreates_an_8021q_device_and_leaves_what_the_kernel_owns() -> None:
    host = Host.with_networks(DOT1Q, a=net("a", bridge=False, vlan=10, ports=("eth2",),
                                           ipv4=v4("10.1.0.1/24")))
    host.kernel.add_address("eth2.10", address="fe80::5/64")
    host.kernel.addresses.append(Address("eth2.10", "10.9.0.5/24", 4, dynamic=True))
    host.kernel.routes.append(Route("10.1.0.0/24", 4, link="eth2.10", proto="kernel"))
    snapshot = host.state
    host.kernel.del_link("eth2.10")
    assert restore(host.state, snapshot, {"eth2", "eth2.10"}) == [
        s("add_vlan", "eth2.10", parent="eth2", vid=10, mtu=1500,
          mac=snapshot.links["eth2.10"].mac),
        s("set_up", "eth2.10", up=True),
        s("add_address", "eth2.10", address="10.1.0.1/24"),
    ]


def test_restore_leaves_a_vanished_nic_alone() -> None:
    host = Host.with_networks(a=net("a"))
    snapshot = host.state
    host.kernel.del_link("a")
    del host.kernel.links["eth1"]
    assert restore(host.state, snapshot, {"a", "eth1"}) == [
        s("add_bridge", "a", stp=False, vlan_filtering=False, mtu=1500,
          default_pvid=1, mac=snapshot.links["a"].mac),
        s("set_up", "a", up=True),
    ]


def test_restore_puts_a_deleted_bond_back_with_its_slaves() -> None:
    host = Host.with_networks(net1=net(ports=("bond0",), mtu=9000),
                              bonds=[bond("bond0", "eth1", "eth4", mode="802.3ad")])
    snapshot = host.state
    steps = host.setup({"net1": None}, {"bond0": None})
    # The slaves were let go and put up again: they go down to join, and the bond opens
    # them again.
    assert restore(host.state, snapshot, touched(steps, snapshot)) == [
        s("add_bond", "bond0", mode="802.3ad", miimon=100, mtu=9000,
          mac=snapshot.links["bond0"].mac),
        s("add_bridge", "net1", stp=False, vlan_filtering=False, default_pvid=1, mtu=9000,
          mac=snapshot.links["net1"].mac),
        s("set_up", "eth1", up=False),
        s("set_master", "eth1", master="bond0"),
        s("set_up", "eth4", up=False),
        s("set_master", "eth4", master="bond0"),
        s("set_master", "bond0", master="net1"),
        s("set_up", "bond0", up=True),
        s("set_up", "net1", up=True),
    ]


def test_touched() -> None:
    assert touched([s("set_master", "eth1", master="net1"),
                    s("add_vlan", "eth2.5", parent="eth2", vid=5),
                    s("set_master", "eth3", master=None),
                    s("del_link", "x")], HostState({}, (), ())) == {
        "eth1", "net1", "eth2.5", "eth2", "eth3", "x"}


def test_touched_counts_the_ports_a_deleted_link_lets_go() -> None:
    state = Host.with_networks(net1=net(ports=("bond0",)), bonds=[bond()]).state
    assert touched([s("del_link", "bond0")], state) == {"bond0", "eth1", "eth2"}
    assert touched([s("del_link", "net1")], state) == {"net1", "bond0"}
    assert touched([s("set_master", "eth1", master=None)], state) == {"eth1"}
