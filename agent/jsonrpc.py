"""JSON-RPC 2.0 framing as plain functions: no I/O, no knowledge of methods.

:func:`parse` turns one received message into the entries to answer, :func:`result` and
:func:`error` build response objects, and :func:`encode` serialises what goes back.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

from virtnode.errors import ApiError, InvalidRequest, ParseError
from virtnode.util.jsontypes import JsonObject

#: A request id: JSON-RPC allows a string, a number or null.
RequestId = str | int | float | None

_REQUEST_MEMBERS = frozenset({"jsonrpc", "method", "params", "id"})


class Request(NamedTuple):
    """A well-formed request or notification."""

    method: str
    params: JsonObject | list[Any] | None
    id: RequestId
    is_notification: bool


class Invalid(NamedTuple):
    """An entry that is not a valid request; it is answered with ``error``."""

    error: ApiError
    id: RequestId = None


Entry = Request | Invalid


class Message(NamedTuple):
    """One received message: a single entry or a batch of them."""

    entries: tuple[Entry, ...]
    is_batch: bool


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 decodes to inf, which cannot be sent back
        raise ValueError(f"number {text} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

#: A ``\uXXXX`` escape of a UTF-16 surrogate (U+D800-U+DFFF). JSON spells the ``u`` in
#: lower case; the hex digits may be either.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def decode(raw: str | bytes) -> Any:
    """``json.loads`` that refuses NaN, Infinity, numbers too large for a float and text
    that is not Unicode.

    Those are not JSON (or cannot be sent back as JSON); raises ``ValueError`` for the
    first, and ``UnicodeError`` (a ``ValueError``) for bytes that are not UTF-8 (or UTF-16,
    UTF-32, as ``json.loads`` detects them) and for a lone surrogate, written as an escape
    (``"\\ud800"``) or, in a str, as such.
    """
    if isinstance(raw, str):
        # Only an in-process caller can hand over a str with a surrogate in it: bytes are
        # decoded strictly below, and aiohttp decodes WebSocket text the same way.
        suspect = ("\\u" in raw and _SURROGATE_ESCAPE.search(raw) is not None) or (
            not raw.isascii() and _SURROGATE.search(raw) is not None)
    else:
        raw = raw.decode(json.detect_encoding(raw))
        suspect = "\\u" in raw and _SURROGATE_ESCAPE.search(raw) is not None
    value = _DECODER.decode(raw)
    # The decoder joins a pair of escapes into one character and keeps a lone one as a
    # surrogate; only a message with such an escape needs looking through.
    if suspect and holds_match(value, _SURROGATE):
        raise UnicodeError("a string holds a lone surrogate (an unpaired \\uD800-\\uDFFF)")
    return value


def holds_match(value: Any, pattern: re.Pattern[str]) -> bool:
    """Whether a string in ``value`` (a key, a value, at any depth) matches ``pattern``."""
    search = pattern.search
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if search(item) is not None:
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _is_valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return value is None or isinstance(value, str | int | float)


def parse_entry(obj: Any) -> Entry:
    """Check one decoded request object and return what to do with it."""
    if not isinstance(obj, dict):
        return Invalid(InvalidRequest("request must be an object", reason="not_an_object"))
    req_id = obj.get("id")
    echo_id = req_id if _is_valid_id(req_id) else None
    if obj.get("jsonrpc") != "2.0":
        return Invalid(
            InvalidRequest('"jsonrpc" must be "2.0"', reason="bad_version"), echo_id
        )
    if not _is_valid_id(req_id):
        return Invalid(
            InvalidRequest('"id" must be a string, a number or null', reason="bad_id")
        )
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        return Invalid(
            InvalidRequest('"method" must be a non-empty string', reason="bad_method"), echo_id
        )
    unknown = obj.keys() - _REQUEST_MEMBERS
    if unknown:
        return Invalid(
            InvalidRequest(
                f"unknown request members: {', '.join(sorted(unknown))}",
                reason="unknown_member",
            ),
            echo_id,
        )
    params = obj.get("params")
    if "params" in obj and not isinstance(params, dict | list):
        return Invalid(
            InvalidRequest('"params" must be an object or an array', reason="bad_params"),
            echo_id,
        )
    return Request(method, params, req_id, is_notification="id" not in obj)


def parse(raw: str | bytes, max_batch: int | None = None) -> Message:
    """Decode one message.

    Raises :class:`ParseError` when it is not JSON (reason ``bad_json``) or not Unicode
    (``bad_unicode``: bytes that are not UTF-8, a lone surrogate), and
    :class:`InvalidRequest` for an empty batch or one of more than ``max_batch``
    entries; each is answered with a single error response whose id is null.
    """
    try:
        decoded = decode(raw)
    except UnicodeError as exc:
        # Nothing of it is kept or echoed: it could not be stored or sent back.
        raise ParseError(f"message is not valid Unicode: {exc}", reason="bad_unicode") from None
    except ValueError as exc:
        raise ParseError(f"message is not valid JSON: {exc}", reason="bad_json") from None
    except RecursionError:
        raise ParseError("message is nested too deeply", reason="too_deep") from None
    if isinstance(decoded, list):
        if not decoded:
            raise InvalidRequest("empty batch", reason="empty_batch")
        if max_batch is not None and len(decoded) > max_batch:
            raise InvalidRequest(
                f"a batch of {len(decoded)} requests; at most {max_batch} are taken in one",
                reason="batch_too_large")
        return Message(tuple(parse_entry(item) for item in decoded), is_batch=True)
    return Message((parse_entry(decoded),), is_batch=False)


def result(req_id: RequestId, value: Any) -> JsonObject:
    """Build a success response."""
    return {"jsonrpc": "2.0", "result": value, "id": req_id}


def error(req_id: RequestId, exc: ApiError) -> JsonObject:
    """Build an error response."""
    return {"jsonrpc": "2.0", "error": exc.to_error(), "id": req_id}


def notification(method: str, params: JsonObject) -> JsonObject:
    """Build a notification (a request with no id, sent by the agent)."""
    return {"jsonrpc": "2.0", "method": method, "params": params}


def encode(obj: Any) -> str:
    """Serialise a response, a batch of them or a notification.

    Raises ``ValueError`` when ``obj`` holds what cannot be sent: NaN or an infinity, or
    a string with a lone surrogate (``UnicodeEncodeError``), which has no UTF-8 form.
    """
    text = _ENCODER.encode(obj)
    if not text.isascii():  # O(1): CPython records whether a str is ASCII
        text.encode()  # the transports' own encoding, tried here where it can be answered
    return text
