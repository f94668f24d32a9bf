"""An in-process :class:`ApiServer` over a small test schema, and raw JSON-RPC helpers.

The server listens on a unix socket and a loopback TCP port and serves a dispatcher over
``Test.*`` methods whose handlers the tests can hold, crash or make push. The fixtures
(``wire_schema``, ``serve``, ``served``) are registered for the integration tests by
``tests/integration/conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.agentproc import free_port
from virtnode.config import AccessConfig, Role, ServerConfig
from virtnode.rpc.dispatch import CallContext, Dispatcher, Handler
from virtnode.rpc.schema import ApiSchema, build_schema
from virtnode.rpc.server import ApiServer
from virtnode.util.jsontypes import JsonObject

MAX_MESSAGE = 64 * 1024
MAX_INFLIGHT = 4
TIMEOUT = 5.0
#: Put in the exception Test.crash raises; it must never reach a client.
SECRET = "secret-detail-4f1c /etc/virtnode/private.key"

TEST_METHODS = """
methods:
  Test.echo:
    description: Return the params as received.
    access: read
    since: "0.1"
    params:
      properties:
        value: {}
        nested:
          type: object
          additionalProperties: false
          properties:
            count: {type: integer, minimum: 0}
            tags: {type: array, items: {type: string}}
    result: {}
  Test.write:
    description: Change something; needs the admin role.
    access: write
    since: "0.1"
    params:
      required: [name]
      properties:
        name: {type: string}
    result:
      required: [written]
      properties:
        written: {type: string}
  Test.crash:
    description: Fail with an unexpected exception.
    access: read
    since: "0.1"
  Test.unencodable:
    description: Return a result that cannot be encoded as JSON.
    access: read
    since: "0.1"
  Test.slow:
    description: Wait until the test opens the named gate, or for some seconds.
    access: read
    since: "0.1"
    params:
      properties:
        gate: {type: string}
        seconds: {type: number, minimum: 0, maximum: 10}
  Test.whoami:
    description: The caller as the server sees it.
    access: read
    since: "0.1"
  Test.note:
    description: Record the value, so that a test can see a notification was handled.
    access: read
    since: "0.1"
    params:
      properties:
        value: {type: string}
  Test.blob:
    description: Answer with a string of the given size.
    access: read
    since: "0.1"
    params:
      required: [size]
      properties:
        size: {type: integer, minimum: 0}
  Test.flood:
    description: Push the given number of notifications of the given size to the caller.
    access: read
    since: "0.1"
    params:
      required: [count, size]
      properties:
        count: {type: integer, minimum: 0}
        size: {type: integer, minimum: 0}
