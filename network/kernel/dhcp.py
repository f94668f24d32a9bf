"""DHCP clients for the networks configured with ``method: dhcp``: ISC ``dhclient``, one
process per link and family, started with ``-nw`` (it daemonizes at once and keeps the
lease renewed; the address arrives a moment later, as a ``network.link`` event).

Each client's pid file and lease file live in one directory of the agent's state
(``<state>/dhcp``, named ``<link>.<4|6>.pid`` and ``.leases``), so the clients outlive
an agent restart and are found again by their pid files: a pid counts only while it is a
live ``dhclient`` whose command line names that pid file, so a pid reused after a reboot
is never taken for a client. Stopping runs ``dhclient -r`` with the same files, which
sends a DHCPRELEASE, takes the leased address off the link and ends the client.

The lease is applied by the system's ``dhclient-script`` through a small wrapper written
into that directory: it drops the lease's routers when the network has no default route
(``-e VIRTNODE_DEFAULT_ROUTE=no``), and always the lease's DNS servers, domain and host
name, so a lease never rewrites /etc/resolv.conf or the host name of a hypervisor. IPv6
default routes come from router advertisements, which the kernel handles; DHCPv6 has
none to drop.

Blocking; the network service calls it from its netlink thread. Link names reach
``dhclient`` as one argument each, never through a shell, and have been validated as
link names (no ``/``) before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from virtnode.network.model import Family

log = logging.getLogger(__name__)

DHCLIENT = "dhclient"
SYSTEM_SCRIPT = Path("/sbin/dhclient-script")
WRAPPER = "virtnode-dhclient-script"
#: How long ``dhclient -nw`` and ``dhclient -r`` may take.
COMMAND_TIMEOUT = 30.0
#: How long a started client may take to write its pid file, and a released one to
#: exit before it gets SIGTERM.
EXIT_WAIT = 5.0

#: How long to wait for a usable IPv6 link-local address before starting dhclient -6.
LINK_LOCAL_WAIT = 10.0
IF_INET6 = Path("/proc/net/if_inet6")
_SCOPE_LINK = 0x20
_NOT_READY = 0x40 | 0x08  # IFA_F_TENTATIVE, IFA_F_DADFAILED

_WRAPPER_TEXT = f"""#!/bin/sh
# Written by virtnode: applies a lease with {SYSTEM_SCRIPT}, without what the agent
# does not take from DHCP (see virtnode.network.kernel.dhcp).
if [ "$VIRTNODE_DEFAULT_ROUTE" = no ]; then
    unset new_routers old_routers
