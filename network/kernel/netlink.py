"""Host networking over netlink: read the kernel's network state, apply steps, find
out what the kernel can do. With :mod:`virtnode.network.kernel.linkmonitor` (whose
:class:`LinkMonitor` is re-exported here) the only code that talks netlink; what the
messages mean in the model's terms is :mod:`virtnode.network.kernel.rtnlmsg`. Built on pyroute2.

:class:`NetlinkHost` is blocking. It opens one rtnetlink socket on first use and keeps
it until :meth:`NetlinkHost.close`; every call must come from the thread that made the
first one (pyroute2 keeps its socket and event loop per thread), so the network service
runs it on one dedicated thread. Links are named in steps and found by ifindex through a
name→index map read once and kept up to date by the steps that add and delete links; a
name it does not know is looked up alone, and a stale index (ENODEV) makes it read the
map again and retry the step once.

Errors::

    StepError       a step was refused (by the kernel, or here: unknown link, bad
                    arguments, a DHCP client that would not start); .index, .step,
                    .errno, .message. The steps before it stay applied.
    OSError         reading or probing the kernel failed (errno kept); a namespace that
                    does not exist is FileNotFoundError
    RuntimeError    misuse: a closed host, a second thread, a call on a running loop
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno as errnos
import ipaddress
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from virtnode.network.kernel.dhcp import DhcpClients, DhcpError
from virtnode.network.kernel.linkevents import LinkEvent
from virtnode.network.kernel.linkmonitor import LinkMonitor
from virtnode.network.kernel.rtnlmsg import (
    BRIDGE_FLAGS_SELF,
    RT_SCOPE_LINK,
    RT_SCOPE_NOWHERE,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    RTEXT_FILTER_BRVLAN,
    RTN_UNICAST,
    RTPROT_BOOT,
    LinkInfo,
    address_key,
    bridge_vlans,
    family_number,
    kernel_error,
    kernel_message,
    parse_resolv_conf,
    route_key,
    to_address,
    to_link,
    to_routes,
    vlan_flags,
)
from virtnode.network.kernel.rtnlwire import CLONE_NEWNET, RequestSocket
from virtnode.network.model import (
    BOND_MODES,
    BridgeVlan,
    Dns,
    Features,
    HostState,
    Link,
    Step,
)

__all__ = ["LinkEvent", "LinkMonitor", "NetlinkHost", "StepError"]

log = logging.getLogger(__name__)
# pyroute2 logs every netlink message it parses at debug, and sets its logger to level 0
# when it is imported (which is here, on the netlink thread, after logging is set up): the
# agent's own debug log would drown in those lines and pay for formatting each one.
logging.getLogger("pyroute2").setLevel(max(logging.INFO, logging.getLogger().level))

SYS_NET = Path("/sys/class/net")
RESOLV_CONF = Path("/etc/resolv.conf")
#: ``ip netns exec NAME`` shows a namespace /etc/netns/NAME/resolv.conf when there is one.
NETNS_ETC = Path("/etc/netns")
DHCP_UNSUPPORTED = "DHCP is not supported on this host"
PROBE_PREFIX = "vnp"
# Privilege errors end a probe: without them nothing can be tried at all.
_PRIVILEGE_ERRORS = frozenset({errnos.EPERM, errnos.EACCES})


class _NoPrivateNamespace(Exception):
    """unshare(CLONE_NEWNET) was refused (no CAP_SYS_ADMIN)."""


class StepError(Exception):
    """Step ``index`` of an :meth:`NetlinkHost.apply` call failed; the ones before it
    were applied, the ones after it were not tried. ``errno`` is the kernel's error
    number (None for refusals made here, such as DHCP); ``message`` the kernel's words
    (its extended ack message when it gives one)."""

    def __init__(self, index: int, step: Step, errno: int | None, message: str) -> None:
        super().__init__(index, step, errno, message)
        self.index = index
        self.step = step
        self.errno = errno
        self.message = message

    def __str__(self) -> str:
        return f"step {self.index} ({self.step.describe()}) failed: {self.message}"


class _Refused(Exception):
    """A step refused before it reaches the kernel; becomes a StepError."""

    def __init__(self, errno: int | None, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message


# --- step arguments -------------------------------------------------------------------------


def _check_args(step: Step, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    missing = [key for key in required if key not in step.args]
    unknown = sorted(set(step.args) - set(required) - set(optional))
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else [])
        raise _Refused(None, f"invalid arguments: {'; '.join(parts)}")


def _arg(step: Step, key: str, kind: type[Any]) -> Any:
    value = step.args.get(key)
    # bool is an int; an integer argument given as True is a mistake.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Refused(None, f"invalid arguments: {key} must be {kind.__name__}, not {value!r}")
    return value


def _opt(step: Step, key: str, kind: type[Any]) -> Any:
    return None if step.args.get(key) is None else _arg(step, key, kind)


def _interface(step: Step) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    text = _arg(step, "address", str)
    try:
        return ipaddress.ip_interface(text)
    except ValueError as exc:
        raise _Refused(None, f"invalid arguments: {exc}") from None


# --- the blocking host ----------------------------------------------------------------------


class NetlinkHost:
    """Reads and changes one network namespace: ``netns=None`` is the process's own, a
    name one made with ``ip netns add`` (it is never created here).

    The constructor only remembers its arguments; the socket opens on the first call,
    on the calling thread, and every later call must come from that thread.
    ``resolv_conf`` overrides where DNS settings are read.
    """

    def __init__(self, netns: str | None = None, *, resolv_conf: Path | None = None,
                 dhcp: DhcpClients | None = None) -> None:
        self.netns = netns
        self._dhcp_clients = dhcp
        self._resolv_conf = resolv_conf
        self._ipr: Any = None
        self._wire: RequestSocket | None = None
        self._owner: int | None = None
        self._closed = False
        self._indexes: dict[str, int] = {}
        self._features: Features | None = None
        self._actions: dict[str, Callable[[Any, Step], None]] = {
            "add_bridge": self._add_bridge,
            "add_vlan": self._add_vlan,
            "add_bond": self._add_bond,
            "set_bond": self._set_bond,
            "del_link": self._del_link,
            "set_master": self._set_master,
            "set_mtu": self._set_mtu,
            "set_up": self._set_up,
            "set_bridge": self._set_bridge,
            "add_vlan_entry": self._vlan_entry,
            "del_vlan_entry": self._vlan_entry,
            "add_address": self._address,
            "del_address": self._address,
            "add_route": self._route,
            "del_route": self._route,
            "start_dhcp": self._dhcp,
            "stop_dhcp": self._dhcp,
        }

    def __enter__(self) -> NetlinkHost:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket. Idempotent; from the thread that used the host."""
        if self._closed:
            return
        if self._ipr is not None:
            self._check_thread()
            self._ipr.close()
            self._ipr = None
        if self._wire is not None:
            self._wire.close()
            self._wire = None
        self._closed = True

    # --- the socket

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError("NetlinkHost is used from a second thread; it belongs to the "
                               "thread that made its first call")

    def _socket(self) -> Any:
        if self._closed:
            raise RuntimeError("NetlinkHost is closed")
        if self._ipr is not None:
            self._check_thread()
            return self._ipr
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("NetlinkHost blocks: run it on its own thread, not on the "
                               "event loop")
        try:
            # flags=0: open the namespace, never create it.
            ipr = IPRoute(netns=self.netns, flags=0, groups=0, ext_ack=True)
        except FileNotFoundError:
            raise FileNotFoundError(errnos.ENOENT,
                                    f"no network namespace named {self.netns!r}") from None
        self._ipr, self._owner = ipr, threading.get_ident()
        try:
            self._wire = RequestSocket(self.netns)
            self._learn_all()
        except BaseException:
            self.close()
            raise
        return ipr

    def _learn_all(self) -> bool:
        """Re-read every link's index; True if any name's index changed."""
        before = self._indexes
        self._remember(self._requests.links())
        return self._indexes != before

    def _remember(self, infos: list[LinkInfo]) -> None:
        self._indexes = {info.name: info.index for info in infos}

    def _index(self, name: str) -> int:
        index = self._indexes.get(name)
        if index is not None:
            return index
        # Not made by us: look it up once (one request, not a dump).
        try:
            index = self._requests.link(name).index
        except NetlinkError as exc:
            if exc.code == errnos.ENODEV:
                raise _Refused(errnos.ENODEV, f"no link named {name!r}") from None
            raise
        self._indexes[name] = index
        return index

    # --- reading

    def read_state(self) -> HostState:
        """Links, addresses, main-table routes and DNS, sorted so that two reads of an
        unchanged host compare equal. Raises OSError."""
        ipr = self._socket()
        infos = self._requests.links()
        address_infos = self._requests.addresses()
        try:
            route_msgs = ipr.route("dump")
            filtering = {i.index for i in infos if i.kind == "bridge" and i.vlan_filtering}
            vlans = self._bridge_vlans(ipr) if filtering else {}
        except NetlinkError as exc:
            raise kernel_error(exc) from exc
        names = {info.index: info.name for info in infos}
        self._remember(infos)
        links: dict[str, Link] = {}
        for info in infos:
            filtered = info.index in filtering or info.master_index in filtering
            speed = _speed(info.name) if self.netns is None else None
            links[info.name] = to_link(info, names, speed,
                                       vlans.get(info.index, ()) if filtered else ())
        addresses = (to_address(info, names) for info in address_infos)
        routes = chain.from_iterable(to_routes(msg, names) for msg in route_msgs)
        return HostState(
            links=links,
            addresses=tuple(sorted((a for a in addresses if a is not None), key=address_key)),
            routes=tuple(sorted(routes, key=route_key)),
            dns=self._read_dns(),
        )

    def _bridge_vlans(self, ipr: Any) -> dict[int, tuple[BridgeVlan, ...]]:
        found = ipr.link("dump", family=socket.AF_BRIDGE, ext_mask=RTEXT_FILTER_BRVLAN)
        return {int(msg["index"]): bridge_vlans(msg) for msg in found}

    def _read_dns(self) -> Dns:
        path = self._resolv_conf
        if path is None:
            private = NETNS_ETC / self.netns / "resolv.conf" if self.netns else None
            path = private if private is not None and private.exists() else RESOLV_CONF
        try:
            with path.open(encoding="utf-8", errors="replace") as lines:
                return parse_resolv_conf(lines)
        except FileNotFoundError:
            return parse_resolv_conf(())

    # --- features

    def features(self) -> Features:
        """What the kernel can do, found by trying once with throwaway links (named
        ``vnp`` + 8 hex digits) in a private network namespace made for it and removed
        again, even on failure, so nothing on the host sees them (no uevents, no link
        events for other tools). Where no namespace can be made, the links are tried in
        this host's namespace. Also whether a DHCP client is installed. Cached. Raises
        OSError when this process may not create links at all."""
        if self._features is None:
            self._socket()  # the thread check
            self._features = self._probe_privately()
        return self._features

    def _probe_privately(self) -> Features:
        # A thread of its own moves into a new, empty network namespace (unshare affects
        # the calling thread only; no fork, nothing mounted) and probes there; the
        # namespace goes away with the thread.
        result: list[Features | BaseException] = []

        def probe() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.unshare(CLONE_NEWNET) != 0:
                    raise _NoPrivateNamespace(os.strerror(ctypes.get_errno()))
                with IPRoute(flags=0, groups=0, ext_ack=True) as ipr, RequestSocket() as wire:
                    result.append(self._probe(ipr, wire))
            except BaseException as exc:  # handed to the caller's thread
                result.append(exc)

        thread = threading.Thread(target=probe, name="netlink-probe", daemon=True)
        thread.start()
        thread.join()
        outcome = result[0]
        if isinstance(outcome, Features):
            return outcome
        if isinstance(outcome, _NoPrivateNamespace):
            log.info("netlink: no private namespace for the feature probe (%s); probing "
                     "here", outcome)
            return self._probe(self._socket(), self._requests)
        raise outcome

    def _probe(self, ipr: Any, wire: RequestSocket) -> Features:
        made: list[str] = []

        def attempt(what: str, call: Callable[[], object]) -> bool:
            try:
                call()
            except NetlinkError as exc:
                if exc.code in _PRIVILEGE_ERRORS:
                    raise kernel_error(exc) from exc
                log.info("netlink: %s is not supported here: %s", what, kernel_message(exc))
                return False
            return True

        def add(name: str, **kwargs: Any) -> None:
            ipr.link("add", ifname=name, **kwargs)
            made.append(name)

        bridge = f"{PROBE_PREFIX}{secrets.token_hex(4)}"
        try:
            has_bridge = attempt("a bridge", lambda: add(bridge, kind="bridge"))
            vlan_filtering = vlan_8021q = False
            if has_bridge:
                index = wire.link(bridge).index
                vlan_filtering = attempt("bridge VLAN filtering", lambda: ipr.link(
                    "set", index=index, kind="bridge", br_vlan_filtering=1))
                if vlan_filtering:
                    vlan_filtering = bool(wire.link(bridge).vlan_filtering)
                vlan_8021q = attempt("an 802.1q device", lambda: add(
                    f"{PROBE_PREFIX}{secrets.token_hex(4)}", kind="vlan", link=index,
                    vlan_id=2))
            bond = attempt("a bond", lambda: add(f"{PROBE_PREFIX}{secrets.token_hex(4)}",
                                                 kind="bond"))
        finally:
            for name in reversed(made):
                try:
                    ipr.link("del", ifname=name)
                except NetlinkError as exc:
                    # A VLAN device goes with its bridge: ENODEV is expected.
                    if exc.code != errnos.ENODEV:
                        log.warning("netlink: could not remove probe link %s: %s", name,
                                    kernel_message(exc))
        return Features(bridge=has_bridge, vlan_filtering=vlan_filtering,
                        vlan_8021q=vlan_8021q, bond=bond,
                        dhcp_client=self._dhcp_clients is not None
                        and self._dhcp_clients.available)

    # --- steps

    def apply(self, steps: Sequence[Step]) -> None:
        """Apply ``steps`` in order; raise :class:`StepError` at the first failure."""
        ipr = self._socket()
        for index, step in enumerate(steps):
            try:
                self._apply_one(ipr, step)
            except _Refused as exc:
                raise StepError(index, step, exc.errno, exc.message) from None
            except NetlinkError as exc:
                raise StepError(index, step, exc.code, kernel_message(exc)) from exc

    def _apply_one(self, ipr: Any, step: Step) -> None:
        action = self._actions.get(step.action)
        if action is None:
            raise _Refused(None, f"unknown action {step.action!r}")
        try:
            action(ipr, step)
        except NetlinkError as exc:
            # An index we remembered may be stale (a link deleted and made again by
            # someone else): re-read them, and try once more if any changed.
            if exc.code != errnos.ENODEV or not self._learn_all():
                raise
            action(ipr, step)

    # Most steps go out as requests encoded in rtnlwire (a plain socket, no pyroute2
    # request layer: a 100-network change is mostly this); the VLAN ones (802.1q
    # devices, filtering, VLAN entries) through pyroute2.

    @property
    def _requests(self) -> RequestSocket:
        if self._wire is None:
            raise RuntimeError("NetlinkHost is closed")
        return self._wire

    def _link_attrs(self, step: Step) -> dict[str, Any]:
        attrs: dict[str, Any] = {"ifname": step.link}
        if (mtu := _opt(step, "mtu", int)) is not None:
            attrs["mtu"] = mtu
        if (mac := _opt(step, "mac", str)) is not None:
            attrs["address"] = mac
        return attrs

    def _made(self, name: str, index: int | None = None) -> None:
        """Remember a new link's index: the one the kernel echoed, else asked for."""
        self._indexes[name] = index if index is not None else self._requests.link(name).index

    def _add_bridge(self, ipr: Any, step: Step) -> None:
        _check_args(step, ("stp", "vlan_filtering"), ("mtu", "default_pvid", "mac"))
        stp = _arg(step, "stp", bool)
        filtering = _arg(step, "vlan_filtering", bool)
        pvid = _opt(step, "default_pvid", int)
        mtu, mac = _opt(step, "mtu", int), _opt(step, "mac", str)
        if filtering or pvid is not None:
            attrs = self._link_attrs(step)
            attrs.pop("mtu", None)
            attrs["br_stp_state"] = int(stp)
            # Off is the default; saying so explicitly fails on kernels without filtering.
            if filtering:
                attrs["br_vlan_filtering"] = 1
            if pvid is not None:
                attrs["br_vlan_default_pvid"] = pvid
            ipr.link("add", kind="bridge", **attrs)
            self._made(step.link)
        else:
            self._made(step.link, self._requests.new_bridge(
                step.link, stp=stp, mac=_mac(mac) if mac else None))
        # A bridge keeps an MTU set on it; one given at creation gives way to its ports'.
        if mtu is not None:
            try:
                self._requests.set_link(self._indexes[step.link], mtu=mtu)
            except NetlinkError:
                # The step fails as a whole: take back the bridge it made.
                with contextlib.suppress(NetlinkError):
                    self._requests.del_link(self._indexes.pop(step.link))
                raise

    def _add_vlan(self, ipr: Any, step: Step) -> None:
        _check_args(step, ("parent", "vid"), ("mtu", "mac"))
        parent = self._index(_arg(step, "parent", str))
        ipr.link("add", kind="vlan", link=parent, vlan_id=_arg(step, "vid", int),
                 **self._link_attrs(step))
        self._made(step.link)

    def _add_bond(self, ipr: Any, step: Step) -> None:
        _check_args(step, ("mode", "miimon"), ("mtu", "mac"))
        mac = _opt(step, "mac", str)
        self._made(step.link, self._requests.new_bond(
            step.link, mode=_bond_mode(step), miimon=_arg(step, "miimon", int),
            mtu=_opt(step, "mtu", int), mac=_mac(mac) if mac else None))

    def _set_bond(self, ipr: Any, step: Step) -> None:
        _check_args(step, (), ("mode", "miimon"))
        self._requests.set_bond(self._index(step.link),
                                mode=_bond_mode(step) if "mode" in step.args else None,
                                miimon=_opt(step, "miimon", int))

    def _del_link(self, ipr: Any, step: Step) -> None:
        _check_args(step, ())
        self._requests.del_link(self._index(step.link))
        self._indexes.pop(step.link, None)

    def _set_master(self, ipr: Any, step: Step) -> None:
        _check_args(step, ("master",))
        master = _opt(step, "master", str)
        self._requests.set_link(self._index(step.link),
                                master=self._index(master) if master is not None else 0)

    def _set_mtu(self, ipr: Any, step: Step) -> None:
        _check_args(step, ("mtu",))
        self._requests.set_link(self._index(step.link), mtu=_arg(step, "mtu", int))

    def _set_up(self, ipr: Any, step: Step) -> None:
        _check_args(step, ("up",))
        self._requests.set_link(self._index(step.link), up=_arg(step, "up", bool))

    def _set_bridge(self, ipr: Any, step: Step) -> None:
        _check_args(step, (), ("stp", "vlan_filtering", "default_pvid"))
        stp = _opt(step, "stp", bool)
        attrs: dict[str, int] = {}
        if (filtering := _opt(step, "vlan_filtering", bool)) is not None:
            attrs["br_vlan_filtering"] = int(filtering)
        if (pvid := _opt(step, "default_pvid", int)) is not None:
            attrs["br_vlan_default_pvid"] = pvid
        if attrs:
            if stp is not None:
                attrs["br_stp_state"] = int(stp)
            ipr.link("set", index=self._index(step.link), kind="bridge", **attrs)
        elif stp is not None:
            self._requests.set_bridge(self._index(step.link), stp=stp)

    def _vlan_entry(self, ipr: Any, step: Step) -> None:
        _check_args(step, ("vid", "pvid", "untagged", "self"))
        info = {"vid": _arg(step, "vid", int),
                "flags": vlan_flags(_arg(step, "pvid", bool), _arg(step, "untagged", bool))}
        # Without flags the kernel hands the request to the port's bridge; with SELF to
        # the device itself, which for a bridge means the bridge's own entries. Adding
        # a vid that exists replaces its flags.
        extra = {"vlan_flags": BRIDGE_FLAGS_SELF} if _arg(step, "self", bool) else {}
        command = "add" if step.action == "add_vlan_entry" else "del"
        ipr.vlan_filter(command, index=self._index(step.link), vlan_info=info, **extra)

    def _address(self, ipr: Any, step: Step) -> None:
        _check_args(step, ("address",))
        iface = _interface(step)
        self._requests.address(step.action == "add_address", self._index(step.link),
                               family_number(iface.version), iface.ip.packed,
                               iface.network.prefixlen)

    def _route(self, ipr: Any, step: Step) -> None:
        _check_args(step, ("dst", "family", "metric"), ("gateway",))
        family = _arg(step, "family", int)
        if family not in (4, 6):
            raise _Refused(None, f"invalid arguments: family must be 4 or 6, not {family}")
        oif, metric = self._index(step.link), _arg(step, "metric", int)
        dst, gateway = _arg(step, "dst", str), _opt(step, "gateway", str)
        network = None
        try:
            if dst != "default":
                network = ipaddress.ip_network(dst)
                _same_family(network.version, family, "dst")
            via = ipaddress.ip_address(gateway) if gateway is not None else None
            if via is not None:
                _same_family(via.version, family, "gateway")
        except ValueError as exc:
            raise _Refused(None, f"invalid arguments: {exc}") from None
        add = step.action == "add_route"
        if add:
            # What `ip route add` does: proto boot; a route without a gateway is on-link.
            scope = RT_SCOPE_LINK if via is None and family == 4 else RT_SCOPE_UNIVERSE
        else:
            # Scope "nowhere" matches a route of any scope, as `ip route del` does.
            scope = RT_SCOPE_NOWHERE if family == 4 else RT_SCOPE_UNIVERSE
        self._requests.route(
            add, family=family_number(family), table=RT_TABLE_MAIN, oif=oif, priority=metric,
            proto=RTPROT_BOOT if add else 0, scope=scope, kind=RTN_UNICAST,
            dst=network.network_address.packed if network is not None else None,
            dst_len=network.prefixlen if network is not None else 0,
            gateway=via.packed if via is not None else None)

    def _dhcp(self, ipr: Any, step: Step) -> None:
        clients = self._dhcp_clients
        if clients is None or not clients.available:
            raise _Refused(None, DHCP_UNSUPPORTED)
        starting = step.action == "start_dhcp"
        _check_args(step, ("family", "default_route") if starting else ("family",))
        family = _arg(step, "family", int)
        try:
            if starting:
                clients.start(step.link, family, _arg(step, "default_route", bool))
            else:
                clients.stop(step.link, family)
        except DhcpError as exc:
            raise _Refused(None, str(exc)) from None


def _bond_mode(step: Step) -> int:
    mode = _arg(step, "mode", str)
    if mode not in BOND_MODES:
        raise _Refused(None, f"{step.describe()}: unknown bond mode {mode!r}")
    return BOND_MODES.index(mode)


def _mac(text: str) -> bytes:
    try:
        mac = bytes.fromhex(text.replace(":", ""))
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise _Refused(None, f"invalid arguments: mac must be six bytes, not {text!r}")
    return mac


def _same_family(version: int, family: int, what: str) -> None:
    if version != family:
        raise ValueError(f"{what} is IPv{version}, the route is IPv{family}")


def _speed(name: str) -> int | None:
    """Mb/s from sysfs; None where the driver does not say (virtual devices, no link)."""
    try:
        speed = int((SYS_NET / name / "speed").read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None
    return speed if speed >= 0 else None