"""


# --- the test backend ---------------------------------------------------------------------


class Backend:
    """Handlers of the Test.* methods, with state the tests can wait on."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.started: list[str] = []
        self.notes: list[str] = []
        self.changed = asyncio.Condition()

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def open_all(self) -> None:
        for event in self.gates.values():
            event.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT), self.changed:
            await self.changed.wait_for(predicate)

    async def _record(self, into: list[str], value: str) -> None:
        async with self.changed:
            into.append(value)
            self.changed.notify_all()

    async def echo(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        return params

    async def write(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        return {"written": params["name"]}

    async def crash(self, _ctx: CallContext, _params: JsonObject) -> JsonObject:
        raise RuntimeError(SECRET)

    async def unencodable(self, _ctx: CallContext, _params: JsonObject) -> JsonObject:
        return {"value": float("nan"), "raw": b"\x00"}

    async def slow(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        name = params.get("gate", "")
        await self._record(self.started, name)
        if name:
            await self.gate(name).wait()
        else:
            await asyncio.sleep(params.get("seconds", 0))  # deliberate: a call this slow
        return {"gate": name}

    async def whoami(self, ctx: CallContext, _params: JsonObject) -> JsonObject:
        caller = ctx.caller
        return {"identity": caller.identity, "role": caller.role.value,
                "transport": caller.transport}

    async def note(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        await self._record(self.notes, params.get("value", ""))
        return {}

    async def blob(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        return {"data": "x" * params["size"]}

    async def flood(self, ctx: CallContext, params: JsonObject) -> JsonObject:
        text = json.dumps({"jsonrpc": "2.0", "method": "flood",
                           "params": {"data": "x" * params["size"]}})
        pushed = sum(ctx.session.push_text(text) for _ in range(params["count"]))
        return {"pushed": pushed}

    def handlers(self) -> dict[str, Handler]:
        return {
            "Test.blob": self.blob,
            "Test.flood": self.flood,
            "Test.echo": self.echo,
            "Test.write": self.write,
            "Test.crash": self.crash,
            "Test.unencodable": self.unencodable,
            "Test.slow": self.slow,
            "Test.whoami": self.whoami,
            "Test.note": self.note,
        }


@pytest.fixture(scope="module")
def wire_schema() -> ApiSchema:
    common = resources.files("virtnode.api_schema").joinpath("common.yaml")
    return build_schema([
        ("common.yaml", common.read_text(encoding="utf-8")),
        ("test.yaml", TEST_METHODS),
    ])


# --- the server under test and its clients ------------------------------------------------


@dataclass
class Served:
    """One running ApiServer, and the client sessions opened against it."""

    server: ApiServer
    dispatcher: Dispatcher
    backend: Backend
    unix_path: Path
    port: int
    health: JsonObject
    clients: list[aiohttp.ClientSession] = field(default_factory=list)

    def session(self, via: str) -> aiohttp.ClientSession:
        connector = aiohttp.UnixConnector(path=str(self.unix_path)) if via == "unix" else None
        session = aiohttp.ClientSession(connector=connector)
        self.clients.append(session)
        return session

    def url(self, via: str, path: str = "/rpc") -> str:
        host = "localhost" if via == "unix" else f"127.0.0.1:{self.port}"
        return f"http://{host}{path}"

    async def ws(self, via: str = "tcp") -> aiohttp.ClientWebSocketResponse:
        return await self.session(via).ws_connect(self.url(via), autoping=True)

    async def post(self, body: str | bytes, via: str = "tcp") -> HttpAnswer:
        async with self.session(via).post(
            self.url(via), data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            return HttpAnswer(resp.status, resp.content_type, await resp.text())

    async def get(self, path: str, via: str = "tcp") -> HttpAnswer:
        async with self.session(via).get(self.url(via, path)) as resp:
            return HttpAnswer(resp.status, resp.content_type, await resp.text())

    async def shutdown(self) -> None:
        self.backend.open_all()
        for client in self.clients:
            await client.close()
        await self.server.stop_accepting()
        await self.server.close_sessions()
        await self.server.close()


@dataclass
class HttpAnswer:
    status: int
    content_type: str
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path, wire_schema: ApiSchema) -> AsyncIterator[ServeFactory]:
    """Start ApiServers on a unix socket in tmp_path and a free loopback port."""
    running: list[Served] = []

    async def start(access: AccessConfig | None = None, unix_path: Path | None = None,
                    **options: Any) -> Served:
        path = unix_path or tmp_path / f"api{len(running)}.sock"
        port = free_port()
        config = ServerConfig(**{
            "listen": (f"unix:{path}", f"tcp://127.0.0.1:{port}"),
            "max_message_size": MAX_MESSAGE,
            "max_inflight_per_connection": MAX_INFLIGHT,
            **options,
        })
        backend = Backend()
        dispatcher = Dispatcher(wire_schema, backend.handlers(), max_batch=config.max_batch,
                                max_answer_size=config.max_answer_size)
        health: JsonObject = {"status": "ok", "recovering": False,
                              "hypervisor": {"uri": "test:///default", "state": "connected"}}
        server = ApiServer(config, access or AccessConfig(unix_admin_uids=(0,)), dispatcher,
                           lambda: health)
        served = Served(server, dispatcher, backend, path, port, health)
        try:
            await server.start()
        except BaseException:
            await server.close()
            raise
        running.append(served)
        return served

    yield start
    for served in running:
        await served.shutdown()


@pytest.fixture
async def served(serve: ServeFactory) -> Served:
    """A server where unix uid 0 is admin and TCP callers are readers."""
    return await serve(AccessConfig(unix_admin_uids=(0,), tcp_role=Role.READER))


# --- speaking raw JSON-RPC ----------------------------------------------------------------


def request(method: str, params: Any = None, req_id: Any = 1) -> str:
    message: JsonObject = {"jsonrpc": "2.0", "method": method, "id": req_id}
    if params is not None:
        message["params"] = params
    return json.dumps(message)


def notification(method: str, params: Any = None) -> str:
    message: JsonObject = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message)


async def receive_text(ws: aiohttp.ClientWebSocketResponse) -> str:
    msg = await ws.receive(timeout=TIMEOUT)
    assert msg.type is aiohttp.WSMsgType.TEXT, f"expected a text message, got {msg}"
    assert isinstance(msg.data, str)
    return msg.data


async def receive(ws: aiohttp.ClientWebSocketResponse) -> Any:
    return json.loads(await receive_text(ws))


async def call(ws: aiohttp.ClientWebSocketResponse, method: str, params: Any = None,
               req_id: Any = 1) -> Any:
    await ws.send_str(request(method, params, req_id))
    return await receive(ws)


def assert_result(response: Any, req_id: Any) -> Any:
    assert response.keys() == {"jsonrpc", "result", "id"}, response
    assert response["jsonrpc"] == "2.0"
    assert response["id"] == req_id
    return response["result"]


def assert_error(response: Any, code: int, req_id: Any = None, *, name: str | None = None,
                 reason: str | None = None) -> JsonObject:
    """Check a JSON-RPC error response and return its error member."""
    assert isinstance(response, dict), f"expected one response object, got {response!r}"
    assert response.keys() == {"jsonrpc", "error", "id"}, response
    assert response["jsonrpc"] == "2.0"
    assert response["id"] == req_id
    assert type(response["id"]) is type(req_id)
    error: JsonObject = response["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if name is not None:
        assert error["data"]["name"] == name, error
    if reason is not None:
        assert error["data"]["reason"] == reason, error
    return error
