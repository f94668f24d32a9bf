"""The dispatcher: routing, validation at the edge, access, error mapping, limits, shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from importlib import resources
from typing import Any

import pytest

from tests.fakes.session import FakeSession
from virtnode.config import Role
from virtnode.errors import NotFound
from virtnode.rpc import dispatch as rpc
from virtnode.rpc.bindings import combine
from virtnode.rpc.dispatch import CallContext, Dispatcher, Handler
from virtnode.rpc.identity import Caller
from virtnode.rpc.schema import ApiSchema, SchemaError, build_schema
from virtnode.util.jsontypes import JsonObject

TEST_YAML = """
methods:
  Test.echo:
    description: Return the params as given, with defaults filled in.
    access: read
    since: "0.1"
    params:
      required: [name]
      properties:
        name: {type: string, minLength: 1}
        count: {type: integer, minimum: 0, default: 1}
        options:
          type: object
          additionalProperties: false
          required: [mode]
          properties:
            mode: {type: string, enum: [fast, slow]}
            depth: {type: integer}
        tags: {type: array, items: {type: string}}
    result:
      required: [name, count]
      properties:
        name: {type: string}
        count: {type: integer}
  Test.set:
    description: A write method.
    access: write
    since: "0.1"
    params:
      properties:
        value: {type: integer}
    result:
      required: [value]
      properties:
        value: {type: [integer, "null"]}
  Test.lookup:
    description: Always raises NotFound.
    access: read
    since: "0.1"
    params:
      required: [vm_id]
      properties:
        vm_id: {$ref: "#/definitions/Uuid"}
    errors: [NotFound]
    result: {}
  Test.crash:
    description: Fails with a bug.
    access: read
    since: "0.1"
    params: {}
    result: {}
  Test.wait:
    description: Waits until the test releases it.
    access: read
    since: "0.1"
    params: {}
    result:
      required: [waited]
      properties:
        waited: {type: boolean}
  Test.unsendable:
    description: Returns a result that is not JSON.
    access: read
    since: "0.1"
    params: {}
    result: {}
  Test.lonely:
    description: Returns a string with a lone surrogate, which has no UTF-8 form.
    access: read
    since: "0.1"
    params: {}
    result: {}
  Test.whoami:
    description: Says what the handler was told about the call.
    access: read
    since: "0.1"
    params: {}
    result:
      required: [identity, role, method]
