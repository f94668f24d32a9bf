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
import http.client
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings

from tests.agentproc import AgentProcess
from tests.conftest import missing
from tests.fuzzing import Sent, messages, problems
from tests.rawws import CLOSE, BlockingWebSocket
from virtnode.schema import ApiSchema

pytestmark = [
    pytest.mark.integration,
    # hypothesis warns when it renders a long message in a failure report; that is the point.
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning"),
]

EXAMPLES = int(os.environ.get("VIRTNODE_FUZZ_EXAMPLES", "250"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def post(port: int, data: bytes) -> bytes | None:
    """POST ``data`` to /rpc; the answer's body, or None for 204."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/rpc", body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status == 204:
        return None
    assert response.status in (200, 413), (response.status, body[:300])
    return body


class Exchange:
    """Sends a message on a WebSocket and collects its answer, using a probe request after
    it to know when everything it had coming has come. After a failed exchange the next
    one starts on a new connection, so that one failure is reported once."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._ws: BlockingWebSocket | None = None
        self.count = 0

    def __call__(self, data: bytes, must_answer: bool) -> bytes | None:
        if self._ws is None:
            self._ws = BlockingWebSocket.unix(self._path)
        try:
            return self._exchange(self._ws, data, must_answer)
        except BaseException:
            self.close()
            raise

    def _exchange(self, ws: BlockingWebSocket, data: bytes, must_answer: bool) -> bytes | None:
        self.count += 1
        probe = f"probe-{self.count}"
        ws.send(data)
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "Host.ping", "id": probe}).encode())
        answer = None
        probed = False
        # Answers on a WebSocket go out as they are ready: a slow message's may follow the
        # probe's. Wait for it when one is owed.
        while not probed or (answer is None and must_answer):
            opcode, payload = ws.receive()
            assert opcode != CLOSE, f"the agent closed the WebSocket: {payload!r}"
            decoded = json.loads(payload)
            if isinstance(decoded, dict) and "method" in decoded:
                continue  # a pushed event: the fuzz subscribed to something
            if isinstance(decoded, dict) and decoded.get("id") == probe:
                probed = True
                continue
            assert answer is None, f"two answers to one message: {answer!r:.200}"
            answer = payload
        return answer

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None


def check(sent: Sent, answer: bytes | None) -> None:
    found = problems(sent, answer)
    assert not found, f"{sent.data[:500]!r}\n-> {answer!r:.500}\n" + "\n".join(found)


async def test_fuzzed_requests_as_a_reader_over_post(agent: AgentProcess,
                                                     schema: ApiSchema) -> None:
    @FUZZ
    @given(messages(schema, reader=True))
    def fuzz(sent: Sent) -> None:
        check(sent, post(agent.tcp_port, sent.data))

    await asyncio.to_thread(fuzz)
    assert json.loads(post(agent.tcp_port, b'{"jsonrpc":"2.0","method":"Host.ping","id":1}')
                      or b"{}")["result"] is not None


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
