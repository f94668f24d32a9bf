"""Bindings: each API namespace's methods onto the services that do them.

The services know nothing of JSON-RPC. A service method takes the validated params as the
TypedDict that :mod:`virtnode.api_schema.params` generates for it (or nothing, for a method
without params) and returns the result object. A binding module, one per namespace, is
the one place where a method name meets a service method. Only the methods that act on the
call itself get more: ``Events.subscribe``/``unsubscribe`` the session to push to,
``Job.cancel`` the caller's identity, and ``VM.openConsole`` the caller's identity and
role (the console session it grants has that role).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from virtnode.config import Role
from virtnode.rpc.dispatch import CallContext, Handler
from virtnode.rpc.schema import SchemaError
from virtnode.util.jsontypes import JsonObject

Takes = Literal["params", "nothing", "session", "caller", "caller_role"]


@dataclass(frozen=True, slots=True)
class Bound:
    """A service method bound to an API method: a :data:`Handler`."""

    target: Callable[..., Awaitable[JsonObject]]
    takes: Takes = "params"

    def __call__(self, ctx: CallContext, params: JsonObject) -> Awaitable[JsonObject]:
        # No coroutine of its own: the dispatcher awaits the service's directly.
        if self.takes == "params":
            return self.target(params)
        if self.takes == "nothing":
            return self.target()
        if self.takes == "session":
            return self.target(ctx.session, params)
        if self.takes == "caller_role":
            return self.target(params, ctx.caller.identity, ctx.caller.role)
        return self.target(params, ctx.caller.identity)


def params(fn: Callable[[Any], Awaitable[JsonObject]]) -> Bound:
    """A method that takes its validated params."""
    return Bound(fn)


def no_params(fn: Callable[[], Awaitable[JsonObject]]) -> Bound:
    """A method whose schema has no params."""
    return Bound(fn, "nothing")


def with_session(fn: Callable[[Any, Any], Awaitable[JsonObject]]) -> Bound:
    """A method that acts on the session the call came on, then its params."""
    return Bound(fn, "session")


def with_caller(fn: Callable[[Any, str], Awaitable[JsonObject]]) -> Bound:
    """A method that takes its params and the caller's identity."""
    return Bound(fn, "caller")


def with_caller_role(fn: Callable[[Any, str, Role], Awaitable[JsonObject]]) -> Bound:
    """A method that takes its params, the caller's identity and the caller's role."""
    return Bound(fn, "caller_role")


def combine(*tables: Mapping[str, Handler]) -> dict[str, Handler]:
    """One table of handlers from the namespaces' tables; a method bound twice is an error."""
    table: dict[str, Handler] = {}
    for part in tables:
        for name, handler in part.items():
            if name in table:
                raise SchemaError(f"two handlers for {name}")
            table[name] = handler
    return table
