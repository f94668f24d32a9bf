"""JSON-RPC 2.0 conformance on the wire, against a real in-process :class:`ApiServer`.

The server listens on a unix socket and a loopback TCP port and serves a dispatcher over a
small test schema (``Test.*`` methods). Requests are hand-written JSON text sent over raw
WebSockets and ``POST /rpc``, so malformed input can be sent and the exact text of every
answer can be checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.wireserver import (
    MAX_INFLIGHT,
    MAX_MESSAGE,
    SECRET,
    TIMEOUT,
    Backend,
    Served,
    ServeFactory,
    assert_error,
    assert_result,
    call,
    notification,
    receive,
    receive_text,
    request,
)
from virtnode.config import AccessConfig, Role, ServerConfig
from virtnode.rpc.dispatch import Dispatcher
from virtnode.rpc.schema import ApiSchema
from virtnode.rpc.server import ApiServer
from virtnode.util.jsontypes import JsonObject


class Wire:
    """Hand-written JSON text over one transport: a WebSocket or POST /rpc."""

    def __init__(self, served: Served, kind: str) -> None:
        self.served = served
        self.kind = kind
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._probes = 0

    async def exchange(self, text: str) -> str:
        """Send ``text`` and return the reply's text."""
        if self.kind == "post":
            answer = await self.served.post(text)
            assert answer.content_type == "application/json", answer
            return answer.text
        ws = await self._socket()
        await ws.send_str(text)
        return await receive_text(ws)

    async def expect_no_reply(self, text: str, *, handled: Callable[[], bool]) -> None:
        """Send ``text``, wait until ``handled()`` holds, and check that nothing came back.

        On a WebSocket, a request sent afterwards must get the next message; over POST the
        answer is 204 with an empty body.
        """
        if self.kind == "post":
            answer = await self.served.post(text)
            assert (answer.status, answer.text) == (204, "")
            assert handled()
            return
        ws = await self._socket()
        await ws.send_str(text)
        await self.served.backend.wait_for(handled)
        self._probes += 1
        probe = f"probe-{self._probes}"
        await ws.send_str(request("Test.echo", {"value": probe}, probe))
        assert_result(await receive(ws), probe)

    async def _socket(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is None:
            self._ws = await self.served.ws()
        return self._ws


@pytest.fixture(params=["ws", "post"])
def wire(request: pytest.FixtureRequest, served: Served) -> Wire:
    return Wire(served, request.param)


class _RawNumber(str):
    """A JSON number kept as the text it was written as."""


def decode_raw(text: str) -> Any:
    """Decode JSON, keeping every number as the text the server wrote."""
    return json.loads(text, parse_int=_RawNumber, parse_float=_RawNumber)


def id_text(response: JsonObject) -> str:
    """The JSON text of a raw-decoded response's id."""
    value = response["id"]
    if isinstance(value, _RawNumber):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


# --- protocol errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "{",
        '{"jsonrpc":"2.0","method":"Test.echo","id":1',
        '{"jsonrpc":"2.0","method":"Test.echo","id":1,}',
        '{"jsonrpc":"2.0","method":"Test.echo","id":NaN}',
        '{"jsonrpc":"2.0","method":"Test.echo","params":{"value":Infinity},"id":1}',
        '{"jsonrpc":"2.0","method":"Test.echo","id":1e400}',
        "{'jsonrpc':'2.0','method':'Test.echo','id':1}",
        '[{"jsonrpc":"2.0","method":"Test.echo","id":1},{"jsonrpc":"2.0","method"]',
        "",
        "[" * 30000,
    ],
    ids=["brace", "truncated", "trailing-comma", "nan-id", "infinity-param", "huge-float-id",
         "single-quotes", "broken-batch", "empty", "nested-too-deep"],
)
async def test_parse_error_has_code_32700_and_null_id(wire: Wire, text: str) -> None:
    answer = await wire.exchange(text)
    assert_error(json.loads(answer), -32700, None, name="ParseError")