"""

SECRET = "secret-detail-from-/etc/shadow"


def _common_yaml() -> str:
    return resources.files("virtnode.api_schema").joinpath("common.yaml").read_text("utf-8")


@pytest.fixture(scope="module")
def test_schema() -> ApiSchema:
    return build_schema([("common.yaml", _common_yaml()), ("test.yaml", TEST_YAML)])


class FakeService:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.waiting = 0
        self.expected_waiters = 1
        self.contexts: list[CallContext] = []

    async def echo(self, ctx: CallContext, params: JsonObject) -> JsonObject:
        self.calls.append("echo")
        return dict(params)

    async def set(self, ctx: CallContext, params: JsonObject) -> JsonObject:
        self.calls.append("set")
        return {"value": params.get("value")}

    async def lookup(self, ctx: CallContext, params: JsonObject) -> JsonObject:
        self.calls.append("lookup")
        raise NotFound(f"no VM {params['vm_id']}", reason="no_vm", object="vm",
                       id=params["vm_id"])

    async def crash(self, ctx: CallContext, params: JsonObject) -> JsonObject:
        self.calls.append("crash")
        raise RuntimeError(SECRET)

    async def wait(self, ctx: CallContext, params: JsonObject) -> JsonObject:
        self.calls.append("wait")
        self.waiting += 1
        if self.waiting >= self.expected_waiters:
            self.started.set()
        await self.release.wait()
        return {"waited": True}

    async def unsendable(self, ctx: CallContext, params: JsonObject) -> JsonObject:
        return {"ratio": float("nan"), "when": object()}

    async def lonely(self, ctx: CallContext, params: JsonObject) -> JsonObject:
        return {"description": "stored before it was refused \udfff"}

    async def whoami(self, ctx: CallContext, params: JsonObject) -> JsonObject:
        self.contexts.append(ctx)
        return {"identity": ctx.caller.identity, "role": ctx.caller.role.value,
                "method": ctx.method}

    def handlers(self) -> dict[str, Handler]:
        return {
            "Test.echo": self.echo, "Test.set": self.set, "Test.lookup": self.lookup,
            "Test.crash": self.crash, "Test.wait": self.wait, "Test.unsendable": self.unsendable,
            "Test.lonely": self.lonely, "Test.whoami": self.whoami,
        }


READER = Caller("uid:1000", Role.READER, "unix")
ADMIN = Caller("uid:0", Role.ADMIN, "unix")


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def dispatcher(test_schema: ApiSchema, service: FakeService) -> Dispatcher:
    return Dispatcher(test_schema, service.handlers())


@pytest.fixture
def reader() -> FakeSession:
    return FakeSession(READER)


@pytest.fixture
def admin() -> FakeSession:
    return FakeSession(ADMIN)


def request(
    method: str, params: Any = None, req_id: Any = 1, *, notify: bool = False
) -> JsonObject:
    message: JsonObject = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    if not notify:
        message["id"] = req_id
    return message


async def call(dispatcher: Dispatcher, session: FakeSession, message: Any) -> Any:
    raw = message if isinstance(message, str) else json.dumps(message)
    answer = await dispatcher.handle(raw, session)
    return None if answer is None else json.loads(answer)


def result_of(response: JsonObject, schema: ApiSchema, method: str) -> JsonObject:
    assert "error" not in response, response
    schema.check_result(method, response["result"])
    result: JsonObject = response["result"]
    return result


def error_of(response: JsonObject, code: int) -> JsonObject:
    assert "result" not in response, response
    assert response["jsonrpc"] == "2.0"
    error: JsonObject = response["error"]
    assert error["code"] == code, error
    return error


# -- plain calls ----------------------------------------------------------------------------


async def test_call_returns_the_result_with_the_request_id(
    dispatcher: Dispatcher, reader: FakeSession, test_schema: ApiSchema
) -> None:
    response = await call(dispatcher, reader, request("Test.echo", {"name": "a", "count": 3}, "x"))
    assert response["id"] == "x"
    assert result_of(response, test_schema, "Test.echo") == {"name": "a", "count": 3}
    assert reader.inflight == 0
    assert dispatcher.inflight == 0


async def test_defaults_are_filled_in(
    dispatcher: Dispatcher, reader: FakeSession, test_schema: ApiSchema
) -> None:
    response = await call(dispatcher, reader, request("Test.echo", {"name": "a"}))
    assert result_of(response, test_schema, "Test.echo") == {"name": "a", "count": 1}


async def test_absent_params_count_as_an_empty_object(
    dispatcher: Dispatcher, reader: FakeSession, test_schema: ApiSchema
) -> None:
    response = await call(dispatcher, reader, request("Test.whoami"))
    assert result_of(response, test_schema, "Test.whoami")["identity"] == "uid:1000"


async def test_handler_is_told_who_calls_on_which_session(
    dispatcher: Dispatcher, admin: FakeSession, service: FakeService, test_schema: ApiSchema
) -> None:
    response = await call(dispatcher, admin, request("Test.whoami", {}))
    assert result_of(response, test_schema, "Test.whoami") == {
        "identity": "uid:0", "role": "admin", "method": "Test.whoami",
    }
    (ctx,) = service.contexts
    assert ctx.session is admin
    assert ctx.caller is ADMIN


async def test_notification_is_run_but_not_answered(
    dispatcher: Dispatcher, reader: FakeSession, service: FakeService
) -> None:
    assert await dispatcher.handle(json.dumps(request("Test.echo", {"name": "a"}, notify=True)),
                                   reader) is None
    assert service.calls == ["echo"]


async def test_request_with_null_id_is_answered(
    dispatcher: Dispatcher, reader: FakeSession
) -> None:
    response = await call(dispatcher, reader, request("Test.echo", {"name": "a"}, None))
    assert response["id"] is None
    assert response["result"]["name"] == "a"


# -- protocol errors ------------------------------------------------------------------------


async def test_parse_error(dispatcher: Dispatcher, reader: FakeSession) -> None:
    response = await call(dispatcher, reader, '{"jsonrpc": "2.0", "method": ')
    error_of(response, -32700)
    assert response["id"] is None


async def test_empty_batch_gets_one_error_not_a_list(
    dispatcher: Dispatcher, reader: FakeSession
) -> None:
    response = await call(dispatcher, reader, "[]")
    assert isinstance(response, dict)
    error_of(response, -32600)
    assert response["id"] is None


async def test_invalid_request_keeps_a_valid_id(
    dispatcher: Dispatcher, reader: FakeSession
) -> None:
    message = {"jsonrpc": "2.0", "method": "Test.echo", "id": 4, "bogus": True}
    response = await call(dispatcher, reader, message)
    assert error_of(response, -32600)["data"]["reason"] == "unknown_member"
    assert response["id"] == 4


async def test_unknown_method(dispatcher: Dispatcher, reader: FakeSession) -> None:
    response = await call(dispatcher, reader, request("Test.nope", {}, 5))
    error = error_of(response, -32601)
    assert error["data"]["name"] == "MethodNotFound"
    assert error["data"]["method"] == "Test.nope"
    assert response["id"] == 5


async def test_unknown_method_notification_is_silent(
    dispatcher: Dispatcher, reader: FakeSession
) -> None:
    assert await call(dispatcher, reader, request("Test.nope", notify=True)) is None


@pytest.mark.parametrize(
    ("params", "field", "reason"),
    [
        ({}, "name", "required"),
        ({"name": 1}, "name", "type"),
        ({"name": ""}, "name", "minLength"),
        ({"name": "a", "count": -1}, "count", "minimum"),
        ({"name": "a", "count": "1"}, "count", "type"),
        ({"name": "a", "bogus": 1}, "bogus", "additionalProperties"),
        ({"name": "a", "options": {}}, "options.mode", "required"),
        ({"name": "a", "options": {"mode": "warp"}}, "options.mode", "enum"),
        ({"name": "a", "options": {"mode": "fast", "depth": 1.5}}, "options.depth", "type"),
        ({"name": "a", "options": {"mode": "fast", "colour": "red"}}, "options.colour",
         "additionalProperties"),
        ({"name": "a", "options": "fast"}, "options", "type"),
        ({"name": "a", "tags": ["x", 2]}, "tags.1", "type"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
async def test_invalid_params_name_the_field(
    *, dispatcher: Dispatcher, reader: FakeSession, service: FakeService,
    params: JsonObject, field: str, reason: str,
) -> None:
    response = await call(dispatcher, reader, request("Test.echo", params))
    error = error_of(response, -32602)
    assert error["data"]["name"] == "InvalidParams"
    assert error["data"]["field"] == field
    assert error["data"]["reason"] == reason
    assert service.calls == [], "the handler must not run on invalid params"


async def test_unknown_and_missing_params_say_so(
    dispatcher: Dispatcher, reader: FakeSession
) -> None:
    unknown = await call(dispatcher, reader, request("Test.echo", {"name": "a", "nmae": "b"}))
    assert error_of(unknown, -32602)["message"] == "unknown parameter 'nmae'"
    missing = await call(dispatcher, reader, request("Test.echo", {"count": 2}))
    assert error_of(missing, -32602)["message"] == "missing parameter 'name'"


async def test_shared_definitions_are_checked(dispatcher: Dispatcher, reader: FakeSession) -> None:
    response = await call(dispatcher, reader, request("Test.lookup", {"vm_id": "not-a-uuid"}))
    assert error_of(response, -32602)["data"]["field"] == "vm_id"


@pytest.mark.parametrize("params", [["a"], []])
async def test_positional_params_are_rejected(
    dispatcher: Dispatcher, reader: FakeSession, service: FakeService, params: list[Any]
) -> None:
    response = await call(dispatcher, reader, request("Test.echo", params))
    assert error_of(response, -32602)["data"]["reason"] == "positional_params"
    assert service.calls == []


# -- access ---------------------------------------------------------------------------------


async def test_reader_may_not_call_a_write_method(
    dispatcher: Dispatcher, reader: FakeSession, service: FakeService
) -> None:
    response = await call(dispatcher, reader, request("Test.set", {"value": 1}))
    error = error_of(response, 7)
    assert error["data"]["name"] == "PermissionDenied"
    assert error["data"]["method"] == "Test.set"
    assert "uid:1000" in error["message"]
    assert service.calls == []


async def test_admin_may_call_a_write_method(
    dispatcher: Dispatcher, admin: FakeSession, test_schema: ApiSchema
) -> None:
    response = await call(dispatcher, admin, request("Test.set", {"value": 1}))
    assert result_of(response, test_schema, "Test.set") == {"value": 1}


async def test_reader_may_call_a_read_method(
    dispatcher: Dispatcher, reader: FakeSession, test_schema: ApiSchema
) -> None:
    response = await call(dispatcher, reader, request("Test.echo", {"name": "r"}))
    assert result_of(response, test_schema, "Test.echo")["name"] == "r"


# -- errors raised by handlers --------------------------------------------------------------


async def test_api_error_from_a_handler_reaches_the_client(
    dispatcher: Dispatcher, reader: FakeSession
) -> None:
    vm_id = str(uuid.uuid4())
    response = await call(dispatcher, reader, request("Test.lookup", {"vm_id": vm_id}, 11))
    error = error_of(response, 5)
    assert error["message"] == f"no VM {vm_id}"
    assert error["data"] == {"name": "NotFound", "reason": "no_vm", "object": "vm", "id": vm_id}
    assert response["id"] == 11


async def test_bug_in_a_handler_is_an_internal_error_without_a_traceback(
    dispatcher: Dispatcher, reader: FakeSession, caplog: pytest.LogCaptureFixture,
    test_schema: ApiSchema,
) -> None:
    with caplog.at_level(logging.ERROR, logger="virtnode.rpc.dispatch"):
        raw = await dispatcher.handle(json.dumps(request("Test.crash", {}, 12)), reader)
    assert raw is not None
    for leak in (SECRET, "Traceback", "RuntimeError", "test_dispatcher", 'File "'):
        assert leak not in raw, f"{leak!r} leaked to the client: {raw}"
    response = json.loads(raw)
    error = error_of(response, -32603)
    assert error["data"]["name"] == "InternalError"
    incident = error["data"]["incident"]
    uuid.UUID(incident)
    assert response["id"] == 12

    # The log has what the client does not: the incident id and the traceback.
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged, "the incident id must be in the agent log"
    assert logged[0].exc_info is not None
    assert SECRET in str(logged[0].exc_info[1])

    # The dispatcher is not broken by it.
    assert reader.inflight == 0
    assert dispatcher.inflight == 0
    again = await call(dispatcher, reader, request("Test.echo", {"name": "after"}, 13))
    assert result_of(again, test_schema, "Test.echo")["name"] == "after"


async def test_each_internal_error_has_its_own_incident(
    dispatcher: Dispatcher, reader: FakeSession
) -> None:
    first = await call(dispatcher, reader, request("Test.crash", {}))
    second = await call(dispatcher, reader, request("Test.crash", {}))
    assert first["error"]["data"]["incident"] != second["error"]["data"]["incident"]


async def test_result_that_is_not_json_is_an_internal_error(
    dispatcher: Dispatcher, reader: FakeSession, test_schema: ApiSchema
) -> None:
    response = await call(dispatcher, reader, request("Test.unsendable", {}, 14))
    error = error_of(response, -32603)
    uuid.UUID(error["data"]["incident"])
    assert response["id"] == 14
    batch = [request("Test.unsendable", {}, 15), request("Test.echo", {"name": "ok"}, 16)]
    by_id = {r["id"]: r for r in await call(dispatcher, reader, batch)}
    error_of(by_id[15], -32603)
    assert result_of(by_id[16], test_schema, "Test.echo")["name"] == "ok"


async def test_result_that_is_not_unicode_is_an_internal_error(
    dispatcher: Dispatcher, reader: FakeSession, test_schema: ApiSchema
) -> None:
    # A lone surrogate encodes as JSON but not as UTF-8: the transport could not send it.
    for message in (request("Test.lonely", {}, 17),
                    [request("Test.lonely", {}, 18), request("Test.echo", {"name": "ok"}, 19)]):
        answer = await dispatcher.handle(json.dumps(message), reader)
        assert answer is not None
        answer.encode("utf-8")
        responses = json.loads(answer)
        by_id = {r["id"]: r for r in (responses if isinstance(responses, list) else [responses])}
        for req_id in (17, 18):
            if req_id in by_id:
                error = error_of(by_id[req_id], -32603)
                assert error["data"]["reason"] == "unencodable_result"
    assert result_of(by_id[19], test_schema, "Test.echo")["name"] == "ok"


def test_an_answer_whose_id_cannot_be_sent_gets_a_null_id() -> None:
    # parse() refuses such ids; this is the last line of defence behind it.
    answer = json.loads(rpc._encode({"jsonrpc": "2.0", "result": {}, "id": "\ud800"}))
    assert answer["id"] is None
    assert answer["error"]["data"]["reason"] == "unencodable_result"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"name": "a\u0000b"}, "name"),
        ({"name": "\u0007bell"}, "name"),
        ({"name": "esc\u001b[0m"}, "name"),
        ({"name": "a", "tags": ["ok", "line\u000bfeed"]}, "tags.1"),
        ({"name": "a", "options": {"mode": "fast"}, "tags": ["\u001f"]}, "tags.0"),
    ],
    ids=["nul", "bell", "escape", "vertical-tab", "unit-separator"],
)
async def test_control_characters_in_strings_are_invalid_params(
    *, dispatcher: Dispatcher, reader: FakeSession, service: FakeService,
    params: JsonObject, field: str,
) -> None:
    response = await call(dispatcher, reader, request("Test.echo", params))
    error = error_of(response, -32602)
    assert error["data"]["name"] == "InvalidParams"
    assert error["data"]["field"] == field
    assert error["data"]["reason"] == "control_character"
    assert service.calls == [], "the handler must not run on invalid params"


async def test_tab_newline_and_carriage_return_are_text(
    dispatcher: Dispatcher, reader: FakeSession, test_schema: ApiSchema
) -> None:
    name = "line one\r\n\tline two\n\u007f\u0080 ü"
    response = await call(dispatcher, reader, request("Test.echo", {"name": name}))
    assert result_of(response, test_schema, "Test.echo")["name"] == name


async def test_schema_errors_come_before_control_characters(
    dispatcher: Dispatcher, reader: FakeSession
) -> None:
    response = await call(dispatcher, reader, request("Test.echo", {"name": "\u0000",
                                                                    "count": -1}))
    assert error_of(response, -32602)["data"]["reason"] == "minimum"


# -- batches --------------------------------------------------------------------------------


async def test_mixed_batch(
    dispatcher: Dispatcher, reader: FakeSession, service: FakeService, test_schema: ApiSchema
) -> None:
    batch = [
        request("Test.echo", {"name": "one"}, 1),
        request("Test.echo", {"name": 2}, 2),
        request("Test.echo", {"name": "silent"}, notify=True),
        42,
        request("Test.nope", {}, "three"),
        request("Test.set", {"value": 1}, 4),
        request("Test.crash", {}, notify=True),
        {"jsonrpc": "2.0", "method": "Test.echo", "id": 5, "params": "x"},
    ]
    responses = await call(dispatcher, reader, batch)
    assert isinstance(responses, list)
    assert len(responses) == 6
    by_id = {r["id"]: r for r in responses if r["id"] is not None}
    assert set(by_id) == {1, 2, "three", 4, 5}
    assert result_of(by_id[1], test_schema, "Test.echo")["name"] == "one"
    assert error_of(by_id[2], -32602)["data"]["field"] == "name"
    assert error_of(by_id["three"], -32601)
    assert error_of(by_id[4], 7)
    assert error_of(by_id[5], -32600)["data"]["reason"] == "bad_params"
    (null_id,) = [r for r in responses if r["id"] is None]
    assert error_of(null_id, -32600)["data"]["reason"] == "not_an_object"
    assert sorted(service.calls) == ["crash", "echo", "echo"]


async def test_batch_of_notifications_gets_no_answer(
    dispatcher: Dispatcher, reader: FakeSession, service: FakeService
) -> None:
    batch = [
        request("Test.echo", {"name": "a"}, notify=True),
        request("Test.echo", {"bad": 1}, notify=True),
        request("Test.nope", notify=True),
    ]
    assert await dispatcher.handle(json.dumps(batch), reader) is None
    assert service.calls == ["echo"]


async def test_batch_answers_every_request(dispatcher: Dispatcher, reader: FakeSession) -> None:
    batch = [request("Test.echo", {"name": f"n{i}"}, i) for i in range(20)]
    responses = await call(dispatcher, reader, batch)
    assert sorted(r["id"] for r in responses) == list(range(20))
    assert all(r["result"]["name"] == f"n{r['id']}" for r in responses)


async def test_batch_entries_run_concurrently(
    dispatcher: Dispatcher, reader: FakeSession, service: FakeService
) -> None:
    batch = [request("Test.wait", {}, 1), request("Test.wait", {}, 2)]
    service.expected_waiters = 2
    task = asyncio.create_task(dispatcher.handle(json.dumps(batch), reader))
    await asyncio.wait_for(service.started.wait(), 5)
    assert service.waiting == 2
    assert dispatcher.inflight == 2
    service.release.set()
    answer = await asyncio.wait_for(task, 5)
    assert answer is not None
    assert sorted(r["id"] for r in json.loads(answer)) == [1, 2]


# -- limits and shutdown --------------------------------------------------------------------


async def start_waiting_call(
    dispatcher: Dispatcher, session: FakeSession, service: FakeService, req_id: Any = "slow"
) -> asyncio.Task[str | None]:
    service.started.clear()
    service.expected_waiters = service.waiting + 1
    task = asyncio.create_task(dispatcher.handle(json.dumps(request("Test.wait", {}, req_id)),
                                                 session))
    await asyncio.wait_for(service.started.wait(), 5)
    return task


async def test_too_many_requests_in_flight_on_one_session(
    dispatcher: Dispatcher, service: FakeService, test_schema: ApiSchema
) -> None:
    session = FakeSession(READER, limit=1)
    other = FakeSession(READER, limit=1)
    slow = await start_waiting_call(dispatcher, session, service)
    assert session.inflight == 1

    response = await call(dispatcher, session, request("Test.echo", {"name": "x"}, 2))
    error = error_of(response, 8)
    assert error["data"] == {"name": "ResourceExhausted", "reason": "too_many_requests"}
    assert response["id"] == 2
    assert service.calls == ["wait"]

    # The limit is per session: another connection is served.
    response = await call(dispatcher, other, request("Test.echo", {"name": "y"}, 3))
    assert result_of(response, test_schema, "Test.echo")["name"] == "y"

    service.release.set()
    answer = await asyncio.wait_for(slow, 5)
    assert answer is not None
    assert json.loads(answer)["result"] == {"waited": True}
    assert session.inflight == 0
    response = await call(dispatcher, session, request("Test.echo", {"name": "z"}, 4))
    assert result_of(response, test_schema, "Test.echo")["name"] == "z"


async def test_limit_counts_what_the_session_reports(
    dispatcher: Dispatcher, service: FakeService
) -> None:
    session = FakeSession(READER, limit=3, inflight=3)
    response = await call(dispatcher, session, request("Test.echo", {"name": "x"}))
    assert error_of(response, 8)["data"]["reason"] == "too_many_requests"
    assert await call(dispatcher, session, request("Test.echo", {"name": "x"}, notify=True)) is None
    assert service.calls == []
    assert session.inflight == 3


async def test_refuse_new_answers_unavailable(
    dispatcher: Dispatcher, admin: FakeSession, service: FakeService
) -> None:
    dispatcher.refuse_new()
    response = await call(dispatcher, admin, request("Test.echo", {"name": "x"}, 9))
    error = error_of(response, 14)
    assert error["data"] == {"name": "Unavailable", "reason": "shutting_down"}
    assert response["id"] == 9
    assert await call(dispatcher, admin, request("Test.echo", {"name": "x"}, notify=True)) is None
    assert service.calls == []


async def test_drain_with_nothing_in_flight_returns_at_once(dispatcher: Dispatcher) -> None:
    assert await asyncio.wait_for(dispatcher.drain(timeout=5), 1) is True


async def test_drain_waits_for_calls_in_flight(
    dispatcher: Dispatcher, reader: FakeSession, service: FakeService
) -> None:
    slow = await start_waiting_call(dispatcher, reader, service)
    dispatcher.refuse_new()
    drain = asyncio.create_task(dispatcher.drain(timeout=5))
    await asyncio.sleep(0.02)  # deliberate: time for drain to return, were it to
    assert not drain.done(), "drain returned while a call was in flight"
    service.release.set()
    assert await asyncio.wait_for(drain, 5) is True
    assert slow.done()
    answer = await slow
    assert answer is not None
    assert json.loads(answer)["result"] == {"waited": True}


async def test_drain_gives_up_after_the_timeout(
    dispatcher: Dispatcher, reader: FakeSession, service: FakeService
) -> None:
    slow = await start_waiting_call(dispatcher, reader, service)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await dispatcher.drain(timeout=0.05) is False
    assert 0.04 <= loop.time() - started < 2
    assert dispatcher.inflight == 1
    service.release.set()
    await asyncio.wait_for(slow, 5)
    assert await dispatcher.drain(timeout=1) is True


async def test_cancelled_call_leaves_no_count_behind(
    dispatcher: Dispatcher, reader: FakeSession, service: FakeService
) -> None:
    slow = await start_waiting_call(dispatcher, reader, service)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert reader.inflight == 0
    assert dispatcher.inflight == 0
    assert await dispatcher.drain(timeout=1) is True


# -- construction ---------------------------------------------------------------------------


def test_schema_method_without_handler_is_refused(
    test_schema: ApiSchema, service: FakeService
) -> None:
    handlers = service.handlers()
    del handlers["Test.crash"]
    with pytest.raises(SchemaError, match=r"no handler for Test\.crash"):
        Dispatcher(test_schema, handlers)


def test_handler_without_schema_entry_is_refused(
    test_schema: ApiSchema, service: FakeService
) -> None:
    handlers = service.handlers()
    handlers["Test.extra"] = service.echo
    with pytest.raises(SchemaError, match=r"no schema entry for Test\.extra"):
        Dispatcher(test_schema, handlers)


def test_tables_of_several_namespaces_combine(service: FakeService) -> None:
    other: dict[str, Handler] = {"Two.b": service.echo}
    assert set(combine(service.handlers(), other)) == {*service.handlers(), "Two.b"}
    assert combine() == {}


def test_two_handlers_for_one_method_are_refused(service: FakeService) -> None:
    with pytest.raises(SchemaError, match=r"Test\.echo"):
        combine(service.handlers(), {"Test.echo": service.set})


async def test_result_checking_turns_a_result_off_schema_into_an_internal_error(
    test_schema: ApiSchema, service: FakeService, admin: FakeSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Test.set declares value as integer or null; echoing a string breaks its contract.
    off_schema = {"value": "not an integer"}

    class Liar(FakeService):
        async def set(self, ctx: CallContext, params: JsonObject) -> JsonObject:
            return {"value": params["value"]} if "value" in params else off_schema

    unchecked = Dispatcher(test_schema, Liar().handlers())
    assert (await call(unchecked, admin, request("Test.set", {})))["result"] == off_schema

    checked = Dispatcher(test_schema, Liar().handlers(), check_results=True)
    with caplog.at_level(logging.ERROR, logger="virtnode.rpc.dispatch"):
        response = await call(checked, admin, request("Test.set", {}))
    assert response["error"]["code"] == -32603
    assert response["error"]["data"]["reason"] == "result_schema"
    assert "does not match the schema" in caplog.text
    good = await call(checked, admin, request("Test.set", {"value": 3}))
    assert good["result"] == {"value": 3}
