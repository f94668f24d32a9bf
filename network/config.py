"""Networks and bonds as ``Network.setup`` and ``Network.list`` carry them, and as
:class:`~virtnode.network.model.NetworkConfig`.

The wire shape of one network::

    {bridge: bool = true, ports: [nic...], vlan?: int, mtu?: int, stp?: bool,
     ipv4?: {method: static|dhcp|none, address?, gateway?}, ipv6?: {...},
     default_route?: bool}

or ``{remove: true}``, which a request mapping holds as ``None``. The API schema has
checked the types; whether the values make sense is :mod:`virtnode.network.validate`'s
job. Addresses are normalised here (``2001:DB8::1/64`` becomes ``2001:db8::1/64``) so
that they compare equal to what the kernel reports; a string that does not parse is
kept as it is for validation to refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from virtnode.errors import InvalidArgument
from virtnode.network.layout import norm_address, norm_interface
from virtnode.network.model import BondConfig, IpConfig, IpMethod, NetworkConfig

_KEYS = frozenset({"bridge", "ports", "vlan", "mtu", "stp", "ipv4", "ipv6",
                   "default_route", "remove"})
_IP_KEYS = frozenset({"method", "address", "gateway"})


def request_from_api(networks: Mapping[str, Mapping[str, Any]]) -> dict[str, NetworkConfig | None]:
    """The ``networks`` of a ``Network.setup`` call: each name with its config, or
    ``None`` for ``{remove: true}``. Raises :class:`InvalidArgument` (``bad_option``)
    when a removal carries other fields."""
    request: dict[str, NetworkConfig | None] = {}
    for name, obj in networks.items():
        if obj.get("remove"):
            others = sorted(set(obj) - {"remove"})
            if others:
                raise InvalidArgument(
                    f"network {name!r}: remove takes no other fields, not {', '.join(others)}",
                    reason="bad_option", object="network", id=name,
                    field=f"networks.{name}.remove")
            request[name] = None
        else:
            request[name] = config_from_api(name, obj)
    return request


def config_from_api(name: str, obj: Mapping[str, Any]) -> NetworkConfig:
    """The config of network ``name`` from its wire form. An ``ipv4``/``ipv6`` object
    without ``method`` is ``static`` when it has an address, ``none`` otherwise.

    Raises :class:`InvalidArgument` (``bad_option``) for an unknown field or for
    ``remove: true`` (which :func:`request_from_api` turns into ``None``).
    """
    unknown = sorted(set(obj) - _KEYS)
    if unknown or obj.get("remove"):
        what = ", ".join(unknown) if unknown else "remove"
        raise InvalidArgument(f"network {name!r}: unexpected {what}", reason="bad_option",
                              object="network", id=name,
                              field=f"networks.{name}.{unknown[0] if unknown else 'remove'}")
    return NetworkConfig(
        name=name,
        bridge=bool(obj.get("bridge", True)),
        ports=tuple(obj.get("ports", ())),
        vlan=obj.get("vlan"),
        mtu=obj.get("mtu"),
        stp=bool(obj.get("stp", False)),
        ipv4=_ip_from_api(name, "ipv4", obj.get("ipv4")),
        ipv6=_ip_from_api(name, "ipv6", obj.get("ipv6")),
        default_route=bool(obj.get("default_route", False)),
    )


def _ip_from_api(name: str, key: str, obj: Mapping[str, Any] | None) -> IpConfig:
    if obj is None:
        return IpConfig()
    unknown = sorted(set(obj) - _IP_KEYS)
    if unknown:
        raise InvalidArgument(f"network {name!r}: unexpected {key}.{unknown[0]}",
                              reason="bad_option", object="network", id=name,
                              field=f"networks.{name}.{key}.{unknown[0]}")
    address, gateway = obj.get("address"), obj.get("gateway")
    method: IpMethod = obj.get("method") or ("static" if address else "none")
    return IpConfig(method=method,
                    address=norm_interface(address) if address is not None else None,
                    gateway=norm_address(gateway) if gateway is not None else None)


def config_to_api(cfg: NetworkConfig) -> dict[str, Any]:
    """The wire form of ``cfg``; :func:`config_from_api` of it gives ``cfg`` back."""
    obj: dict[str, Any] = {"bridge": cfg.bridge, "ports": list(cfg.ports), "stp": cfg.stp,
                           "ipv4": _ip_to_api(cfg.ipv4), "ipv6": _ip_to_api(cfg.ipv6),
                           "default_route": cfg.default_route}
    if cfg.vlan is not None:
        obj["vlan"] = cfg.vlan
    if cfg.mtu is not None:
        obj["mtu"] = cfg.mtu
    return obj


def _ip_to_api(ip: IpConfig) -> dict[str, Any]:
    obj: dict[str, Any] = {"method": ip.method}
    if ip.address is not None:
        obj["address"] = ip.address
    if ip.gateway is not None:
        obj["gateway"] = ip.gateway
    return obj


# --- bonds ------------------------------------------------------------------------------------

_BOND_KEYS = frozenset({"slaves", "mode", "miimon", "remove"})


def bonds_from_api(bonds: Mapping[str, Mapping[str, Any]]) -> dict[str, BondConfig | None]:
    """The ``bonds`` of a ``Network.setup`` call::

        {slaves: [nic...], mode?: str = active-backup, miimon?: int = 100}

    or ``{remove: true}`` (``None`` here). Raises :class:`InvalidArgument`
    (``bad_option``) for an unknown field, or a removal with other fields."""
    request: dict[str, BondConfig | None] = {}
    for name, obj in bonds.items():
        unknown = sorted(set(obj) - _BOND_KEYS)
        if obj.get("remove"):
            unknown = unknown or sorted(set(obj) - {"remove"})
        if unknown:
            what = "remove takes no other fields, not" if obj.get("remove") else "unexpected"
            raise InvalidArgument(f"bond {name!r}: {what} {', '.join(unknown)}",
                                  reason="bad_option", object="bond", id=name,
                                  field=f"bonds.{name}.{unknown[0]}")
        request[name] = None if obj.get("remove") else bond_from_api(name, obj)
    return request


def bond_from_api(name: str, obj: Mapping[str, Any]) -> BondConfig:
    defaults = BondConfig(name)
    return BondConfig(name=name, slaves=tuple(obj.get("slaves", ())),
                      mode=obj.get("mode", defaults.mode),
                      miimon=obj.get("miimon", defaults.miimon))


def bond_to_api(bond: BondConfig) -> dict[str, Any]:
    """The wire form of ``bond``; :func:`bond_from_api` of it gives ``bond`` back."""
    return {"slaves": list(bond.slaves), "mode": bond.mode, "miimon": bond.miimon}
