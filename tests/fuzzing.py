"""What an adversary sends the API, generated from api_schema with hypothesis.

:func:`messages` draws whole messages as bytes: requests for the schema's methods whose
params are built from each method's JSON schema, mostly well-formed and then bent (wrong
types, boundary numbers, unknown members, strings with NUL, lone surrogates, control
characters, path tricks), plus batches, deep nesting, invalid UTF-8 and truncated text.
Each message comes with what a correct server must do with it (:class:`Sent`).

Methods that act on the host itself outside a test's reach (host networking, storage
domains at a path of the caller's choosing) are sent only to a reader, whose calls are
refused before they run; the fuzz tests and ``bench/fuzz.py`` use this module alike.
"""

from __future__ import annotations

import http.client
import json
import re
import string
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from tests.rawws import CLOSE, BlockingWebSocket
from virtnode.rpc.schema import ApiSchema
from virtnode.util.jsontypes import JsonObject

#: Write methods whose valid calls change the host beyond a test's state dir.
HOST_CHANGING = frozenset({
    "Network.setup", "Network.persist", "Network.confirm",
    "StorageDomain.create", "StorageDomain.attach", "StorageDomain.detach",
    "StorageDomain.delete",
})

#: Params that make a valid call wait (seconds): drawn from short or invalid values only.
WAITS = frozenset({"timeout", "wait", "connectivity_timeout", "seconds"})

NASTY_STRINGS = (
    "", " ", "\x00", "a\x00b", "\ud800", "x\udfff", "\udc00\ud800", "\x01\x1f\x7f",
    "\n", "\t", "\u202e", "\ufeff", "\uffff", "😀", "é", "x" * 5000,
    "../../../../etc/shadow", "/etc/shadow", "/dev/vda", "/proc/self/mem", ".", "..",
    "/", "//", "%s%n%x", "' OR 1=1 --", "<x/>", "]]>", "&amp;", "$(id)", "`id`", "-rf",
    "null", "0", "-1", "true", "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff", "VM.\udc00",
)
NASTY_NUMBERS = (
    0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1,
    10**30, 0.5, -0.0, 1e308, -1e308, 1e-308,
)


@dataclass(frozen=True)
class Sent:
    """One message and what a correct server owes its sender."""

    data: bytes
    #: Whether at least one answer must come back: the message holds a request with an
    #: id, or something that is not a valid request (answered with an error, id null).
    must_answer: bool
    #: The ids of its requests: an answer may carry only these (or null).
    ids: frozenset[str]


def _json_values(depth: int = 3) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.sampled_from(NASTY_NUMBERS),
        st.integers(), st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(NASTY_STRINGS), st.text(max_size=20),
    )
    if depth <= 0:
        return scalars
    inner = _json_values(depth - 1)
    return st.one_of(scalars, st.lists(inner, max_size=4),
                     st.dictionaries(st.text(max_size=8), inner, max_size=4))


ANY = _json_values()


class _Builder:
    """Strategies for values of the schema's JSON schemas, valid-ish and bent."""

    def __init__(self, schema: ApiSchema) -> None:
        self._definitions = schema.definitions

    def value(self, node: Any, depth: int = 0) -> st.SearchStrategy[Any]:
        bent = ANY
        if not isinstance(node, dict) or depth > 6:
            return bent
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            return self.value(self._definitions.get(ref.rsplit("/", 1)[1]), depth + 1)
        return st.one_of(self._shaped(node, depth), bent) if depth else self._shaped(node, 0)

    def _shaped(self, node: JsonObject, depth: int) -> st.SearchStrategy[Any]:
        if "enum" in node:
            return st.one_of(st.sampled_from(node["enum"]), st.sampled_from(NASTY_STRINGS))
        for key in ("oneOf", "anyOf"):
            if key in node and all("type" in o or "$ref" in o for o in node[key]):
                return st.one_of(*(self.value(o, depth + 1) for o in node[key]))
        kind = node.get("type")
        if isinstance(kind, list):
            kind = kind[0] if kind else None
        if kind == "string":
            return self._string(node)
        if kind in ("integer", "number"):
            return self._number(node, kind)
        if kind == "boolean":
            return st.booleans()
        if kind == "array":
            return st.lists(self.value(node.get("items", {}), depth + 1),
                            max_size=min(int(node.get("maxItems", 4)) + 1, 6))
        if kind == "object" or "properties" in node:
            return self._object(node, depth)
        return ANY

    def _string(self, node: JsonObject) -> st.SearchStrategy[Any]:
        choices = [st.sampled_from(NASTY_STRINGS), st.text(max_size=30),
                   st.text(string.ascii_letters + string.digits + "-_.", min_size=1,
                           max_size=20),
                   st.uuids().map(str)]
        if "maxLength" in node:
            limit = int(node["maxLength"])
            choices.append(st.just("y" * (limit + 1)))
        return st.one_of(*choices)

    def _number(self, node: JsonObject, kind: str) -> st.SearchStrategy[Any]:
        edges: list[Any] = list(NASTY_NUMBERS)
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if isinstance(node.get(key), int | float):
                edges += [node[key] - 1, node[key], node[key] + 1]
        numbers: st.SearchStrategy[Any] = st.integers(-(2**70), 2**70)
        if kind == "number":
            numbers = st.one_of(numbers, st.floats(allow_nan=False, allow_infinity=False))
        return st.one_of(st.sampled_from(edges), numbers)

    def _member(self, name: str, node: Any, depth: int) -> st.SearchStrategy[Any]:
        if name in WAITS:  # a valid long wait only slows the fuzz down
            return st.sampled_from([0, 0.01, -1, 1e308, "1", None])
        return self.value(node, depth + 1)

    def _object(self, node: JsonObject, depth: int) -> st.SearchStrategy[Any]:
        properties: JsonObject = node.get("properties", {})
        required = [name for name in node.get("required", []) if name in properties]
        optional = {name: self._member(name, sub, depth) for name, sub in properties.items()
                    if name not in required}
        fixed = {name: self._member(name, properties[name], depth) for name in required}
        shaped = st.fixed_dictionaries(fixed, optional=optional)
        extra = st.dictionaries(st.sampled_from(["bogus", "", "\x00", "__proto__"]), ANY,
                                max_size=1)
        return st.one_of(shaped, st.builds(lambda a, b: {**a, **b}, shaped, extra))


