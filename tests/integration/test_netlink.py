"""The netlink layer against the real kernel, in network namespaces the tests make.

Each test gets a namespace ``vn-t-<8 hex>`` with two veth ends, ``nic0`` and ``nic1``, as
its NICs; their peers sit up in a second namespace, so the NICs get a carrier once they
are up. IPv6 link-local addresses and DAD are off in the namespace so that nothing
changes in it behind a test's back. What the layer reports is checked against what
``ip -j`` and ``bridge -j`` say.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from tests.conftest import missing
from tests.subproc import run
from virtnode.network.kernel.netlink import LinkEvent, LinkMonitor, NetlinkHost, StepError
from virtnode.network.kernel.rtnlmsg import LinkInfo
from virtnode.network.kernel.rtnlwire import RequestSocket
from virtnode.network.model import Address, BridgeVlan, Dns, Route, Step

pytestmark = pytest.mark.integration

NICS = ("nic0", "nic1")
QUIET_IPV6 = ("net.ipv6.conf.default.addr_gen_mode=1", "net.ipv6.conf.all.accept_dad=0",
              "net.ipv6.conf.default.accept_dad=0")


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _check(*args: str) -> str:
    done = _ip(*args)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"
    return done.stdout


@dataclass(frozen=True)
class Namespace:
    name: str
    peer: str

    def ip_json(self, *args: str) -> Any:
        return json.loads(_check("-n", self.name, "-j", *args) or "[]")

    def link(self, name: str) -> dict[str, Any]:
        (found,) = self.ip_json("-d", "link", "show", "dev", name)
        return dict(found)

    def has_link(self, name: str) -> bool:
        return _ip("-n", self.name, "link", "show", "dev", name).returncode == 0

    def bridge_vlans(self, dev: str) -> dict[int, set[str]]:
        """``bridge vlan show dev``: each vid with its flags (``PVID``, ``Egress Untagged``)."""
        done = subprocess.run(["bridge", "-n", self.name, "-j", "vlan", "show", "dev", dev],
                              capture_output=True, text=True, check=True)
        found = json.loads(done.stdout or "[]")
        return {entry["vlan"]: set(entry.get("flags", ()))
                for port in found if port["ifname"] == dev for entry in port["vlans"]}


@pytest.fixture
def netns() -> Iterator[Namespace]:
    if os.geteuid() != 0:
        missing("netlink tests make network namespaces: they need root")
    if shutil.which("ip") is None or shutil.which("bridge") is None:
        missing("iproute2 (ip, bridge) is not installed")
    ns = Namespace(f"vn-t-{secrets.token_hex(4)}", f"vn-t-{secrets.token_hex(4)}")
    try:
        for name in (ns.name, ns.peer):
            _check("netns", "add", name)
        subprocess.run(["ip", "netns", "exec", ns.name, "sysctl", "-qw", *QUIET_IPV6],
                       check=True)
        for nic in NICS:
            _check("-n", ns.name, "link", "add", nic, "type", "veth", "peer", "name", nic,
                   "netns", ns.peer)
            _check("-n", ns.peer, "link", "set", nic, "up")
        yield ns
    finally:
        for name in (ns.name, ns.peer):
            _ip("netns", "del", name)


@pytest.fixture
def host(netns: Namespace, tmp_path: Path) -> Iterator[NetlinkHost]:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# made by the test\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n"
                      "search old.example\nsearch example.org example.net\n")
    with NetlinkHost(netns.name, resolv_conf=resolv) as opened:
        yield opened


def bridge_steps(**args: object) -> list[Step]:
    bridge = {"stp": False, "vlan_filtering": False, **args}
    return [Step("add_bridge", "br0", bridge), Step("set_master", "nic0", {"master": "br0"}),
            Step("set_up", "nic0", {"up": True}), Step("set_up", "br0", {"up": True})]


# --- reading --------------------------------------------------------------------------------


def test_read_state_of_a_fresh_namespace(netns: Namespace, host: NetlinkHost) -> None:
    state = host.read_state()

    assert sorted(state.links) == ["lo", "nic0", "nic1"]
    lo = state.links["lo"]
    assert (lo.kind, lo.up, lo.mtu) == ("loopback", False, 65536)
    for name in NICS:
        link, shown = state.links[name], netns.link(name)
        assert link.kind == "veth"
        assert link.mac == shown["address"]
        assert (link.mtu, link.min_mtu, link.max_mtu) == (1500, shown["min_mtu"],
                                                          shown["max_mtu"])
        assert (link.up, link.carrier, link.operstate) == (False, False, "down")
        assert link.master is None and link.speed is None and link.vlans == ()
    assert state.addresses == () and state.routes == ()
    assert state.dns == Dns(nameservers=("192.0.2.53", "2001:db8::53"),
                            search=("example.org", "example.net"))


def test_missing_resolv_conf_is_empty_dns(netns: Namespace, tmp_path: Path) -> None:
    with NetlinkHost(netns.name, resolv_conf=tmp_path / "absent") as host:
        assert host.read_state().dns == Dns()


def test_speed_is_read_in_the_host_namespace() -> None:
    if os.geteuid() != 0:
        missing("netlink tests need root")
    with NetlinkHost() as host:
        state = host.read_state()
    assert state.links["lo"].kind == "loopback"
    for name, link in state.links.items():
        try:
            expected: int | None = int(Path(f"/sys/class/net/{name}/speed").read_text())
        except (OSError, ValueError):
            expected = None
        assert link.speed == (expected if expected is not None and expected >= 0 else None)


def test_a_missing_namespace_is_file_not_found() -> None:
    with NetlinkHost(f"vn-t-{secrets.token_hex(4)}") as host, pytest.raises(FileNotFoundError):
        host.read_state()


def test_two_reads_of_an_unchanged_host_compare_equal(host: NetlinkHost) -> None:
    host.apply([
        *bridge_steps(),
        Step("set_up", "nic1", {"up": True}),
        Step("add_address", "br0", {"address": "192.0.2.10/24"}),
        Step("add_address", "br0", {"address": "192.0.2.9/24"}),
        Step("add_address", "nic1", {"address": "198.51.100.1/24"}),
        Step("add_address", "br0", {"address": "2001:db8::10/64"}),
        Step("add_route", "br0", {"dst": "default", "family": 4, "gateway": "192.0.2.1",
                                  "metric": 0}),
        Step("add_route", "nic1", {"dst": "203.0.113.0/24", "family": 4, "metric": 7}),
    ])
    # The kernel reports an operational state for a link it has just brought up a moment
    # later (link watch): "unchanged" starts once it has.
    deadline = time.monotonic() + 10
    while any(link.up and link.operstate == "unknown"
              for link in host.read_state().links.values()):
        assert time.monotonic() < deadline, host.read_state().links
        time.sleep(0.05)
    first, second = host.read_state(), host.read_state()
    assert first == second
    # Sorted by link, family and address, not in the kernel's order (10 came first).
    assert [a.address for a in first.addresses] == [
        "192.0.2.9/24", "192.0.2.10/24", "2001:db8::10/64", "198.51.100.1/24"]


# --- steps ----------------------------------------------------------------------------------


def test_bridge_steps_read_back(netns: Namespace, host: NetlinkHost) -> None:
    host.apply([
        *bridge_steps(stp=True, mtu=1400, mac="02:00:5e:10:00:01"),
        Step("set_mtu", "nic1", {"mtu": 1280}),
    ])

    state = host.read_state()
    br0 = state.links["br0"]
    assert (br0.kind, br0.stp, br0.vlan_filtering, br0.mtu, br0.mac, br0.up) == (
        "bridge", True, False, 1400, "02:00:5e:10:00:01", True)
    assert state.links["nic0"].master == "br0" and state.links["nic0"].up
    assert state.links["nic0"].carrier  # operstate follows within a second, by itself
    assert state.links["nic1"].mtu == 1280
    assert state.ports_of("br0") == ("nic0",)
    shown = netns.link("br0")
    assert shown["linkinfo"]["info_data"]["stp_state"] == 1 and shown["mtu"] == 1400
    assert netns.link("nic0")["master"] == "br0"
    assert netns.link("nic1")["mtu"] == 1280

    host.apply([Step("set_bridge", "br0", {"stp": False}),
                Step("set_master", "nic0", {"master": None}),
                Step("set_up", "br0", {"up": False})])
    state = host.read_state()
    assert state.links["br0"].stp is False and not state.links["br0"].up
    assert state.links["nic0"].master is None
    assert netns.link("br0")["linkinfo"]["info_data"]["stp_state"] == 0
    assert "master" not in netns.link("nic0")
    assert "UP" not in netns.link("br0")["flags"]

    host.apply([Step("del_link", "br0")])
    assert "br0" not in host.read_state().links
    assert not netns.has_link("br0")


def test_addresses_and_routes_read_back(netns: Namespace, host: NetlinkHost) -> None:
    host.apply([
        *bridge_steps(),
        Step("add_address", "br0", {"address": "192.0.2.10/24"}),
        Step("add_address", "br0", {"address": "2001:db8:0:1::10/64"}),
        Step("add_route", "br0", {"dst": "default", "family": 4, "gateway": "192.0.2.1",
                                  "metric": 0}),
        Step("add_route", "br0", {"dst": "198.51.100.0/24", "family": 4, "metric": 20}),
        Step("add_route", "br0", {"dst": "default", "family": 6,
                                  "gateway": "2001:db8:0:1::1", "metric": 0}),
    ])

    state = host.read_state()
    assert state.addresses_of("br0") == (
        Address("br0", "192.0.2.10/24", 4), Address("br0", "2001:db8:0:1::10/64", 6))
    assert Route("default", 4, gateway="192.0.2.1", link="br0") in state.routes
    assert Route("198.51.100.0/24", 4, link="br0", metric=20, scope="link") in state.routes
    # The kernel gives an IPv6 route of metric 0 its default, 1024.
    assert Route("default", 6, gateway="2001:db8:0:1::1", link="br0",
                 metric=1024) in state.routes
    assert Route("192.0.2.0/24", 4, link="br0", proto="kernel", scope="link") in state.routes
    assert all(r.dst not in ("fe80::/64", "ff00::/8") for r in state.routes)
    shown = {(a["family"], f"{a['local']}/{a['prefixlen']}")
             for a in netns.ip_json("addr", "show", "dev", "br0")[0]["addr_info"]}
    assert shown == {("inet", "192.0.2.10/24"), ("inet6", "2001:db8:0:1::10/64")}
    v4 = netns.ip_json("-d", "route", "show", "table", "main")
    assert any(r["dst"] == "default" and r["gateway"] == "192.0.2.1" and r["dev"] == "br0"
               and r["protocol"] == "boot" for r in v4)
    assert any(r["dst"] == "198.51.100.0/24" and r["metric"] == 20 and r["scope"] == "link"
               for r in v4)
    v6 = netns.ip_json("-6", "route", "show", "table", "main")
    assert any(r["dst"] == "default" and r.get("gateway") == "2001:db8:0:1::1" for r in v6)

    host.apply([
        Step("del_route", "br0", {"dst": "default", "family": 4, "gateway": "192.0.2.1",
                                  "metric": 0}),
        Step("del_route", "br0", {"dst": "198.51.100.0/24", "family": 4, "metric": 20}),
        Step("del_route", "br0", {"dst": "default", "family": 6,
                                  "gateway": "2001:db8:0:1::1", "metric": 0}),
        Step("del_address", "br0", {"address": "2001:db8:0:1::10/64"}),
    ])
    state = host.read_state()
    assert state.addresses_of("br0") == (Address("br0", "192.0.2.10/24", 4),)
    assert [(r.dst, r.proto) for r in state.routes] == [("192.0.2.0/24", "kernel")]
    assert [r["dst"] for r in netns.ip_json("route", "show", "table", "main")] == [
        "192.0.2.0/24"]


def test_vlan_entries_on_a_port_and_on_the_bridge(netns: Namespace, host: NetlinkHost) -> None:
    if not host.features().vlan_filtering:
        # A kernel built without CONFIG_BRIDGE_VLAN_FILTERING (this one is): asking for
        # filtering is refused by the kernel, as features() found.
        with pytest.raises(StepError):
            host.apply(bridge_steps(vlan_filtering=True, default_pvid=1))
        assert "br0" not in host.read_state().links
        return
    host.apply([
        *bridge_steps(vlan_filtering=True, default_pvid=1),
        Step("add_vlan_entry", "nic0", {"vid": 10, "pvid": True, "untagged": True,
                                        "self": False}),
        Step("add_vlan_entry", "br0", {"vid": 10, "pvid": False, "untagged": False,
                                       "self": True}),
    ])
    links = host.read_state().links
    assert links["br0"].vlan_filtering is True and links["br0"].default_pvid == 1
    # The new PVID takes the flag from the default one.
    assert links["nic0"].vlans == (BridgeVlan(1, untagged=True),
                                   BridgeVlan(10, pvid=True, untagged=True))
    assert BridgeVlan(10) in links["br0"].vlans
    assert netns.bridge_vlans("nic0")[10] == {"PVID", "Egress Untagged"}
    assert netns.bridge_vlans("br0")[10] == set()

    # Adding an entry that exists replaces its flags.
    host.apply([Step("add_vlan_entry", "nic0", {"vid": 10, "pvid": False, "untagged": False,
                                                "self": False}),
                Step("add_vlan_entry", "br0", {"vid": 10, "pvid": False, "untagged": True,
                                               "self": True})])
    links = host.read_state().links
    assert BridgeVlan(10) in links["nic0"].vlans
    assert BridgeVlan(10, untagged=True) in links["br0"].vlans
    assert netns.bridge_vlans("nic0")[10] == set()
    assert netns.bridge_vlans("br0")[10] == {"Egress Untagged"}

    host.apply([Step("del_vlan_entry", "nic0", {"vid": 10, "pvid": False, "untagged": False,
                                                "self": False}),
                Step("del_vlan_entry", "br0", {"vid": 10, "pvid": False, "untagged": False,
                                               "self": True}),
                Step("set_bridge", "br0", {"vlan_filtering": False})])
    links = host.read_state().links
    assert 10 not in netns.bridge_vlans("nic0") and 10 not in netns.bridge_vlans("br0")
    assert links["br0"].vlan_filtering is False and links["nic0"].vlans == ()


def test_vlan_steps_work_exactly_where_features_say(netns: Namespace, host: NetlinkHost) -> None:
    features = host.features()
    filtering = Step("add_bridge", "br1", {"stp": False, "vlan_filtering": True})
    vlan = Step("add_vlan", "br0.20", {"parent": "br0", "vid": 20, "mtu": 1400})
    host.apply(bridge_steps())

    for step, supported in ((filtering, features.vlan_filtering), (vlan, features.vlan_8021q)):
        if supported:
            host.apply([step])
            assert netns.has_link(step.link)
        else:
            with pytest.raises(StepError) as refused:
                host.apply([step])
            assert refused.value.errno == errno.EOPNOTSUPP
            assert not netns.has_link(step.link)
    if features.vlan_8021q:
        link = host.read_state().links["br0.20"]
        assert (link.kind, link.vlan_id, link.vlan_parent, link.mtu) == ("vlan", 20, "br0", 1400)
        host.apply([Step("del_link", "br0.20")])
        assert not netns.has_link("br0.20")


def test_a_failing_step_leaves_the_earlier_ones_applied(netns: Namespace,
                                                        host: NetlinkHost) -> None:
    steps = [Step("add_bridge", "br0", {"stp": False, "vlan_filtering": False}),
             Step("set_mtu", "nic0", {"mtu": 50}),
             Step("set_up", "br0", {"up": True})]
    with pytest.raises(StepError) as failed:
        host.apply(steps)

    error = failed.value
    assert (error.index, error.step, error.errno) == (1, steps[1], errno.EINVAL)
    assert "mtu" in error.message
    assert steps[1].describe() in str(error) and error.message in str(error)
    assert netns.has_link("br0") and "UP" not in netns.link("br0")["flags"]
    assert netns.link("nic0")["mtu"] == 1500


def test_an_unknown_link_is_a_step_error(netns: Namespace, host: NetlinkHost) -> None:
    steps = [Step("set_up", "nic0", {"up": True}),
             Step("set_master", "nic1", {"master": "nope"})]
    with pytest.raises(StepError) as failed:
        host.apply(steps)
    assert (failed.value.index, failed.value.errno) == (1, errno.ENODEV)
    assert "'nope'" in failed.value.message
    assert "UP" in netns.link("nic0")["flags"]

    with pytest.raises(StepError) as failed:
        host.apply([Step("del_link", "nope")])
    assert (failed.value.index, failed.value.errno) == (0, errno.ENODEV)


def test_a_link_remade_behind_its_back_is_found_again(netns: Namespace,
                                                      host: NetlinkHost) -> None:
    host.apply([Step("set_mtu", "nic1", {"mtu": 1400})])  # remembers nic1's index
    _check("-n", netns.name, "link", "del", "nic1")
    _check("-n", netns.name, "link", "add", "nic1", "type", "veth", "peer", "name", "nic1p")
    host.apply([Step("set_mtu", "nic1", {"mtu": 1300})])
    assert netns.link("nic1")["mtu"] == 1300


def test_refusals_made_here(host: NetlinkHost) -> None:
    with pytest.raises(StepError) as failed:
        host.apply([Step("start_dhcp", "nic0", {"family": 4})])
    assert failed.value.errno is None
    assert failed.value.message == "DHCP is not supported on this host"

    for step in (Step("set_mtu", "nic0", {}), Step("set_mtu", "nic0", {"mtu": "big"}),
                 Step("set_up", "nic0", {"up": True, "typo": 1}),
                 Step("add_address", "nic0", {"address": "192.0.2.300/24"}),
                 Step("add_route", "nic0", {"dst": "default", "family": 6,
                                            "gateway": "192.0.2.1", "metric": 0})):
        with pytest.raises(StepError) as failed:
            host.apply([step])
        assert failed.value.errno is None and "invalid arguments" in failed.value.message


def test_a_host_belongs_to_the_thread_of_its_first_call(host: NetlinkHost) -> None:
    host.read_state()
    failure: list[BaseException] = []
    other = threading.Thread(target=lambda: _capture(failure, host.read_state))
    other.start()
    other.join()
    assert len(failure) == 1 and isinstance(failure[0], RuntimeError)
    host.close()
    host.close()
    with pytest.raises(RuntimeError):
        host.read_state()


def _capture(into: list[BaseException], call: Callable[[], object]) -> None:
    try:
        call()
    except BaseException as exc:
        into.append(exc)


async def test_a_host_refuses_to_block_the_event_loop(netns: Namespace) -> None:
    with NetlinkHost(netns.name) as host, pytest.raises(RuntimeError, match="event loop"):
        host.read_state()


def test_links_decode_as_ip_shows_them(netns: Namespace, host: NetlinkHost) -> None:
    host.apply(bridge_steps(stp=True, mtu=1400))
    for namespace in (netns.name, None):  # a made one, and the host's own links
        decoded, shown = _links_read_twice(namespace)
        assert sorted(decoded) == sorted(link["ifname"] for link in shown)
        names = {link["ifindex"]: link["ifname"] for link in shown}
        for link in shown:
            info = decoded[link["ifname"]]
            kind = link.get("linkinfo", {}).get("info_kind") or (
                "loopback" if link["link_type"] == "loopback" else "device")
            assert (info.index, info.kind, info.mtu, info.mac, info.operstate) == (
                link["ifindex"], kind, link["mtu"], link.get("address"),
                link["operstate"].lower())
            assert (info.min_mtu, info.max_mtu or 0) == (link.get("min_mtu"),
                                                         link.get("max_mtu", 0))
            assert (names.get(info.master_index or 0), info.up) == (
                link.get("master"), "UP" in link["flags"])
    with RequestSocket(netns.name) as wire:
        br0 = wire.link("br0")
    assert (br0.kind, br0.stp, br0.vlan_filtering, br0.mtu) == ("bridge", True, False, 1400)


def _links_read_twice(namespace: str | None) -> tuple[dict[str, LinkInfo], Any]:
    """The links decoded and as ``ip -j -d`` shows them, read while nothing changed: a
    link whose operstate moves (a veth end following its peer, slowly on an emulated CPU)
    between the two reads is read again."""
    for _ in range(10):
        with RequestSocket(namespace) as wire:
            decoded = {info.name: info for info in wire.links()}
            shown = json.loads(_check(*(("-n", namespace) if namespace else ()), "-j", "-d",
                                      "link", "show"))
            if {info.name: info for info in wire.links()} == decoded:
                return decoded, shown
        time.sleep(0.2)
    raise AssertionError("the links kept changing while they were read")


def test_the_request_socket_opens_in_the_namespace(netns: Namespace) -> None:
    own = os.stat("/proc/thread-self/ns/net").st_ino
    wire = RequestSocket(netns.name)
    try:
        assert os.stat("/proc/thread-self/ns/net").st_ino == own  # the thread came back
        index = wire.new_bridge("br0", stp=True, mac=bytes.fromhex("02005e100002"))
        shown = netns.link("br0")
        # This kernel echoes the new link (6.2 and later); older ones leave it to a lookup.
        assert index in (shown["ifindex"], None)
        assert wire.link("br0").index == shown["ifindex"]
        assert shown["address"] == "02:00:5e:10:00:02"
        assert shown["linkinfo"]["info_data"]["stp_state"] == 1

        with pytest.raises(NetlinkError) as refused:
            wire.new_bridge("br0", stp=False)
        assert refused.value.code == errno.EEXIST
        with pytest.raises(NetlinkError) as refused:
            wire.link("nope")
        assert refused.value.code == errno.ENODEV
        with pytest.raises(NetlinkError) as refused:
            wire.set_link(netns.link("nic0")["ifindex"], mtu=50)
        assert refused.value.code == errno.EINVAL and "mtu" in str(refused.value.args[1])

        wire.set_link(netns.link("nic0")["ifindex"], master=shown["ifindex"], up=True)
        assert netns.link("nic0")["master"] == "br0" and "UP" in netns.link("nic0")["flags"]
        wire.del_link(shown["ifindex"])
        assert not netns.has_link("br0") and "master" not in netns.link("nic0")
    finally:
        wire.close()
    with pytest.raises(FileNotFoundError):
        RequestSocket(f"vn-t-{secrets.token_hex(4)}")
    assert os.stat("/proc/thread-self/ns/net").st_ino == own


# --- features -------------------------------------------------------------------------------


def test_features_are_found_by_trying(netns: Namespace, host: NetlinkHost) -> None:
    features = host.features()

    assert features.bridge is True
    assert host.features() is features  # probed once
    # Each answer agrees with iproute2 trying the same thing.
    _check("-n", netns.name, "link", "add", "probe0", "type", "bridge")
    filtering = _ip("-n", netns.name, "link", "set", "probe0", "type", "bridge",
                    "vlan_filtering", "1").returncode == 0
    dot1q = _ip("-n", netns.name, "link", "add", "link", "probe0", "name", "probe0.2", "type",
                "vlan", "id", "2").returncode == 0
    bond = _ip("-n", netns.name, "link", "add", "probe1", "type", "bond").returncode == 0
    assert (features.vlan_filtering, features.vlan_8021q, features.bond) == (
        filtering, dot1q, bond)
    # Nothing of the probe is left behind.
    names = [link["ifname"] for link in netns.ip_json("link", "show")]
    assert not [name for name in names if name.startswith("vnp")]


# --- the monitor ----------------------------------------------------------------------------


async def ip(netns: Namespace, *args: str) -> None:
    (await run("ip", "-n", netns.name, *args)).check()


async def wait_for(monitor: LinkMonitor, wanted: Callable[[LinkEvent], bool],
                   timeout: float = 5.0) -> list[LinkEvent]:
    """Events up to and including the first one ``wanted``; fails after ``timeout``."""
    seen: list[LinkEvent] = []
    async with asyncio.timeout(timeout):
        async for event in monitor:
            seen.append(event)
            if wanted(event):
                return seen
    raise AssertionError(f"the monitor ended; events: {seen}")


@pytest.fixture
async def monitor(netns: Namespace) -> AsyncIterator[LinkMonitor]:
    async with LinkMonitor(netns.name) as started:
        yield started


async def test_monitor_reports_up_down_and_mtu(netns: Namespace, monitor: LinkMonitor) -> None:
    await ip(netns, "link", "set", "nic0", "up")
    seen = await wait_for(monitor, lambda e: e.link == "nic0" and e.operstate == "up")
    assert seen[0].link == "nic0" and seen[0].event == "changed"
    assert "up" in seen[0].changes and seen[0].up
    assert seen[-1].carrier

    await ip(netns, "link", "set", "nic0", "mtu", "1400")
    (event,) = await wait_for(monitor, lambda e: "mtu" in e.changes)
    assert (event.link, event.mtu, event.changes) == ("nic0", 1400, ("mtu",))

    await ip(netns, "link", "set", "nic0", "down")
    seen = await wait_for(monitor, lambda e: "up" in e.changes)
    assert (seen[-1].link, seen[-1].up, seen[-1].operstate) == ("nic0", False, "down")


async def test_monitor_reports_addresses(netns: Namespace, monitor: LinkMonitor) -> None:
    await ip(netns, "addr", "add", "192.0.2.7/24", "dev", "nic1")
    await ip(netns, "addr", "add", "2001:db8::7/64", "dev", "nic1")
    await ip(netns, "addr", "del", "192.0.2.7/24", "dev", "nic1")

    seen = [await wait_for(monitor, lambda e: True) for _ in range(3)]
    assert [(e[0].link, e[0].changes, e[0].address) for e in seen] == [
        ("nic1", ("address_added",), "192.0.2.7/24"),
        ("nic1", ("address_added",), "2001:db8::7/64"),
        ("nic1", ("address_removed",), "192.0.2.7/24"),
    ]


async def test_monitor_reports_links_added_and_removed(netns: Namespace,
                                                       monitor: LinkMonitor) -> None:
    await ip(netns, "link", "add", "br9", "type", "bridge")
    (added,) = await wait_for(monitor, lambda e: True)
    assert (added.link, added.event, added.changes) == ("br9", "added", ())

    await ip(netns, "link", "set", "nic0", "master", "br9")
    seen = await wait_for(monitor, lambda e: e.link == "nic0")
    assert seen[-1].master == "br9" and seen[-1].changes == ("master",)

    await ip(netns, "link", "del", "br9")
    seen = await wait_for(monitor, lambda e: e.event == "removed")
    assert seen[-1].link == "br9"
    assert any(e.link == "nic0" and e.master is None for e in seen)


async def test_monitor_reports_nothing_for_a_no_op(netns: Namespace,
                                                   monitor: LinkMonitor) -> None:
    await ip(netns, "link", "set", "nic0", "up")
    await wait_for(monitor, lambda e: e.link == "nic0" and e.operstate == "up")

    # Each of these makes the kernel send RTM_NEWLINK (or nothing); none changes what
    # the monitor watches.
    await ip(netns, "link", "set", "nic0", "up")
    await ip(netns, "link", "set", "nic0", "mtu", "1500")
    await ip(netns, "link", "set", "nic0", "txqueuelen", "2000")
    await ip(netns, "link", "set", "nic0", "alias", "uplink")
    await ip(netns, "link", "set", "nic1", "mtu", "1400")  # the marker
    (event,) = await wait_for(monitor, lambda e: True)
    assert (event.link, event.changes) == ("nic1", ("mtu",))


async def test_monitor_reads_again_after_the_kernel_dropped_messages(
        netns: Namespace) -> None:
    async with LinkMonitor(netns.name, receive_buffer=4096) as monitor:
        bridges = {f"br{n}" for n in range(50)}
        # Hold the loop (for well under the loop guard's limit) while the kernel sends
        # far more than 4 KiB of notifications: a reader that fell behind.
        with tempfile.NamedTemporaryFile("w") as script:
            script.write("".join(f"link add {name} type bridge\n" for name in bridges))
            script.flush()
            subprocess.run(["ip", "-n", netns.name, "-batch", script.name],  # noqa: ASYNC221
                           check=True)
        added: set[str] = set()

        def all_added(event: LinkEvent) -> bool:
            if event.event == "added":
                added.add(event.link)
            return added == bridges

        await wait_for(monitor, all_added, timeout=20.0)
        assert monitor.overflows >= 1


async def test_monitor_of_a_missing_namespace_does_not_start(netns: Namespace) -> None:
    with pytest.raises(FileNotFoundError):
        await LinkMonitor(f"vn-t-{secrets.token_hex(4)}").start()


async def test_monitor_stops(netns: Namespace) -> None:
    monitor = LinkMonitor(netns.name)
    await monitor.start()
    monitor.stop()
    monitor.stop()
    assert [event async for event in monitor] == []
