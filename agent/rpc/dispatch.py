"""Dispatch of JSON-RPC messages to handlers: validation, access, error mapping.

The dispatcher knows the schema and a table of handlers; it knows nothing about VMs or
transports. A transport hands it a raw message with the :class:`Session` it came from and
sends back whatever text it returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from virtnode import jsonrpc
from virtnode.errors import (
    ApiError,
    InternalError,
    InvalidParams,
    MethodNotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from virtnode.events.subscriptions import Peer
from virtnode.rpc.identity import Caller
from virtnode.rpc.schema import ApiSchema, SchemaError
from virtnode.util.aio import wait_event
from virtnode.util.jsontypes import JsonObject

log = logging.getLogger(__name__)



class Session(Peer, Protocol):
    """What a handler can know about the connection a call came on: the peer events are
    pushed to, who is calling and how many of its requests are in flight."""

    caller: Caller
    inflight: int

    @property
    def max_inflight(self) -> int: ...


@dataclass(frozen=True, slots=True)
class CallContext:
    """Passed to every handler: who calls, on which session."""

    caller: Caller
    session: Session
    method: str


Handler = Callable[[CallContext, JsonObject], Awaitable[JsonObject]]
#: Messages longer than this are decoded in a thread, not on the event loop.
PARSE_IN_THREAD = 256 * 1024
#: Told of every answered request: (method, outcome, seconds). Must be cheap.
Observer = Callable[[str, str, float], None]


class Dispatcher:
    """Validates and routes requests; every response it builds is JSON-RPC 2.0."""

    def __init__(self, schema: ApiSchema, handlers: Mapping[str, Handler], *,
                 check_results: bool = False, observer: Observer | None = None,
                 max_batch: int = 100, max_answer_size: int = 16 * 1024 * 1024) -> None:
        missing = sorted(set(schema.methods) - set(handlers))
        extra = sorted(set(handlers) - set(schema.methods))
        if missing or extra:
            raise SchemaError(
                "schema and handlers disagree: "
                + "; ".join(
                    part
                    for part in (
                        f"no handler for {', '.join(missing)}" if missing else "",
                        f"no schema entry for {', '.join(extra)}" if extra else "",
                    )
                    if part
                )
            )
        self.schema = schema
        self._handlers = dict(handlers)
        self._check_results = check_results
        self._max_batch = max_batch
        self._max_answer = max_answer_size
        self._observer = observer
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._refusing = False

    @property
    def inflight(self) -> int:
        """Requests being handled right now, over all sessions."""
        return self._inflight

    def refuse_new(self) -> None:
        """Answer every request from now on with ``Unavailable`` (the agent is stopping)."""
        self._refusing = True

    async def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        return await wait_event(self._idle, timeout)

    async def handle(self, raw: str | bytes, session: Session) -> str | None:
        """Answer one message; None when nothing goes back (notifications only)."""
        try:
            if len(raw) > PARSE_IN_THREAD:
                message = await asyncio.to_thread(jsonrpc.parse, raw, self._max_batch)
            else:
                message = jsonrpc.parse(raw, self._max_batch)
        except ApiError as exc:
            return jsonrpc.encode(jsonrpc.error(None, exc))
        if not message.is_batch:
            response = await self._answer(message.entries[0], session)
            return None if response is None else self._bounded(response, self._max_answer)
        answers = await asyncio.gather(*(self._answer(e, session) for e in message.entries))
        responses = []
        room = self._max_answer
        for answer in answers:
            if answer is not None:
                text = self._bounded(answer, room)
                room -= len(text) + 1
                responses.append(text)
        return f"[{','.join(responses)}]" if responses else None

    def _bounded(self, response: JsonObject, room: int) -> str:
        """Encode a response; one that takes more than ``room`` bytes becomes an error."""
        text = _encode(response)
        if len(text) <= room // 4:  # a character takes at most 4 bytes in UTF-8
            return text
        size = len(text.encode())
        if size <= room:
            return text
        log.warning("answer to request id %r is %d bytes; server.max_answer_size is %d",
                    response.get("id"), size, self._max_answer)
        error = ResourceExhausted(
            f"the answer is larger than {self._max_answer} bytes (the largest this agent "
            "sends); ask for less, or send fewer requests in one batch",
            reason="answer_too_large")
        return _encode(jsonrpc.error(response.get("id"), error))

    def _refusal(self, session: Session) -> ApiError | None:
        if self._refusing:
            return Unavailable("the agent is shutting down", reason="shutting_down")
        if session.inflight >= session.max_inflight:
            return ResourceExhausted(
                f"more than {session.max_inflight} requests in flight on this connection",
                reason="too_many_requests",
            )
        return None

    async def _answer(self, entry: jsonrpc.Entry, session: Session) -> JsonObject | None:
        # One coroutine per request on the hot path: checks are plain calls.
        if isinstance(entry, jsonrpc.Invalid):
            return jsonrpc.error(entry.id, entry.error)
        refusal = self._refusal(session)
        if refusal is not None:
            return None if entry.is_notification else jsonrpc.error(entry.id, refusal)
        session.inflight += 1
        self._inflight += 1
        self._idle.clear()
        started = time.perf_counter()
        outcome = "ok"
        try:
            handler, ctx, params = self._prepare(entry, session)
            value = await handler(ctx, params)
            if self._check_results:
                self._check_result(entry.method, value)
            response = jsonrpc.result(entry.id, value)
        except ApiError as exc:
            outcome = exc.name
            response = jsonrpc.error(entry.id, exc)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception:
            incident = str(uuid.uuid4())
            log.exception("internal error in %s (incident %s)", entry.method, incident)
            outcome = "InternalError"
            response = jsonrpc.error(
                entry.id,
                InternalError("internal error; see the agent log",
                              reason="unexpected", incident=incident),
            )
        finally:
            session.inflight -= 1
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
            elapsed = time.perf_counter() - started
            if self._observer is not None:
                self._observer(entry.method, outcome, elapsed)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "call %s caller=%s duration_ms=%.3f outcome=%s",
                    entry.method,
                    session.caller.identity,
                    elapsed * 1000,
                    outcome,
                )
        return None if entry.is_notification else response

    def _prepare(self, request: jsonrpc.Request,
                 session: Session) -> tuple[Handler, CallContext, JsonObject]:
        """Find the method, check access and params; raises the matching ApiError."""
        spec = self.schema.methods.get(request.method)
        if spec is None:
            raise MethodNotFound(f"method {request.method!r} does not exist",
                                 reason="unknown_method", method=request.method)
        if not session.caller.may(spec.access):
            raise PermissionDenied(
                f"{request.method} needs the admin role; {session.caller.identity} is "
                f"{session.caller.role.value}",
                reason="role",
                method=request.method,
            )
        if isinstance(request.params, list):
            raise InvalidParams("params must be an object of named parameters",
                                reason="positional_params", field="")
        params = self.schema.check_params(spec, request.params or {})
        ctx = CallContext(session.caller, session, request.method)
        return self._handlers[request.method], ctx, params

    def _check_result(self, method: str, value: Any) -> None:
        try:
            self.schema.check_result(method, value)
        except ValueError as exc:
            log.error("result does not match the schema: %s", exc)
            raise InternalError("internal error; see the agent log",
                                reason="result_schema") from None


def _encode(response: JsonObject) -> str:
    """Serialise one response; never raises.

    A result that is not JSON, or holds a string with no UTF-8 form (a lone surrogate),
    becomes an internal error; one whose id cannot be sent either gets a null id.
    """
    try:
        return jsonrpc.encode(response)
    except (TypeError, ValueError):
        incident = str(uuid.uuid4())
        log.exception("cannot encode the answer to request id %a (incident %s)",
                      response.get("id"), incident)
        error = InternalError("internal error; see the agent log",
                              reason="unencodable_result", incident=incident)
        try:
            return jsonrpc.encode(jsonrpc.error(response.get("id"), error))
        except ValueError:
            return jsonrpc.encode(jsonrpc.error(None, error))