def _request(builder: _Builder, schema: ApiSchema, methods: list[str],
             ) -> st.SearchStrategy[tuple[JsonObject, bool]]:
    """A request object, and whether it must be answered."""
    def build(method_params: tuple[str, Any], req_id: Any, notify: bool,
              bend: str) -> tuple[JsonObject, bool]:
        method, params = method_params
        message: JsonObject = {"jsonrpc": "2.0", "method": method, "params": params}
        if not notify:
            message["id"] = req_id
        if bend == "no_params":
            del message["params"]
        elif bend == "version":
            message["jsonrpc"] = "1.0"
        elif bend == "member":
            message["extra"] = 1
        elif bend == "positional":
            message["params"] = [params]
        invalid = (bend in ("version", "member") or not method
                   or ("params" in message and not isinstance(message["params"], dict | list)))
        return message, not notify or invalid

    spec_params = st.sampled_from(methods).flatmap(
        lambda name: st.tuples(st.just(name), builder.value(schema.methods[name].params)))
    odd_method = st.tuples(st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=12)),
                           ANY)
    ids = st.one_of(st.integers(-(2**60), 2**60), st.text(max_size=10),
                    st.sampled_from(["\ud800", "", "x" * 300, 0, -1, 1.5]))
    return st.builds(
        build, st.one_of(spec_params, spec_params, spec_params, odd_method), ids,
        st.sampled_from([False, False, False, True]),
        st.sampled_from(["", "", "", "", "no_params", "version", "member", "positional"]),
    )


def _encode(obj: Any) -> bytes:
    """JSON as a client writes it; lone surrogates go out as \\u escapes."""
    return json.dumps(obj, ensure_ascii=True).encode("ascii")


def _id_key(value: Any) -> str:
    return json.dumps(value)


#: A \\u escape of a lone surrogate (a pair is a character beyond the BMP): the whole
#: message is then a parse error, which is answered.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _sent(requests: list[tuple[JsonObject, bool]], batch: bool) -> Sent:
    objects = [message for message, _ in requests]
    ids = frozenset(_id_key(m["id"]) for m in objects if "id" in m)
    data = _encode(objects if batch else objects[0])
    owed = any(answer for _, answer in requests) or bool(_LONE_SURROGATE.search(data))
    return Sent(data, must_answer=owed, ids=ids)


def messages(schema: ApiSchema, *, reader: bool) -> st.SearchStrategy[Sent]:
    """Whole messages for a caller that is a reader (every method) or an admin (all but
    :data:`HOST_CHANGING`)."""
    methods = sorted(name for name in schema.methods
                     if reader or name not in HOST_CHANGING)
    one = _request(_Builder(schema), schema, methods)
    single = one.map(lambda r: _sent([r], batch=False))
    batch = st.lists(one, min_size=1, max_size=120).map(lambda rs: _sent(rs, batch=True))
    odd = st.one_of(
        st.binary(max_size=64),
        st.sampled_from([
            b"\xff\xfe", b'{"jsonrpc":"2.0","method":"Host.ping","id":"\xed\xa0\x80"}',
            b"[" * 5000, b'{"a":' * 3000, b"[]", b"{}", b"null", b"1", b'"x"',
            b'{"jsonrpc":"2.0","method":"Host.ping","id":1e400}']),
        one.map(lambda r: _encode(r[0])[: max(1, len(_encode(r[0])) // 2)]),
    ).map(lambda data: Sent(data, must_answer=True, ids=frozenset()))
    return st.one_of(single, single, single, batch, odd)


def problems(sent: Sent, answer: bytes | str | None, status: int = 200) -> list[str]:
    """What is wrong with ``answer`` (and the HTTP ``status`` it came with) as the server's
    reply to ``sent``; empty when nothing."""
    if status >= 500:
        return [f"internal error: HTTP {status}"]
    if status not in (200, 204, 413):
        return [f"HTTP {status}"]
    if answer is None or answer in (b"", ""):
        return ["no answer"] if sent.must_answer else []
    try:
        decoded = json.loads(answer)
    except ValueError as exc:
        return [f"the answer is not JSON: {exc}"]
    entries = decoded if isinstance(decoded, list) else [decoded]
    found = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("jsonrpc") != "2.0":
            found.append(f"not a JSON-RPC response: {entry!r:.200}")
            continue
        error = entry.get("error")
        if isinstance(error, dict) and error.get("code") == -32603:
            found.append(f"internal error: {error!r:.300}")
        if entry.get("id") is not None and _id_key(entry["id"]) not in sent.ids:
            found.append(f"an answer to an id never sent: {entry.get('id')!r:.80}")
    return found


# --- sending them ---------------------------------------------------------------------------


def post(port: int, data: bytes, timeout: float = 60.0) -> tuple[int, bytes | None]:
    """POST ``data`` to /rpc on 127.0.0.1: the status and the body (None for 204)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/rpc", body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    return response.status, None if response.status == 204 else body


class Exchange:
    """Sends messages on a WebSocket to a unix socket and collects each one's answer.

    A probe request after each message tells when everything it had coming has come.
    After a failed exchange the next one starts on a new connection, so that one failure
    is reported once.
    """

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
