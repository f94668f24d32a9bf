"""Property-based fuzzing of a real agent process with requests made from api_schema.

Every message :mod:`tests.fuzzing` draws goes to an agent on ``test:///default``: as a
reader over ``POST /rpc`` (every method; writes must be refused) and as an admin over a
WebSocket on the unix socket (every method but those that change the host's networks or
make storage domains where the caller says). Whatever is sent, the agent must answer what
needs an answer, never with an internal error, never with an id it was not sent, and keep
serving; at the end it must stop cleanly with no traceback and no result or event that
does not match the schema in its log. A bounded number of examples runs here;
``bench/fuzz.py`` runs many more and measures memory, descriptors and latency meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings

from tests.agentproc import AgentProcess
from tests.conftest import missing
from tests.fuzzing import Exchange, Sent, messages, post, problems
from virtnode.rpc.schema import ApiSchema

pytestmark = [
    pytest.mark.integration,
    # hypothesis warns when it renders a long message in a failure report; that is the point.
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning"),
]

EXAMPLES = int(os.environ.get("VIRTNODE_FUZZ_EXAMPLES", "250"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(sent: Sent, answer: bytes | None, status: int = 200) -> None:
    found = problems(sent, answer, status)
    assert not found, f"{sent.data[:500]!r}\n-> {answer!r:.500}\n" + "\n".join(found)


async def test_fuzzed_requests_as_a_reader_over_post(agent: AgentProcess,
                                                     schema: ApiSchema) -> None:
    @FUZZ
    @given(messages(schema, reader=True))
    def fuzz(sent: Sent) -> None:
        status, answer = post(agent.tcp_port, sent.data)
        check(sent, answer, status)

    await asyncio.to_thread(fuzz)
    status, answer = post(agent.tcp_port, b'{"jsonrpc":"2.0","method":"Host.ping","id":1}')
    assert status == 200 and json.loads(answer or b"{}")["result"] is not None


async def test_fuzzed_requests_as_an_admin_over_a_websocket(agent: AgentProcess,
                                                            schema: ApiSchema) -> None:
    if os.geteuid() != 0:
        missing("not root: the unix socket gives the admin role to root only")
    exchange = Exchange(str(agent.unix_path))

    @FUZZ
    @given(messages(schema, reader=False))
    def fuzz(sent: Sent) -> None:
        check(sent, exchange(sent.data, sent.must_answer))

    try:
        await asyncio.to_thread(fuzz)
    finally:
        exchange.close()
