"""Fixtures shared by every test.

- Every async test runs with asyncio debug mode and fails if any callback holds the event
  loop for more than 500 ms (a blocking call on the loop).
- ``schema`` is the loaded API contract; ``checked_client`` opens clients that validate
  every result against it.
- ``require`` gives the real-thing checks: under ``CI=true`` a missing libvirtd, KVM or
  root fails the test; elsewhere it skips.
- ``pki`` makes TLS certificates with openssl (see ``tests/pki.py``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from virtnode.client import Client
from virtnode.rpc.schema import ApiSchema, load_schema

if TYPE_CHECKING:
    from tests.agentproc import AgentProcess
    from tests.pki import Pki

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Generous enough for a loaded CI machine; a real blocking call (a sleep, a libvirt
# round trip on the loop) shows up far above it.
SLOW_CALLBACK_SECONDS = 0.5


def missing(what: str) -> None:
    """A real component the test needs is absent: fail under CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"CI=true and {what}: this test must not be skipped", pytrace=False)
    pytest.skip(what)


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing"):
            self.messages.append(message)


@pytest.fixture
async def loop_guard() -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    catcher = _SlowCallbacks()
    logger = logging.getLogger("asyncio")
    logger.addHandler(catcher)
    was_debug, was_slow = loop.get_debug(), loop.slow_callback_duration
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_SECONDS
    try:
        yield
    finally:
        loop.set_debug(was_debug)
        loop.slow_callback_duration = was_slow
        logger.removeHandler(catcher)
    if catcher.messages:
        pytest.fail("the event loop was blocked:\n" + "\n".join(catcher.messages))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and inspect.iscoroutinefunction(function):
            item.fixturenames.insert(0, "loop_guard")  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def schema() -> ApiSchema:
    return load_schema()


ClientFactory = Callable[[str], Awaitable[Client]]


@pytest.fixture
async def checked_client(schema: ApiSchema) -> AsyncIterator[ClientFactory]:
    """Open clients whose every result is validated against the schema."""
    clients: list[Client] = []

    async def open_client(url: str) -> Client:
        client = await Client.connect(url, result_check=schema.check_result)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.close()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    """An agent subprocess on test:///default with a unix socket and a TCP port."""
    from tests.agentproc import start_agent

    proc = await start_agent(tmp_path)
    yield proc
    status = await proc.stop()
    assert status == 0, f"agent exited with {status}:\n{proc.log}"


@pytest.fixture
async def pki(tmp_path: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost and a client certificate
    (CN ``engine``) it signed, and an unrelated CA with a client certificate of its own."""
    from tests.pki import make_pki

    if shutil.which("openssl") is None:
        missing("the openssl command is not installed")
    return await make_pki(tmp_path / "pki")


@pytest.fixture
async def libvirtd() -> None:
    """qemu:///system must answer (KVM host with libvirtd, as root)."""
    from tests.integration import libvirtd as daemon

    if os.geteuid() != 0:
        missing("tests on qemu:///system need root")
    if not await daemon.answers():
        missing("libvirtd does not answer on qemu:///system (run tools/ensure-host)")
    if not await asyncio.to_thread(Path("/dev/kvm").exists):
        missing("/dev/kvm is absent")
