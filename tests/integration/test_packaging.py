"""A built wheel installs and runs on its own, not only the editable install."""

from __future__ import annotations

import asyncio
import shutil
import site
import sys
from pathlib import Path

import pytest

from tests.subproc import run

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


async def run_ok(*argv: str | Path) -> str:
    return (await run(*argv, timeout=300)).check()


def copy_tree(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                    "__pycache__", ".*_cache", "run", "var")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


async def test_wheel_imports_and_runs(tmp_path: Path) -> None:
    source = await asyncio.to_thread(copy_tree, tmp_path / "src")
    wheels = tmp_path / "wheels"
    await run_ok(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
              "-q", "-w", wheels, source)
    (wheel,) = wheels.glob("virtnode-*.whl")

    venv = tmp_path / "venv"
    await run_ok(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    target = Path((await run_ok(python, "-c", purelib)).strip())
    await run_ok(sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                 "--target", target, wheel)
    # Dependencies come from the test environment's site-packages, added as a plain path
    # so that its editable-install hook for virtnode is not loaded.
    deps = [p for p in site.getsitepackages() if "site-packages" in p]
    (target / "deps.pth").write_text("\n".join(deps) + "\n")

    where = await run_ok(python, "-c", "import virtnode, virtnode.storage, virtnode.network, "
                      "virtnode.api_schema; print(virtnode.__file__)")
    assert where.strip().startswith(str(target)), where
    listing = await run_ok(python, "-m", "virtnode", "methods", "--local")
    assert "Host.ping" in listing and "VM.list" in listing
    config = await run_ok(python, "-m", "virtnode", "serve", "--print-config")
    assert 'uri = "test:///default"' in config
