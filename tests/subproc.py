"""Running commands from async tests without blocking the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Completed:
    status: int
    out: str
    err: str

    def check(self) -> str:
        """Return stdout; fail with the command's output unless it exited 0."""
        assert self.status == 0, f"exit {self.status}:\n{self.out}{self.err}"
        return self.out


async def run(*argv: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
              timeout: float = 120.0) -> Completed:
    """Run a command to completion; kills it and raises TimeoutError after ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv), cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def virtnode(*args: str | Path, env: dict[str, str] | None = None,
                   cwd: Path | None = None, timeout: float = 60.0) -> Completed:
    """Run the ``virtnode`` command of the package under test."""
    return await run(sys.executable, "-m", "virtnode", *args, env=env, cwd=cwd, timeout=timeout)


@contextlib.asynccontextmanager
async def tmpfs(path: Path, options: str) -> AsyncIterator[Path]:
    """A tmpfs mounted on the existing directory ``path`` (root only), unmounted after."""
    (await run("mount", "-t", "tmpfs", "-o", options, "tmpfs", path)).check()
    try:
        yield path
    finally:
        await run("umount", "-l", path)
