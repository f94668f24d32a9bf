"""The README's command blocks run as written, in order, against a real agent.

The agent runs on ``test:///default`` with its own unix socket and TCP port: the blocks'
``$PWD/run/virtnode.sock`` and ``127.0.0.1:8765`` are pointed at those, and a command that
follows events until Ctrl-C is given three seconds. The blocks that install or build
(``make ...``) are left to the set-up tests; every other block runs.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.agentproc import AgentProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FOLLOW = re.compile(r"^(virtnode events\b[^#]*?)\s*(#.*)?$", re.MULTILINE)


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def runnable(blocks: list[str], agent: AgentProcess) -> str:
    script = []
    for block in blocks:
        if re.search(r"^make ", block, flags=re.MULTILINE):
            continue
        pointed = (block.replace("$PWD/run/virtnode.sock", str(agent.unix_path))
                   .replace("127.0.0.1:8765", f"127.0.0.1:{agent.tcp_port}"))
        script.append(FOLLOW.sub(r"timeout 3 \1 || [ $? -eq 124 ]", pointed))
    return "set -eu\n" + "\n".join(script)


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 5
    assert any("VM.create" in block for block in blocks)


async def test_the_readme_blocks_run_as_written(agent: AgentProcess) -> None:
    script = runnable(readme_blocks(), agent)
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"a README block failed:\n{text[-4000:]}"
    # What a reader is told to expect shows up.
    assert '"stopped_by"' in text, text[-2000:]
    assert "virtnode_agent_info" in text
    assert '"status": "ok"' in text
