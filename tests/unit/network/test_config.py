"""Networks and bonds between their wire form and NetworkConfig and BondConfig."""

from __future__ import annotations

from typing import Any

import pytest

from virtnode.errors import InvalidArgument
from virtnode.network.config import (
    bond_from_api,
    bond_to_api,
    bonds_from_api,
    config_from_api,
    config_to_api,
    request_from_api,
)
from virtnode.network.model import BondConfig, IpConfig, NetworkConfig


def test_defaults() -> None:
    assert config_from_api("net1", {}) == NetworkConfig(name="net1")
    assert config_from_api("net1", {"ports": ["eth1"]}) == NetworkConfig(
        name="net1", bridge=True, ports=("eth1",), stp=False, default_route=False)


def test_every_field() -> None:
    cfg = config_from_api("net1", {
        "bridge": False, "ports": ["eth1"], "vlan": 10, "mtu": 9000, "stp": False,
        "ipv4": {"method": "static", "address": "192.0.2.10/24", "gateway": "192.0.2.1"},
        "ipv6": {"method": "dhcp"}, "default_route": True})
    assert cfg == NetworkConfig(
        name="net1", bridge=False, ports=("eth1",), vlan=10, mtu=9000,
        ipv4=IpConfig("static", "192.0.2.10/24", "192.0.2.1"), ipv6=IpConfig("dhcp"),
        default_route=True)


@pytest.mark.parametrize(("given", "address", "gateway"), [
    ({"address": "2001:DB8::1/64", "gateway": "2001:DB8::FFFF"}, "2001:db8::1/64",
     "2001:db8::ffff"),
    ({"address": "2001:db8:0:0::10/64"}, "2001:db8::10/64", None),
    ({"address": "192.0.2.10/255.255.255.0"}, "192.0.2.10/24", None),
    # What does not parse is left for validation to refuse, word for word.
    ({"address": "2001:db8::zz/64", "gateway": "nope"}, "2001:db8::zz/64", "nope"),
    ({"address": "2001:DB8::1"}, "2001:DB8::1", None),
])
def test_addresses_are_normalised(given: dict[str, Any], address: str,
                                  gateway: str | None) -> None:
    cfg = config_from_api("net1", {"ipv6": {"method": "static", **given}})
    assert (cfg.ipv6.address, cfg.ipv6.gateway) == (address, gateway)


@pytest.mark.parametrize(("given", "method"), [
    ({"address": "192.0.2.10/24"}, "static"),
    ({}, "none"),
    ({"method": "dhcp"}, "dhcp"),
])
def test_method_follows_the_address_when_missing(given: dict[str, Any], method: str) -> None:
    assert config_from_api("net1", {"ipv4": given}).ipv4.method == method


@pytest.mark.parametrize("cfg", [
    NetworkConfig(name="net1"),
    NetworkConfig(name="net1", bridge=False, ports=("eth1",), vlan=10, mtu=9000),
    NetworkConfig(name="net1", ports=("eth1",), stp=True, default_route=True,
                  ipv4=IpConfig("static", "192.0.2.10/24", "192.0.2.1"),
                  ipv6=IpConfig("static", "2001:db8::10/64")),
])
def test_round_trip(cfg: NetworkConfig) -> None:
    obj = config_to_api(cfg)
    assert config_from_api(cfg.name, obj) == cfg


def test_to_api_leaves_out_what_is_unset() -> None:
    assert config_to_api(NetworkConfig(name="net1", ports=("eth1",))) == {
        "bridge": True, "ports": ["eth1"], "stp": False, "default_route": False,
        "ipv4": {"method": "none"}, "ipv6": {"method": "none"}}


def test_request_with_removal() -> None:
    assert request_from_api({"a": {"remove": True}, "b": {"ports": ["eth1"]},
                             "c": {"remove": False, "bridge": False, "ports": ["eth2"]}}) == {
        "a": None, "b": NetworkConfig(name="b", ports=("eth1",)),
        "c": NetworkConfig(name="c", bridge=False, ports=("eth2",))}