@pytest.mark.parametrize(
    ("text", "req_id"),
    [
        ('"just a string"', None),
        ("42", None),
        ("null", None),
        ('{"foo":"boo"}', None),
        ('{"method":"Test.echo","id":3}', 3),
        ('{"jsonrpc":"1.0","method":"Test.echo","id":"v1"}', "v1"),
        ('{"jsonrpc":2.0,"method":"Test.echo","id":4}', 4),
        ('{"jsonrpc":"2.0","id":5}', 5),
        ('{"jsonrpc":"2.0","method":5,"id":6}', 6),
        ('{"jsonrpc":"2.0","method":"","id":7}', 7),
        ('{"jsonrpc":"2.0","method":"Test.echo","params":"bar","id":8}', 8),
        ('{"jsonrpc":"2.0","method":"Test.echo","params":null,"id":9}', 9),
        ('{"jsonrpc":"2.0","method":"Test.echo","id":10,"extra":1}', 10),
        ('{"jsonrpc":"2.0","method":"Test.echo","id":true}', None),
        ('{"jsonrpc":"2.0","method":"Test.echo","id":{"a":1}}', None),
        ('{"jsonrpc":"2.0","method":"Test.echo","id":[1]}', None),
    ],
    ids=["string", "number", "null", "no-members", "no-version", "wrong-version",
         "numeric-version", "no-method", "numeric-method", "empty-method", "string-params",
         "null-params", "unknown-member", "bool-id", "object-id", "array-id"],
)
async def test_invalid_request_has_code_32600(wire: Wire, text: str, req_id: Any) -> None:
    answer = await wire.exchange(text)
    assert_error(json.loads(answer), -32600, req_id, name="InvalidRequest")


async def test_unknown_method_has_code_32601(wire: Wire) -> None:
    answer = await wire.exchange(request("Test.nothing", {}, "m1"))
    error = assert_error(json.loads(answer), -32601, "m1", name="MethodNotFound")
    assert "Test.nothing" in error["message"]


@pytest.mark.parametrize(
    ("method", "params", "field_path"),
    [
        ("Test.echo", {"bogus": 1}, "bogus"),
        ("Test.echo", {"value": 1, "nested": {"color": "red"}}, "nested.color"),
        ("Test.echo", {"nested": {"count": "three"}}, "nested.count"),
        ("Test.echo", {"nested": {"count": -1}}, "nested.count"),
        ("Test.echo", {"nested": {"tags": ["a", 3]}}, "nested.tags.1"),
        ("Test.echo", {"nested": []}, "nested"),
        ("Test.write", {}, "name"),
        ("Test.write", {"name": 5}, "name"),
    ],
    ids=["unknown", "nested-unknown", "wrong-type", "below-minimum", "array-item",
         "not-an-object", "missing", "required-wrong-type"],
)
async def test_invalid_params_name_the_field(served: Served, method: str, params: JsonObject,
                                             field_path: str) -> None:
    ws = await served.ws("unix")  # admin, so that Test.write gets as far as its params
    error = assert_error(await call(ws, method, params, 11), -32602, 11, name="InvalidParams")
    assert error["data"]["field"] == field_path
    if error["data"]["reason"] in ("additionalProperties", "required"):
        assert repr(field_path) in error["message"]


async def test_unknown_params_are_rejected_with_their_name_over_post(served: Served) -> None:
    answer = await served.post(request("Test.echo", {"value": 1, "colour": "red"}, 12))
    error = assert_error(answer.json(), -32602, 12, name="InvalidParams")
    assert error["data"]["field"] == "colour"
    assert "colour" in error["message"]


async def test_positional_params_are_invalid_params(wire: Wire) -> None:
    answer = await wire.exchange(request("Test.echo", [1, 2], 13))
    assert_error(json.loads(answer), -32602, 13, name="InvalidParams")


async def test_valid_params_reach_the_handler(wire: Wire) -> None:
    params = {"value": {"a": [1, 2.5, None, True, "é"]}, "nested": {"count": 0, "tags": []}}
    answer = await wire.exchange(request("Test.echo", params, 14))
    assert assert_result(json.loads(answer), 14) == params


