"""Run the agent as a real subprocess for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests import guests

if TYPE_CHECKING:
    from tests.pki import Pki

READY_LINE = "virtnode ready"
#: Where tests keep images for the VMs of the agents they start (the ``image_dir``
#: fixture makes a directory per test in it).
IMAGE_ROOT = Path("/var/tmp/virtnode-tests")


def vm_allowed_paths() -> list[str]:
    """The host directories test agents let VMs use (``vm.allowed_paths``): test images,
    and the guest kernels, initramfs and console logs of :mod:`tests.guests`."""
    return [str(IMAGE_ROOT), str(guests.cache_root())]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _toml(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and arrays of them are valid TOML


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class AgentProcess:
    proc: asyncio.subprocess.Process
    unix_path: Path
    tcp_port: int
    log_lines: list[str] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    ready_at: float = 0.0
    #: Where the tls:// listener is, when the agent was started with one.
    tls_host: str = ""
    tls_port: int = 0
    _pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def unix_url(self) -> str:
        return f"unix:{self.unix_path}"

    @property
    def tcp_url(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.tcp_port}"

    @property
    def tls_url(self) -> str:
        """``tls://HOST:PORT``, the client's short form of ``wss://HOST:PORT/rpc``."""
        assert self.tls_port, "the agent has no tls:// listener"
        return f"tls://{_netloc(self.tls_host, self.tls_port)}"

    @property
    def https_url(self) -> str:
        assert self.tls_port, "the agent has no tls:// listener"
        return f"https://{_netloc(self.tls_host, self.tls_port)}"

    @property
    def log(self) -> str:
        return "".join(self.log_lines)

    async def _read_log(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace")
            self.log_lines.append(text)
            if READY_LINE in text and not self.ready.is_set():
                self.ready_at = time.monotonic()
                self.ready.set()

    async def wait_ready(self, timeout: float = 15.0) -> None:
        waiter = asyncio.create_task(self.ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        done, _ = await asyncio.wait({waiter, exited}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        exited.cancel()
        if waiter not in done:
            raise AssertionError(f"agent did not become ready:\n{self.log}")

    async def wait_log(self, text: str, timeout: float = 10.0) -> None:
        """Wait until the agent has logged a line containing ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if time.monotonic() > deadline:
                raise AssertionError(f"agent never logged {text!r}:\n{self.log}")
            await asyncio.sleep(0.02)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the agent and wait for it to exit; returns the exit status."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            async with asyncio.timeout(timeout):
                await self.proc.wait()
        if self._pump is not None:
            await asyncio.gather(self._pump, return_exceptions=True)
        assert self.proc.returncode is not None
        for sign in ("does not match the schema", "Traceback"):
            assert sign not in self.log, f"the agent logged {sign!r}:\n{self.log}"
        return self.proc.returncode


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_agent(tmp_path: Path, *, hypervisor: str = "test:///default",
                      sections: dict[str, dict[str, Any]] | None = None,
                      extra_args: tuple[str, ...] = (), tls: Pki | None = None,
                      tls_host: str = "127.0.0.1",
                      wrapper: Sequence[str] = ()) -> AgentProcess:
    """Start ``virtnode serve`` with a private socket, port and state dir; wait until ready.

    With ``tls``, the agent also serves ``tls://tls_host:PORT`` (``AgentProcess.tls_url``)
    with that PKI's server certificate and CA. ``wrapper`` is the command the agent runs
    under, e.g. ``("ip", "netns", "exec", NAME)`` (its loopback must be up: the agent
    also listens on 127.0.0.1).
    """
    unix_path = tmp_path / "run" / "virtnode.sock"
    port = free_port()
    tls_port = free_port() if tls is not None else 0
    listen = [f"unix:{unix_path}", f"tcp://127.0.0.1:{port}"]
    if tls is not None:
        listen.append(f"tls://{_netloc(tls_host, tls_port)}")
    config: dict[str, dict[str, Any]] = {
        "server": {
            "listen": listen,
            # Every result and event is checked against the schema by the agent itself.
            "check_results": True,
        },
        "hypervisor": {"uri": hypervisor},
        "vm": {"allowed_paths": vm_allowed_paths()},
        "state": {"dir": str(tmp_path / "state")},
        "log": {"level": "debug"},
    }
    if tls is not None:
        config["tls"] = tls.tls_section
    for name, values in (sections or {}).items():
        config.setdefault(name, {}).update(values)
    path = write_config(tmp_path / "virtnode.toml", config)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *wrapper, sys.executable, "-m", "virtnode", "serve", "--config", str(path), *extra_args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    agent = AgentProcess(proc, unix_path, port, started_at=started,
                         tls_host=tls_host if tls is not None else "", tls_port=tls_port)
    agent._pump = asyncio.create_task(agent._read_log(), name="agent-log-pump")
    await agent.wait_ready()
    return agent


@contextlib.asynccontextmanager
async def running_agent(tmp_path: Path, **kwargs: Any) -> AsyncIterator[AgentProcess]:
    agent = await start_agent(tmp_path, **kwargs)
    try:
        yield agent
    finally:
        await agent.stop()
