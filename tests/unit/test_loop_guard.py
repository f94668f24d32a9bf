"""The loop guard must catch a blocking call, or every async test proves nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKING_TEST = '''
import asyncio, time

async def test_blocks_the_loop():
    time.sleep(0.8)  # deliberate: the blocking call the guard must catch

async def test_yields_properly():
    await asyncio.sleep(0.01)  # deliberate: a wait that yields, which the guard lets pass
'''


def run_inner(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(BLOCKING_TEST)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "-c", str(ROOT / "pyproject.toml"), str(tmp_path / "test_inner.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )


def test_a_blocking_coroutine_fails_and_a_polite_one_passes(tmp_path: Path) -> None:
    inner = tmp_path / "tests_inner"
    inner.mkdir()
    result = run_inner(inner)
    assert "the event loop was blocked" in result.stdout, result.stdout + result.stderr
    # The blocking test errors at teardown; the polite one is untouched.
    assert "ERROR ::test_blocks_the_loop" in result.stdout, result.stdout
    assert "1 error" in result.stdout and "test_yields_properly" not in result.stdout


async def test_async_tests_run_in_debug_mode() -> None:
    assert asyncio.get_running_loop().get_debug()
