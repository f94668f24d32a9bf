"""The DHCP client bookkeeping that needs no DHCP server: pid files, names, the wrapper.
Clients that really run are in tests/integration/test_network.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from virtnode.network.kernel.dhcp import WRAPPER, DhcpClients, DhcpError


def test_a_pid_counts_only_while_it_is_a_dhclient_of_that_pid_file(tmp_path: Path) -> None:
    clients = DhcpClients(tmp_path)
    assert clients.pid("br0", 4) is None and clients.running() == set()
    # A pid file left by a client that is gone, now naming another live process (this
    # one), or garbage: none of them is a running client.
    (tmp_path / "br0.4.pid").write_text(f"{os.getpid()}\n")
    (tmp_path / "br1.6.pid").write_text("not a pid\n")
    (tmp_path / "junk.pid").write_text(f"{os.getpid()}\n")
    # A live process that is no dhclient (it sleeps until killed below).
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "br2.4.pid").write_text(f"{sleeper.pid}\n")
        assert clients.pid("br0", 4) is None and clients.pid("br2", 4) is None
        assert clients.running() == set()
        clients.stop("br0", 4)  # nothing runs: nothing to do, nothing killed
        assert (tmp_path / "br0.4.pid").exists()
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("link", ["", ".", "..", "a/b", "../etc", "-nw", "-sf"])
def test_link_names_cannot_leave_the_directory(tmp_path: Path, link: str) -> None:
    with pytest.raises(DhcpError):
        DhcpClients(tmp_path).pid(link, 4)


def test_a_family_is_4_or_6(tmp_path: Path) -> None:
    with pytest.raises(DhcpError):
        DhcpClients(tmp_path).pid("br0", 5)


def test_without_dhclient_nothing_starts(tmp_path: Path) -> None:
    clients = DhcpClients(tmp_path, dhclient=str(tmp_path / "no-dhclient"))
    assert not clients.available
    with pytest.raises(DhcpError, match="no DHCP client is installed"):
        clients.start("br0", 4, default_route=False)
    assert not (tmp_path / WRAPPER).exists()


def test_the_wrapper_drops_routers_dns_and_host_name(tmp_path: Path) -> None:
    # The wrapper runs the system's script last; run its first part with the exec taken
    # out and see which lease variables are left.
    clients = DhcpClients(tmp_path, dhclient="/bin/true")
    wrapper = clients._wrapper()
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755
    assert clients._wrapper() == wrapper  # written once
    body = wrapper.read_text().replace("exec /sbin/dhclient-script", "env #")
    lease = {"new_routers": "192.0.2.1", "new_domain_name_servers": "192.0.2.53",
             "new_host_name": "evil", "new_ip_address": "192.0.2.10", "PATH": "/usr/bin:/bin"}
    for default_route, routers in (("yes", True), ("no", False)):
        done = subprocess.run(["sh", "-c", body], env={
            **lease, "VIRTNODE_DEFAULT_ROUTE": default_route},
            capture_output=True, text=True, check=True)
        shown = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        assert shown["new_ip_address"] == "192.0.2.10"
        assert ("new_routers" in shown) is routers
        assert "new_domain_name_servers" not in shown and "new_host_name" not in shown
