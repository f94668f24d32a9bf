"""The loop guard itself must catch a blocking call, or every other test proves nothing."""

import asyncio

import pytest

from tests.conftest import SLOW_CALLBACK_SECONDS


async def test_sleeping_in_a_coroutine_is_caught(request: pytest.FixtureRequest) -> None:
    loop = asyncio.get_running_loop()
    assert loop.get_debug()
    assert loop.slow_callback_duration == SLOW_CALLBACK_SECONDS
    guard_fixturedef = request._fixturemanager.getfixturedefs("loop_guard", request.node)
    assert guard_fixturedef, "async tests must use the loop guard"