# --- batches, notifications and ids -------------------------------------------------------


async def test_mixed_batch_answers_every_request_but_not_the_notification(wire: Wire) -> None:
    text = "[" + ",".join([
        request("Test.echo", {"value": "a"}, "a"),
        notification("Test.note", {"value": "in-batch"}),
        '{"foo":"boo"}',
        request("Test.nothing", {}, "b"),
        request("Test.echo", {"bogus": True}, "c"),
        "5",
    ]) + "]"
    answers = json.loads(await wire.exchange(text))
    assert isinstance(answers, list)
    assert len(answers) == 5
    by_id: dict[Any, list[Any]] = {}
    for answer in answers:
        by_id.setdefault(answer["id"], []).append(answer)
    assert by_id.keys() == {"a", "b", "c", None}
    assert assert_result(by_id["a"][0], "a") == {"value": "a"}
    assert_error(by_id["b"][0], -32601, "b")
    assert_error(by_id["c"][0], -32602, "c")
    assert len(by_id[None]) == 2
    for answer in by_id[None]:
        assert_error(answer, -32600, None)
    assert wire.served.backend.notes == ["in-batch"]


async def test_batch_of_non_objects_gives_one_error_each(wire: Wire) -> None:
    answers = json.loads(await wire.exchange("[1,2,3]"))
    assert isinstance(answers, list)
    assert len(answers) == 3
    for answer in answers:
        assert_error(answer, -32600, None)


async def test_empty_batch_is_one_error_object_not_an_array(wire: Wire) -> None:
    answer = json.loads(await wire.exchange("[]"))
    assert isinstance(answer, dict)
    assert_error(answer, -32600, None, name="InvalidRequest")


async def test_batch_of_only_notifications_gets_no_reply(wire: Wire) -> None:
    notes = wire.served.backend.notes
    text = "[" + ",".join(notification("Test.note", {"value": v}) for v in ("n1", "n2")) + "]"
    await wire.expect_no_reply(text, handled=lambda: sorted(notes) == ["n1", "n2"])


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (notification("Test.note", {"value": "plain"}), "plain"),
        ('{"jsonrpc":"2.0","method":"Test.note","params":{"value":"no-params"}}', "no-params"),
    ],
    ids=["notification", "literal"],
)
async def test_notification_gets_no_reply(wire: Wire, text: str, value: str) -> None:
    notes = wire.served.backend.notes
    await wire.expect_no_reply(text, handled=lambda: value in notes)


@pytest.mark.parametrize(
    "text",
    [
        notification("Test.nothing", {}),
        notification("Test.echo", {"bogus": 1}),
        notification("Test.crash"),
        notification("Test.write", {"name": "x"}),
    ],
    ids=["unknown-method", "invalid-params", "crash", "permission-denied"],
)
async def test_failing_notification_gets_no_reply_either(wire: Wire, text: str) -> None:
    # A marker notification sent after the failing one shows it has been handled.
    notes = wire.served.backend.notes
    marker = notification("Test.note", {"value": "after"})
    await wire.expect_no_reply(f"[{text},{marker}]", handled=lambda: "after" in notes)
    await wire.expect_no_reply(text, handled=lambda: True)


@pytest.mark.parametrize(
    "written",
    [
        '"a-string-id"',
        '""',
        '"été ✓ \\"quoted\\""',
        "0",
        "-7",
        "2147483648",
        "9007199254740993",
        "123456789012345678901234567890",
        "1.5",
        "-0.25",
        "null",
    ],
)
async def test_id_is_echoed_exactly(wire: Wire, written: str) -> None:
    text = f'{{"jsonrpc":"2.0","method":"Test.echo","params":{{"value":1}},"id":{written}}}'
    answer = await wire.exchange(text)
    assert id_text(decode_raw(answer)) == written
    assert json.loads(answer)["result"] == {"value": 1}
    failed = await wire.exchange(f'{{"jsonrpc":"2.0","method":"Test.nothing","id":{written}}}')
    assert id_text(decode_raw(failed)) == written
    assert json.loads(failed)["error"]["code"] == -32601


