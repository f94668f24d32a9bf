"""The lab (tools/lab) for the tests that need several hosts: the ``hosts`` fixture
brings up a lab for a test module (``LAB_HOSTS`` hosts, two unless the module says) and
takes it down after it. Its VMs may use the test guests' files (tests/guests.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing
from tests.guests import cache_root
from tests.paths import ROOT

LAB = ROOT / "tools" / "lab"
RUN = Path("/run/virtnode-lab")
VAR = Path("/var/lib/virtnode-lab")


def lab(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(LAB), *args], capture_output=True, text=True,
                          timeout=300, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"tools/lab {' '.join(args)}: {proc.returncode}\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def on_host(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command on a lab host (its network, mount and UTS namespaces)."""
    index = name.removeprefix("lab-h")
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/vnlab-h{index}", f"--mount={RUN / name / 'mnt'}",
         f"--uts={RUN / name / 'uts'}", "--", *argv],
        capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def hosts(request: pytest.FixtureRequest) -> Iterator[list[dict[str, Any]]]:
    if os.geteuid() != 0:
        missing("the lab needs root")
    if not Path("/dev/kvm").exists():
        missing("/dev/kvm is absent")
    if RUN.exists() or VAR.exists():
        pytest.fail("a lab is up on this machine: tools/lab down first")
    try:
        cache = cache_root()
        cache.mkdir(parents=True, exist_ok=True)
        lab("up", str(getattr(request.module, "LAB_HOSTS", 2)), "--allow", str(cache))
        yield json.loads(lab("status", "--json").stdout)
    finally:
        lab("down", check=False)


