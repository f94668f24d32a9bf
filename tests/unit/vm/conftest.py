"""The in-process agent on the test driver (see ``harness.py``) for the ``VM.*`` tests.

A test marked ``@pytest.mark.covers("VM.x", ...)`` counts as a test of those methods
(``test_coverage.py`` wants one for every ``VM.*`` method of the schema), and fails
unless it called each of them through the dispatcher.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.unit.vm.harness import InProcessAgent
from virtnode.rpc.schema import ApiSchema

AgentFactory = Callable[..., Awaitable[InProcessAgent]]
_PASSED = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "covers(*methods): the API methods a test exercises through the dispatcher")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.when == "call":
        item.stash[_PASSED] = report.passed
    return report


@pytest.fixture
async def start_agent(tmp_path: Path, schema: ApiSchema,
                      request: pytest.FixtureRequest) -> AsyncIterator[AgentFactory]:
    """Start in-process agents: ``await start_agent(config={...}, connect=True)``."""
    agents: list[InProcessAgent] = []

    async def start(config: Mapping[str, Mapping[str, Any]] | None = None, *,
                    connect: bool = True) -> InProcessAgent:
        where = tmp_path / f"agent{len(agents)}"
        where.mkdir()
        agent = InProcessAgent(where, schema, config or {})
        agents.append(agent)
        await agent.start(connect=connect)
        return agent

    yield start
    for agent in reversed(agents):
        await agent.stop()
    if not request.node.stash.get(_PASSED, False):
        return  # a failed test has said what is wrong
    claimed = {m for mark in request.node.iter_markers("covers") for m in mark.args}
    called = set().union(*(agent.called for agent in agents))
    if claimed - called:
        pytest.fail(f"marked as covering {', '.join(sorted(claimed - called))} but never "
                    "called it", pytrace=False)


@pytest.fixture
async def api(start_agent: AgentFactory) -> InProcessAgent:
    """An agent on a fresh test driver host with its default configuration."""
    return await start_agent()