async def test_ids_in_a_batch_are_echoed_exactly(wire: Wire) -> None:
    written = ['"s"', "0", "9007199254740993", "123456789012345678901234567890", "1.5"]
    text = "[" + ",".join(
        f'{{"jsonrpc":"2.0","method":"Test.echo","params":{{"value":"{i}"}},"id":{w}}}'
        for i, w in enumerate(written)
    ) + "]"
    answers = decode_raw(await wire.exchange(text))
    assert len(answers) == len(written)
    echoed = {int(answer["result"]["value"]): id_text(answer) for answer in answers}
    assert echoed == dict(enumerate(written))


# --- concurrency and limits on one WebSocket ----------------------------------------------


async def test_fast_answer_overtakes_slow_one_on_the_same_websocket(served: Served) -> None:
    ws = await served.ws()
    await ws.send_str(request("Test.slow", {"gate": "g"}, "slow"))
    await served.backend.wait_for(lambda: "g" in served.backend.started)
    await ws.send_str(request("Test.echo", {"value": "fast"}, "fast"))
    assert assert_result(await receive(ws), "fast") == {"value": "fast"}
    served.backend.gate("g").set()
    assert assert_result(await receive(ws), "slow") == {"gate": "g"}


async def test_timed_slow_call_does_not_hold_up_a_fast_one(served: Served) -> None:
    ws = await served.ws()
    await ws.send_str(request("Test.slow", {"seconds": 0.5}, "slow"))
    await ws.send_str(request("Test.echo", {"value": "fast"}, "fast"))
    assert assert_result(await receive(ws), "fast") == {"value": "fast"}
    assert assert_result(await receive(ws), "slow") == {"gate": ""}


async def test_inflight_limit_answers_extra_requests_resource_exhausted(served: Served) -> None:
    backend = served.backend
    ws = await served.ws()
    for i in range(MAX_INFLIGHT):
        await ws.send_str(request("Test.slow", {"gate": "busy"}, i))
    await backend.wait_for(lambda: backend.started.count("busy") == MAX_INFLIGHT)

    for extra in ("x1", "x2"):
        await ws.send_str(request("Test.echo", {"value": extra}, extra))
        assert_error(await receive(ws), 8, extra, name="ResourceExhausted",
                     reason="too_many_requests")
    # The limit is per connection: another one is served meanwhile.
    other = await served.ws()
    assert assert_result(await call(other, "Test.echo", {"value": 1}, "other"), "other")

    backend.gate("busy").set()
    done = {assert_result(await receive(ws), i)["gate"] for i in range(MAX_INFLIGHT)}
    assert done == {"busy"}
    assert assert_result(await call(ws, "Test.echo", {"value": 2}, "after"), "after")


async def test_full_connection_drops_extra_notifications_silently(served: Served) -> None:
    backend = served.backend
    ws = await served.ws()
    for i in range(MAX_INFLIGHT):
        await ws.send_str(request("Test.slow", {"gate": "busy"}, i))
    await backend.wait_for(lambda: backend.started.count("busy") == MAX_INFLIGHT)
    await ws.send_str(notification("Test.note", {"value": "dropped"}))
    await ws.send_str(request("Test.echo", {}, "probe"))
    assert_error(await receive(ws), 8, "probe", reason="too_many_requests")
    backend.gate("busy").set()
    for _ in range(MAX_INFLIGHT):
        await receive(ws)
    assert backend.notes == []


# --- message size -------------------------------------------------------------------------


_HEAD, _TAIL = '{"jsonrpc":"2.0","method":"Test.echo","params":{"value":"', '"},"id":1}'


def _filler(size: int) -> str:
    """The string value that makes a Test.echo request exactly ``size`` bytes long."""
    return "x" * (size - len(_HEAD) - len(_TAIL))


def _sized_request(size: int) -> str:
    text = _HEAD + _filler(size) + _TAIL
    assert len(text.encode()) == size
    return text


