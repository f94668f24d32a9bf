"""Networks between their wire form and NetworkConfig."""

from __future__ import annotations

from typing import Any

import pytest

from virtnode.errors import InvalidArgument
from virtnode.network.netconfig import config_from_api, config_to_api, request_from_api
from virtnode.network.netmodel import IpConfig, NetworkConfig


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
