"""The README's set-up: `make run`'s development configuration and a second `make` that
installs nothing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.agentproc import free_port
from tests.integration import libvirtd as daemon
from tests.subproc import run, virtnode

ROOT = Path(__file__).resolve().parents[2]
DEV_CONFIG = ROOT / "packaging" / "dev.toml"

pytestmark = pytest.mark.integration


async def test_second_setup_installs_nothing() -> None:
    if shutil.which("make") is None:
        pytest.fail("make is missing")
    # make -q: exit 0 only when the virtual environment is up to date.
    make = await run("make", "-q", "venv", cwd=ROOT)
    assert make.status == 0, f"make would rebuild .venv:\n{make.out}{make.err}"
    # The host was set up by this very `make test`; libvirtd must answer before the second
    # run, or "libvirtd is up" below would only say that an earlier test left it slow.
    if not await daemon.answers():
        pytest.fail("libvirtd does not answer on qemu:///system before the second set-up")
    host = await run(ROOT / "tools" / "ensure-host", cwd=ROOT)
    host.check()
    assert "installing" not in host.err and "libvirtd is up" not in host.err, host.err


async def test_dev_config_is_what_the_readme_says() -> None:
    out = (await virtnode("serve", "--config", DEV_CONFIG, "--print-config")).check()
    assert 'listen = ["unix:run/virtnode.sock", "tcp://127.0.0.1:8765"]' in out
    assert 'uri = "qemu:///system"' in out
    assert 'dir = "var"' in out
    assert 'tcp_role = "admin"' in out


@pytest.mark.usefixtures("libvirtd")
async def test_readme_first_session(tmp_path: Path) -> None:
    """`make run`'s config, served from a scratch checkout dir, answers the README's calls."""
    port = free_port()  # 8765 may be taken by a developer's own `make run`
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "virtnode", "serve", "--config", str(DEV_CONFIG),
        "--listen", "unix:run/virtnode.sock", "--listen", f"tcp://127.0.0.1:{port}",
        cwd=tmp_path, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(15):
            while b"virtnode ready" not in await proc.stderr.readline():
                pass
        assert (tmp_path / "var" / "host-id").exists()
        env = {**os.environ, "VIRTNODE_URL": f"unix:{tmp_path}/run/virtnode.sock"}
        caps = (await virtnode("call", "Host.getCapabilities", env=env)).check()
        assert json.loads(caps)["hypervisor"]["uri"] == "qemu:///system"
        vms = (await virtnode("call", "VM.list", env=env)).check()
        assert "vms" in json.loads(vms)
    finally:
        proc.terminate()
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
