"""Network namespaces and veth pairs for networking tests: made by the test, always removed.

A host under test is a namespace; its "NICs" are veth ends whose peers sit in another
namespace (the switch side, where test clients live). Nothing leaves the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tests.conftest import missing
from tests.subproc import run


def require_netns() -> str:
    """The ``ip`` command, when this process may make namespaces; else ``missing``."""
    ip = shutil.which("ip")
    if ip is None:
        missing("ip (iproute2) is not installed")
    if os.geteuid() != 0:
        missing("network namespaces need root")
    assert ip is not None
    return ip


@dataclass
class Netns:
    """A namespace this test made; ``ip(...)`` runs ``ip`` inside it."""

    name: str

    async def ip(self, *args: str) -> str:
        return (await run("ip", "-n", self.name, *args)).check()

    async def ip_json(self, *args: str) -> Any:
        return json.loads(await self.ip("-j", *args) or "[]")

    async def bridge_json(self, *args: str) -> Any:
        out = (await run("bridge", "-n", self.name, "-j", *args)).check()
        return json.loads(out or "[]")

    def exec_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)


async def make_netns(prefix: str = "vn-t") -> Netns:
    require_netns()
    ns = Netns(f"{prefix}-{uuid.uuid4().hex[:8]}")
    (await run("ip", "netns", "add", ns.name)).check()
    await ns.ip("link", "set", "lo", "up")
    return ns


async def remove_netns(ns: Netns) -> None:
    await run("ip", "netns", "del", ns.name)


async def veth(a: Netns, a_name: str, b: Netns, b_name: str, *, up: bool = True) -> None:
    """A veth pair with ``a_name`` in ``a`` and ``b_name`` in ``b``."""
    tmp = f"vt{uuid.uuid4().hex[:10]}"
    (await run("ip", "link", "add", tmp, "type", "veth", "peer", "name", b_name,
               "netns", b.name)).check()
    (await run("ip", "link", "set", tmp, "netns", a.name)).check()
    await a.ip("link", "set", tmp, "name", a_name)
    if up:
        await a.ip("link", "set", a_name, "up")
        await b.ip("link", "set", b_name, "up")


@contextlib.asynccontextmanager
async def namespaces(count: int) -> AsyncIterator[list[Netns]]:
    """``count`` fresh namespaces, removed on the way out whatever happened."""
    made: list[Netns] = []
    try:
        for _ in range(count):
            made.append(await make_netns())
        yield made
    finally:
        for ns in made:
            await remove_netns(ns)
