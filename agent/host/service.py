"""The host service: ``Host.*`` methods and the host's stable identity."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from virtnode import __version__
from virtnode.hypervisor.capabilities import parse_capabilities
from virtnode.hypervisor.connection import Hypervisor
from virtnode.hypervisor.handles import Connection
from virtnode.util.files import atomic_write
from virtnode.util.jsontypes import JsonObject

HOST_ID_FILE = "host-id"


def libvirt_version_string(number: int) -> str:
    """Format libvirt's packed version number (major * 1e6 + minor * 1e3 + micro)."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _hypervisor_facts(conn: Connection) -> JsonObject:
    caps = parse_capabilities(conn.getCapabilities())
    info = conn.getInfo()
    memory = sum(cell["memory_bytes"] for cell in caps["numa_cells"]) or info[1] * 1024 * 1024
    return {
        "hypervisor": {
            "uri": conn.getURI(),
            "type": conn.getType(),
            "version": libvirt_version_string(conn.getVersion()),
            "libvirt_version": libvirt_version_string(conn.getLibVersion()),
            "host_uuid": caps["uuid"],
        },
        "domain_types": caps["domain_types"],
        "guests": caps["guests"],
        "cpu": {**caps["cpu"], "count": info[2], "mhz": info[3]},
        "numa_cells": caps["numa_cells"],
        "memory_bytes": memory,
        # The machine's own, as the statistics have it: the hypervisor may be another
        # host's or a mock's (test:///default reports a made-up 8 GiB).
        "host_memory_bytes": psutil.virtual_memory().total,
    }


def load_host_id(state_dir: Path) -> str:
    """Return the host's UUID, creating it on first start (blocking file I/O).

    The id lives in the state dir rather than coming from SMBIOS, which is missing or
    duplicated on many machines; it stays the same for the life of the installation.
    """
    path = state_dir / HOST_ID_FILE
    try:
        return str(uuid.UUID(path.read_text(encoding="ascii").strip()))
    except FileNotFoundError:
        pass
    except ValueError:
        raise ValueError(f"{path} does not hold a UUID; fix or remove it") from None
    host_id = str(uuid.uuid4())
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, f"{host_id}\n".encode())
    return host_id


@dataclass(frozen=True, slots=True)
class ApiFacts:
    """What ``Host.getCapabilities`` says of the API this agent serves."""

    version: str
    methods: tuple[str, ...]
    events: tuple[str, ...]


class HostService:
    """Answers questions about this host; hypervisor facts are cached per connection."""

    def __init__(self, hypervisor: Hypervisor, api: ApiFacts, host_id: str,
                 device_events: Callable[[], str] = lambda: "off") -> None:
        self._hypervisor = hypervisor
        self._api = api
        self._host_id = host_id
        self._device_events = device_events
        self._facts: JsonObject | None = None

    async def start(self) -> None:
        self._hypervisor.add_connect_hook(self._forget_facts)

    async def _forget_facts(self, _conn: Connection) -> None:
        self._facts = None

    async def ping(self) -> JsonObject:
        return {"time": time.time()}

    async def get_capabilities(self) -> JsonObject:
        if self._facts is None:
            self._facts = await self._hypervisor.call(
                _hypervisor_facts, what="reading host capabilities"
            )
        return {
            "hostname": socket.gethostname(),
            "host_uuid": self._host_id,
            "agent": {"version": __version__, "api_version": self._api.version},
            **self._facts,
            "features": {
                "methods": list(self._api.methods),
                "events": list(self._api.events),
                "device_events": self._device_events(),
            },
        }