async def test_websocket_message_at_the_limit_is_served(served: Served) -> None:
    ws = await served.ws()
    await ws.send_str(_sized_request(MAX_MESSAGE))
    result = assert_result(await receive(ws), 1)
    assert result["value"] == _filler(MAX_MESSAGE)


async def test_websocket_message_too_large_closes_with_1009(served: Served) -> None:
    ws = await served.ws()
    await ws.send_str(_sized_request(MAX_MESSAGE + 1))
    msg = await ws.receive(timeout=TIMEOUT)
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg
    assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG == 1009
    # The server goes on serving everybody else.
    fresh = await served.ws()
    assert assert_result(await call(fresh, "Test.echo", {"value": 1}), 1) == {"value": 1}


async def test_post_too_large_is_413_with_a_json_rpc_error(served: Served) -> None:
    answer = await served.post(_sized_request(MAX_MESSAGE + 1))
    assert answer.status == 413
    assert answer.content_type == "application/json"
    assert_error(answer.json(), -32600, None, name="InvalidRequest", reason="message_too_large")
    ok = await served.post(_sized_request(MAX_MESSAGE))
    assert ok.status == 200
    assert assert_result(ok.json(), 1)["value"] == _filler(MAX_MESSAGE)


# --- internal errors ----------------------------------------------------------------------


def _assert_no_leak(text: str) -> None:
    for leak in ("Traceback", "RuntimeError", 'File "', ".py", SECRET, "secret-detail"):
        assert leak not in text, f"{leak!r} leaked to the client: {text}"