fi
unset new_domain_name_servers new_domain_name new_domain_search new_host_name
unset new_dhcp6_name_servers new_dhcp6_domain_search
exec {SYSTEM_SCRIPT} "$@"
"""


class DhcpError(Exception):
    """A DHCP client could not be started or stopped; the message says why."""


class DhcpClients:
    """The agent's DHCP clients, kept in ``directory``."""

    def __init__(self, directory: Path, *, dhclient: str | None = None) -> None:
        self.directory = directory
        self._dhclient = dhclient if dhclient is not None else (
            shutil.which(DHCLIENT) or shutil.which(DHCLIENT, path="/usr/sbin:/sbin"))

    @property
    def available(self) -> bool:
        """Whether dhclient and the system's dhclient-script are installed."""
        return (self._dhclient is not None and os.access(self._dhclient, os.X_OK)
                and SYSTEM_SCRIPT.exists())

    def _files(self, link: str, family: int) -> tuple[Path, Path]:
        # A name starting with '-' would be an option to dhclient.
        if family not in (4, 6) or not link or "/" in link or link in (".", "..") or \
                link.startswith("-"):
            raise DhcpError(f"no DHCP client for link {link!r}, family {family!r}")
        stem = self.directory / f"{link}.{family}"
        return stem.with_name(stem.name + ".pid"), stem.with_name(stem.name + ".leases")

    def _command(self, link: str, family: int, *extra: str) -> list[str]:
        if not self.available:
            raise DhcpError("no DHCP client is installed (dhclient, Debian's "
                            "isc-dhcp-client)")
        assert self._dhclient is not None
        pid_file, lease_file = self._files(link, family)
        return [self._dhclient, f"-{family}", "-pf", str(pid_file), "-lf", str(lease_file),
                "-sf", str(self._wrapper()), *extra, link]

    def _wrapper(self) -> Path:
        path = self.directory / WRAPPER
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8") == _WRAPPER_TEXT:
                return path
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        temp = path.with_name(f".{WRAPPER}.{os.getpid()}")
        with open(temp, "w", encoding="utf-8") as out:
            out.write(_WRAPPER_TEXT)
            out.flush()
            os.fsync(out.fileno())
        temp.chmod(0o755)
        temp.replace(path)
        return path

    def start(self, link: str, family: int, default_route: bool) -> None:
        """Start a client for ``link``; one that runs already is left alone."""
        if self.pid(link, family) is not None:
            return
        if family == 6:
            # dhclient -6 binds to the link-local address and exits if it is not usable
            # yet: a link just made up is still doing duplicate address detection.
            _wait_link_local(link)
        command = self._command(link, family, "-nw", "-e",
                                f"VIRTNODE_DEFAULT_ROUTE={'yes' if default_route else 'no'}")
        self._run(command, f"start the IPv{family} DHCP client on {link}")
        # The daemon writes its pid file after the command that forked it has exited.
        if not _wait_until(lambda: self.pid(link, family) is not None, EXIT_WAIT):
            raise DhcpError(f"the IPv{family} DHCP client on {link} did not start (no "
                            f"live dhclient wrote its pid file within {EXIT_WAIT:g}s)")
        log.info("dhcp: IPv%d client started on %s", family, link)

    def stop(self, link: str, family: int) -> None:
        """Release the lease and end the client; nothing if none runs."""
        pid = self.pid(link, family)
        if pid is None:
            return
        pid_file, _ = self._files(link, family)
        try:
            self._run(self._command(link, family, "-r"),
                      f"release the IPv{family} DHCP lease on {link}")
        except DhcpError as exc:
            log.warning("dhcp: %s; ending the client", exc)
        if not _wait_until(lambda: not _is_client(pid, pid_file), EXIT_WAIT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        pid_file.unlink(missing_ok=True)
        log.info("dhcp: IPv%d client on %s stopped", family, link)

    def pid(self, link: str, family: int) -> int | None:
        """The pid of the running client of ``link`` and ``family``, None if none runs."""
        pid_file, _ = self._files(link, family)
        try:
            pid = int(pid_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None
        return pid if _is_client(pid, pid_file) else None

    def running(self) -> set[tuple[str, Family]]:
        """(link, family) of every client that runs."""
        found: set[tuple[str, Family]] = set()
        for pid_file in self.directory.glob("*.pid"):
            link, _, word = pid_file.name.removesuffix(".pid").rpartition(".")
            family: Family = 4 if word == "4" else 6
            if word in ("4", "6") and link and self.pid(link, family) is not None:
                found.add((link, family))
        return found

    def _run(self, command: list[str], what: str) -> None:
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT, check=False,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DhcpError(f"cannot {what}: {exc}") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise DhcpError(f"cannot {what}: {last}")


def _wait_until(done: Callable[[], bool], seconds: float) -> bool:
    """Poll ``done`` until it is true (True) or ``seconds`` have passed (False)."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _wait_link_local(link: str) -> None:
    """Wait until ``link`` has a usable link-local IPv6 address; give up silently (the
    client then says what is wrong) after LINK_LOCAL_WAIT or when there is no IPv6."""

    def usable() -> bool:
        try:
            rows = [line.split() for line in IF_INET6.read_text(encoding="ascii").splitlines()]
        except OSError:
            return True  # no IPv6 at all: dhclient says so itself
        return not rows or any(
            len(row) == 6 and row[5] == link and int(row[3], 16) == _SCOPE_LINK
            and not int(row[4], 16) & _NOT_READY for row in rows)

    _wait_until(usable, LINK_LOCAL_WAIT)


def _is_client(pid: int, pid_file: Path) -> bool:
    """Whether ``pid`` is a live dhclient started with ``pid_file``."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(words) and os.path.basename(words[0]) == DHCLIENT.encode() and \
        str(pid_file).encode() in words