@pytest.mark.parametrize(("networks", "field"), [
    ({"a": {"remove": True, "ports": ["eth1"]}}, "networks.a.remove"),
    ({"a": {"ports": ["eth1"], "bonds": []}}, "networks.a.bonds"),
    ({"a": {"ipv4": {"method": "dhcp", "dns": "x"}}}, "networks.a.ipv4.dns"),
])
def test_request_refuses_unknown_fields(networks: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        request_from_api(networks)
    assert caught.value.reason == "bad_option"
    assert caught.value.details == {"field": field}
    assert (caught.value.object, caught.value.id) == ("network", "a")


def test_config_from_api_is_not_for_removals() -> None:
    with pytest.raises(InvalidArgument):
        config_from_api("a", {"remove": True})


# --- bonds ------------------------------------------------------------------------------------


def test_bond_defaults() -> None:
    assert bonds_from_api({"bond0": {"slaves": ["eth1", "eth2"]}}) == {
        "bond0": BondConfig(name="bond0", slaves=("eth1", "eth2"), mode="active-backup",
                            miimon=100)}
    # No slaves is left for validation to refuse (no_port).
    assert bond_from_api("bond0", {}) == BondConfig(name="bond0", slaves=(),
                                                    mode="active-backup", miimon=100)


def test_bond_every_field() -> None:
    assert bond_from_api("bond0", {"slaves": ["eth2", "eth1"], "mode": "802.3ad",
                                   "miimon": 0}) == BondConfig(
        name="bond0", slaves=("eth2", "eth1"), mode="802.3ad", miimon=0)


def test_bonds_with_removal() -> None:
    assert bonds_from_api({"a": {"remove": True}, "b": {"slaves": ["eth1"]},
                           "c": {"remove": False, "slaves": ["eth2"], "mode": "balance-rr"}}) == {
        "a": None, "b": BondConfig(name="b", slaves=("eth1",)),
        "c": BondConfig(name="c", slaves=("eth2",), mode="balance-rr")}


@pytest.mark.parametrize(("bonds", "field", "words"), [
    ({"a": {"slaves": ["eth1"], "primary": "eth1"}}, "bonds.a.primary", "unexpected primary"),
    ({"a": {"slaves": ["eth1"], "xmit_hash_policy": "layer3+4", "ad_select": 0}},
     "bonds.a.ad_select", "unexpected ad_select, xmit_hash_policy"),
    ({"a": {"remove": True, "slaves": ["eth1"]}}, "bonds.a.slaves",
     "remove takes no other fields, not slaves"),
    ({"a": {"remove": True, "mode": "802.3ad", "miimon": 100}}, "bonds.a.miimon",
     "remove takes no other fields, not miimon, mode"),
])
def test_bonds_refuse_unknown_fields(bonds: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        bonds_from_api(bonds)
    assert caught.value.reason == "bad_option"
    assert caught.value.details == {"field": field}
    assert (caught.value.object, caught.value.id) == ("bond", "a")
    assert words in caught.value.message


@pytest.mark.parametrize("bond", [
    BondConfig(name="bond0", slaves=("eth1",)),
    BondConfig(name="bond0", slaves=("eth2", "eth1", "eth3"), mode="balance-alb", miimon=0),
])
def test_bond_round_trip(bond: BondConfig) -> None:
    assert bond_from_api(bond.name, bond_to_api(bond)) == bond
    assert bonds_from_api({bond.name: bond_to_api(bond)}) == {bond.name: bond}


def test_bond_to_api_gives_every_field() -> None:
    assert bond_to_api(BondConfig(name="bond0", slaves=("eth1", "eth2"))) == {
        "slaves": ["eth1", "eth2"], "mode": "active-backup", "miimon": 100}