async def test_crash_is_internal_error_without_traceback(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    ws = await served.ws()
    await ws.send_str(request("Test.crash", None, "boom"))
    text = await receive_text(ws)
    _assert_no_leak(text)
    error = assert_error(json.loads(text), -32603, "boom", name="InternalError")
    incident = error["data"]["incident"]
    assert str(uuid.UUID(incident)) == incident
    # The operator finds the traceback in the log under the same incident id.
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert SECRET in str(logged[0].exc_info[1])

    assert assert_result(await call(ws, "Test.echo", {"value": "same"}, 2), 2)
    fresh = await served.ws()
    assert assert_result(await call(fresh, "Test.echo", {"value": "new"}, 3), 3)


async def test_crash_over_post_and_in_a_batch(served: Served) -> None:
    answer = await served.post(request("Test.crash", None, 1))
    _assert_no_leak(answer.text)
    assert answer.status == 200
    assert_error(answer.json(), -32603, 1, name="InternalError")
    batch = await served.post(f"[{request('Test.crash', None, 1)},{request('Test.echo', {}, 2)}]")
    _assert_no_leak(batch.text)
    answers = {a["id"]: a for a in batch.json()}
    assert_error(answers[1], -32603, 1)
    assert assert_result(answers[2], 2) == {}


async def test_unencodable_result_is_internal_error(wire: Wire) -> None:
    answer = await wire.exchange(request("Test.unencodable", None, "u"))
    _assert_no_leak(answer)
    assert_error(json.loads(answer), -32603, "u", name="InternalError")
    answer = await wire.exchange(
        f"[{request('Test.unencodable', None, 1)},{request('Test.echo', {}, 2)}]"
    )
    answers = {a["id"]: a for a in json.loads(answer)}
    assert_error(answers[1], -32603, 1)
    assert assert_result(answers[2], 2) == {}
    assert assert_result(json.loads(await wire.exchange(request("Test.echo", {}, 3))), 3) == {}


# --- access -------------------------------------------------------------------------------


async def _whoami_and_write(served: Served, via: str, transport: str) -> tuple[JsonObject, Any]:
    """Call Test.whoami and Test.write, over a WebSocket or POST on ``via``."""
    if transport == "ws":
        ws = await served.ws(via)
        who = assert_result(await call(ws, "Test.whoami", None, 1), 1)
        return who, await call(ws, "Test.write", {"name": "n"}, 2)
    who = assert_result((await served.post(request("Test.whoami", None, 1), via)).json(), 1)
    return who, (await served.post(request("Test.write", {"name": "n"}, 2), via)).json()


@pytest.mark.parametrize("transport", ["ws", "post"])
async def test_unix_root_is_admin_when_listed(serve: ServeFactory, transport: str) -> None:
    served = await serve(AccessConfig(unix_admin_uids=(0,), tcp_role=Role.READER))
    who, written = await _whoami_and_write(served, "unix", transport)
    assert who == {"identity": f"uid:{os.getuid()}", "role": "admin", "transport": "unix"}
    assert assert_result(written, 2) == {"written": "n"}


@pytest.mark.parametrize("transport", ["ws", "post"])
async def test_unix_root_is_reader_when_not_listed(serve: ServeFactory, transport: str) -> None:
    served = await serve(AccessConfig(unix_admin_uids=(), tcp_role=Role.ADMIN))
    who, written = await _whoami_and_write(served, "unix", transport)
    assert who["role"] == "reader"
    error = assert_error(written, 7, 2, name="PermissionDenied")
    assert "Test.write" in error["message"]


@pytest.mark.parametrize("transport", ["ws", "post"])
@pytest.mark.parametrize("role", [Role.READER, Role.ADMIN])
async def test_tcp_role_comes_from_the_config(serve: ServeFactory, role: Role,
                                              transport: str) -> None:
    # The unix side is the opposite, so a mix-up between the two would show.
    served = await serve(AccessConfig(
        unix_admin_uids=(0,) if role is Role.READER else (), tcp_role=role
    ))
    who, written = await _whoami_and_write(served, "tcp", transport)
    assert who["role"] == role.value
    assert who["transport"] == "tcp"
    assert who["identity"].startswith("tcp:127.0.0.1:")
    if role is Role.ADMIN:
        assert assert_result(written, 2) == {"written": "n"}
    else:
        assert_error(written, 7, 2, name="PermissionDenied")
    unix_who, _ = await _whoami_and_write(served, "unix", transport)
    assert unix_who["role"] == ("admin" if role is Role.READER else "reader")


async def test_reader_may_call_read_methods(served: Served) -> None:
    ws = await served.ws("tcp")
    assert assert_result(await call(ws, "Test.echo", {"value": 1}), 1) == {"value": 1}


async def test_permission_is_checked_before_params(served: Served) -> None:
    ws = await served.ws("tcp")
    assert_error(await call(ws, "Test.write", {"bogus": 1}), 7, 1, name="PermissionDenied")


# --- plain HTTP ---------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["tcp", "unix"])
async def test_get_rpc_without_upgrade_is_400_with_json_rpc_error(served: Served,
                                                                  via: str) -> None:
    answer = await served.get("/rpc", via)
    assert answer.status == 400
    assert answer.content_type == "application/json"
    assert_error(answer.json(), -32600, None, name="InvalidRequest")


@pytest.mark.parametrize("via", ["tcp", "unix"])
async def test_healthz_returns_the_health_json(served: Served, via: str) -> None:
    answer = await served.get("/healthz", via)
    assert answer.status == 200
    assert answer.content_type == "application/json"
    assert answer.json() == served.health
    served.health["status"] = "degraded"
    served.health["hypervisor"]["state"] = "disconnected"
    degraded = await served.get("/healthz", via)
    assert degraded.status == 503
    assert degraded.json()["hypervisor"]["state"] == "disconnected"


async def test_post_over_unix_socket(served: Served) -> None:
    answer = await served.post(request("Test.echo", {"value": "u"}, 1), "unix")
    assert answer.status == 200
    assert assert_result(answer.json(), 1) == {"value": "u"}


# --- stopping -----------------------------------------------------------------------------


async def test_stop_accepting_refuses_new_connections_but_serves_open_ones(
    served: Served,
) -> None:
    open_tcp = await served.ws("tcp")
    open_unix = await served.ws("unix")
    await served.server.stop_accepting()
    for via in ("tcp", "unix"):
        with pytest.raises(aiohttp.ClientConnectionError):
            await served.ws(via)
        with pytest.raises(aiohttp.ClientConnectionError):
            await served.post(request("Test.echo", {}), via)
    for n, ws in enumerate((open_tcp, open_unix)):
        assert assert_result(await call(ws, "Test.echo", {"value": n}, n), n) == {"value": n}


async def test_refuse_new_answers_unavailable_and_running_calls_finish(served: Served) -> None:
    backend = served.backend
    ws = await served.ws("unix")
    await ws.send_str(request("Test.slow", {"gate": "g"}, "running"))
    await backend.wait_for(lambda: "g" in backend.started)

    await served.server.stop_accepting()
    served.dispatcher.refuse_new()
    for method, params in (("Test.echo", {}), ("Test.nothing", None), ("Test.write", {})):
        assert_error(await call(ws, method, params, "late"), 14, "late", name="Unavailable",
                     reason="shutting_down")
    answers = json.loads(await _send_and_receive(ws, f"[{request('Test.echo', {}, 'b1')}]"))
    assert_error(answers[0], 14, "b1", reason="shutting_down")
    # A notification is dropped too: the request behind it is answered next.
    await ws.send_str(notification("Test.note", {"value": "late"}))
    assert_error(await call(ws, "Test.echo", {}, "probe"), 14, "probe")

    assert not await served.dispatcher.drain(0)
    backend.gate("g").set()
    assert assert_result(await receive(ws), "running") == {"gate": "g"}
    assert await served.dispatcher.drain(TIMEOUT)
    assert backend.notes == []

    await served.server.close_sessions()
    msg = await ws.receive(timeout=TIMEOUT)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
    await served.server.close()
    assert not served.unix_path.exists()


async def test_close_sessions_cancels_running_calls(served: Served) -> None:
    ws = await served.ws("tcp")
    await ws.send_str(request("Test.slow", {"gate": "never"}, 1))
    await served.backend.wait_for(lambda: "never" in served.backend.started)
    await served.server.stop_accepting()
    async with asyncio.timeout(TIMEOUT):
        await served.server.close_sessions()
    msg = await ws.receive(timeout=TIMEOUT)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
    assert served.dispatcher.inflight == 0


async def _send_and_receive(ws: aiohttp.ClientWebSocketResponse, text: str) -> str:
    await ws.send_str(text)
    return await receive_text(ws)


# --- unix socket path ---------------------------------------------------------------------


async def test_stale_socket_file_is_replaced(serve: ServeFactory, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # closed without unlinking, as after a crash
    assert stat.S_ISSOCK(path.lstat().st_mode)
    served = await serve(unix_path=path)
    ws = await served.ws("unix")
    assert assert_result(await call(ws, "Test.echo", {"value": 1}), 1) == {"value": 1}


async def test_socket_path_in_use_by_another_server_fails(
    served: Served, wire_schema: ApiSchema
) -> None:
    config = ServerConfig(listen=(f"unix:{served.unix_path}",), max_message_size=MAX_MESSAGE)
    intruder = ApiServer(config, AccessConfig(), Dispatcher(wire_schema, Backend().handlers()),
                         dict)
    with pytest.raises(OSError):
        await intruder.start()
    await intruder.close()
    # The first server's socket is untouched and still answers.
    assert stat.S_ISSOCK(served.unix_path.lstat().st_mode)
    ws = await served.ws("unix")
    assert assert_result(await call(ws, "Test.echo", {"value": 1}), 1) == {"value": 1}


async def test_socket_path_that_is_not_a_socket_fails(serve: ServeFactory,
                                                      tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("keep me\n")
    with pytest.raises(OSError):
        await serve(unix_path=path)
    assert path.read_text() == "keep me\n"


async def test_socket_directory_mode_and_removal(serve: ServeFactory, tmp_path: Path) -> None:
    path = tmp_path / "run" / "virtnode" / "api.sock"
    served = await serve(unix_path=path, unix_socket_mode=0o660)
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o660
    ws = await served.ws("unix")
    assert assert_result(await call(ws, "Test.echo", {}), 1) == {}
    await ws.close()
    await served.server.stop_accepting()
    await served.server.close_sessions()
    await served.server.close()
    assert not path.exists()
    assert path.parent.is_dir()
    await served.server.close()  # idempotent
