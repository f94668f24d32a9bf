"""JSON-RPC 2.0 framing: what is a request, what is not, and what goes back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from virtnode import jsonrpc
from virtnode.errors import InvalidRequest, NotFound, ParseError


def parse_one(raw: str | bytes) -> jsonrpc.Entry:
    message = jsonrpc.parse(raw)
    assert not message.is_batch
    assert len(message.entries) == 1
    return message.entries[0]


def invalid(raw: str) -> jsonrpc.Invalid:
    entry = parse_one(raw)
    assert isinstance(entry, jsonrpc.Invalid), f"{raw} was accepted: {entry}"
    assert isinstance(entry.error, InvalidRequest)
    assert entry.error.to_error()["code"] == -32600
    return entry


# -- parse errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "{",
        '{"jsonrpc": "2.0", "method": "Host.ping",}',
        "{'jsonrpc': '2.0'}",
        '{"jsonrpc": "2.0", "method": "a"} trailing',
        b"\xff\xfe\xfa",
        '{"jsonrpc": "2.0", "method": "a", "params": {"x": NaN}, "id": 1}',
        '{"jsonrpc": "2.0", "method": "a", "params": {"x": Infinity}, "id": 1}',
        '{"jsonrpc": "2.0", "method": "a", "params": [-Infinity], "id": 1}',
        '{"jsonrpc": "2.0", "method": "a", "id": NaN}',
        # Valid JSON grammar, but the number does not fit a float and could not be echoed.
        '{"jsonrpc": "2.0", "method": "a", "id": 1e400}',
        '{"jsonrpc": "2.0", "method": "a", "params": {"x": -1e400}, "id": 1}',
        "[" * 100_000 + "]" * 100_000,
    ],
    ids=lambda raw: repr(raw[:40]),
)
def test_not_json_is_a_parse_error(raw: str | bytes) -> None:
    with pytest.raises(ParseError) as caught:
        jsonrpc.parse(raw)
    error = jsonrpc.error(None, caught.value)
    assert error["error"]["code"] == -32700
    assert error["error"]["data"]["name"] == "ParseError"
    assert error["id"] is None
    jsonrpc.encode(error)  # the answer itself must be sendable


def test_bytes_are_accepted_as_utf8() -> None:
    entry = parse_one('{"jsonrpc": "2.0", "method": "Ünïcode.x", "id": "é"}'.encode())
    assert isinstance(entry, jsonrpc.Request)
    assert entry.method == "Ünïcode.x"
    assert entry.id == "é"


# -- invalid requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    ["1", '"Host.ping"', "null", "true", "3.5"],
)
def test_non_object_is_invalid_with_null_id(raw: str) -> None:
    entry = invalid(raw)
    assert entry.id is None
    assert entry.error.reason == "not_an_object"


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        ('"jsonrpc": "1.0",', "bad_version"),
        ('"jsonrpc": 2.0,', "bad_version"),
        ('"jsonrpc": "2",', "bad_version"),
        ('"jsonrpc": null,', "bad_version"),
        ("", "bad_version"),
    ],
)
def test_wrong_or_missing_version_is_invalid_and_keeps_the_id(member: str, reason: str) -> None:
    entry = invalid('{' + member + ' "method": "Host.ping", "id": 7}')
    assert entry.error.reason == reason
    assert entry.id == 7


@pytest.mark.parametrize(
    "method",
    ['""', "null", "1", "true", "[]", "{}", '["Host.ping"]'],
)
def test_bad_method_is_invalid(method: str) -> None:
    entry = invalid('{"jsonrpc": "2.0", "id": "x", "method": ' + method + "}")
    assert entry.error.reason == "bad_method"
    assert entry.id == "x"


def test_missing_method_is_invalid() -> None:
    entry = invalid('{"jsonrpc": "2.0", "id": 3}')
    assert entry.error.reason == "bad_method"
    assert entry.id == 3


@pytest.mark.parametrize("bad_id", ["true", "false", "{}", '{"a": 1}', "[]", "[1]"])
def test_bad_id_is_invalid_and_answered_with_null_id(bad_id: str) -> None:
    entry = invalid('{"jsonrpc": "2.0", "method": "Host.ping", "id": ' + bad_id + "}")
    assert entry.error.reason == "bad_id"
    assert entry.id is None


def test_bad_version_with_bad_id_answers_with_null_id() -> None:
    entry = invalid('{"jsonrpc": "1.0", "method": "Host.ping", "id": true}')
    assert entry.id is None


@pytest.mark.parametrize("extra", ['"extra": 1', '"Method": "x"', '"error": null', '"result": 1'])
def test_unknown_top_level_member_is_invalid_and_named(extra: str) -> None:
    entry = invalid('{"jsonrpc": "2.0", "method": "Host.ping", "id": 1, ' + extra + "}")
    assert entry.error.reason == "unknown_member"
    assert extra.split('"')[1] in entry.error.message
    assert entry.id == 1


@pytest.mark.parametrize("params", ['"a"', "1", "true", "null", "1.5"])
def test_params_must_be_an_object_or_an_array(params: str) -> None:
    entry = invalid('{"jsonrpc": "2.0", "method": "Host.ping", "id": 1, "params": ' + params + "}")
    assert entry.error.reason == "bad_params"
    assert entry.id == 1


@pytest.mark.parametrize(
    ("params", "expected"),
    [("{}", {}), ('{"a": [1]}', {"a": [1]}), ("[]", []), ('[1, "x"]', [1, "x"])],
)
def test_structured_params_are_kept(params: str, expected: Any) -> None:
    entry = parse_one('{"jsonrpc": "2.0", "method": "M.x", "id": 1, "params": ' + params + "}")
    assert isinstance(entry, jsonrpc.Request)
    assert entry.params == expected


def test_absent_params_are_none() -> None:
    entry = parse_one('{"jsonrpc": "2.0", "method": "M.x", "id": 1}')
    assert isinstance(entry, jsonrpc.Request)
    assert entry.params is None


# -- batches --------------------------------------------------------------------------------


def test_empty_batch_is_a_single_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as caught:
        jsonrpc.parse("[]")
    response = jsonrpc.error(None, caught.value)
    assert response == {
        "jsonrpc": "2.0",
        "error": {
            "code": -32600,
            "message": "empty batch",
            "data": {"name": "InvalidRequest", "reason": "empty_batch"},
        },
        "id": None,
    }


def test_batch_entries_that_are_not_objects_are_each_invalid() -> None:
    message = jsonrpc.parse('[1, "x", null, [], {"jsonrpc": "2.0", "method": "M.x", "id": 9}]')
    assert message.is_batch
    assert len(message.entries) == 5
    *bad, good = message.entries
    for entry in bad:
        assert isinstance(entry, jsonrpc.Invalid)
        assert entry.error.reason == "not_an_object"
        assert entry.id is None
    assert isinstance(good, jsonrpc.Request)
    assert good.id == 9


def test_batch_keeps_order_and_mixes_requests_notifications_and_invalid_entries() -> None:
    message = jsonrpc.parse(json.dumps([
        {"jsonrpc": "2.0", "method": "A.a", "id": "first"},
        {"jsonrpc": "2.0", "method": "B.b"},
        {"jsonrpc": "1.0", "method": "C.c", "id": "third"},
    ]))
    first, second, third = message.entries
    assert isinstance(first, jsonrpc.Request)
    assert (first.method, first.id, first.is_notification) == ("A.a", "first", False)
    assert isinstance(second, jsonrpc.Request)
    assert (second.method, second.is_notification) == ("B.b", True)
    assert isinstance(third, jsonrpc.Invalid)
    assert third.id == "third"


def test_batch_of_one_is_still_a_batch() -> None:
    message = jsonrpc.parse('[{"jsonrpc": "2.0", "method": "A.a", "id": 1}]')
    assert message.is_batch
    assert len(message.entries) == 1


# -- notifications and ids ------------------------------------------------------------------


def test_request_without_id_is_a_notification() -> None:
    entry = parse_one('{"jsonrpc": "2.0", "method": "A.a"}')
    assert isinstance(entry, jsonrpc.Request)
    assert entry.is_notification
    assert entry.id is None


def test_request_with_null_id_is_not_a_notification() -> None:
    entry = parse_one('{"jsonrpc": "2.0", "method": "A.a", "id": null}')
    assert isinstance(entry, jsonrpc.Request)
    assert not entry.is_notification
    assert entry.id is None


@pytest.mark.parametrize(
    "req_id",
    ["abc", "", "ünï\u2603", "1", 0, -1, 42, 2**63, 2**64 + 1, -(10**30), 1.5, -0.25, 1e300, None],
    ids=repr,
)
def test_every_legal_id_is_echoed_exactly(req_id: Any) -> None:
    raw = json.dumps({"jsonrpc": "2.0", "method": "A.a", "id": req_id})
    entry = parse_one(raw)
    assert isinstance(entry, jsonrpc.Request)
    assert entry.id == req_id
    assert type(entry.id) is type(req_id)

    for response in (jsonrpc.result(entry.id, {"ok": True}),
                     jsonrpc.error(entry.id, NotFound("gone"))):
        decoded = json.loads(jsonrpc.encode(response))
        assert decoded["id"] == req_id
        assert type(decoded["id"]) is type(req_id)


def test_big_integer_id_is_not_rounded_on_the_wire() -> None:
    big = "123456789012345678901234567890"
    entry = parse_one('{"jsonrpc": "2.0", "method": "A.a", "id": ' + big + "}")
    text = jsonrpc.encode(jsonrpc.result(entry.id, {}))
    assert f'"id":{big}' in text


# -- builders -------------------------------------------------------------------------------


def test_result_builder() -> None:
    assert jsonrpc.result(5, {"time": 1.0}) == {"jsonrpc": "2.0", "result": {"time": 1.0}, "id": 5}


def test_error_builder_carries_the_error_data() -> None:
    exc = NotFound("no VM 42", reason="no_vm", object="vm", id="42", extra=[1])
    assert jsonrpc.error("r1", exc) == {
        "jsonrpc": "2.0",
        "error": {
            "code": 5,
            "message": "no VM 42",
            "data": {"name": "NotFound", "reason": "no_vm", "object": "vm", "id": "42",
                     "extra": [1]},
        },
        "id": "r1",
    }


def test_error_data_always_has_a_name() -> None:
    assert jsonrpc.error(1, InvalidRequest("x"))["error"]["data"] == {"name": "InvalidRequest"}


def test_notification_builder_has_no_id() -> None:
    message = jsonrpc.notification("event", {"seq": 1})
    assert message == {"jsonrpc": "2.0", "method": "event", "params": {"seq": 1}}
    assert "id" not in message


def test_encode_is_compact_utf8_and_parses_back() -> None:
    response = [jsonrpc.result(1, {"name": "vm-ü"}), jsonrpc.result(2, {})]
    text = jsonrpc.encode(response)
    assert "ü" in text
    assert " " not in text
    assert json.loads(text) == response


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_encode_refuses_non_json_numbers(value: float) -> None:
    with pytest.raises(ValueError):
        jsonrpc.encode(jsonrpc.result(1, {"x": value}))


# -- text that is not Unicode ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(r'{"jsonrpc": "2.0", "method": "Host.ping", "id": "\ud800"}', id="id"),
        pytest.param(r'{"jsonrpc": "2.0", "method": "VM.\udc00", "id": 1}', id="method"),
        pytest.param(r'{"jsonrpc": "2.0", "method": "A.a", "params": {"d": "x\uDFFF"}, "id": 1}',
                     id="param-upper-case"),
        pytest.param(r'{"jsonrpc": "2.0", "method": "A.a", "params": {"k\uDbFf": 1}, "id": 1}',
                     id="param-key"),
        pytest.param(r'{"jsonrpc": "2.0", "method": "A.a", "params": [[{"a": ["\udabc"]}]], '
                     r'"id": 1}', id="nested"),
        # A high surrogate must be followed by a low one, and only in that order.
        pytest.param(r'{"jsonrpc": "2.0", "method": "A.a", "params": {"x": "\ud83d\u0041"}, '
                     r'"id": 1}', id="high-then-letter"),
        pytest.param(r'{"jsonrpc": "2.0", "method": "A.a", "params": {"x": "\ude00\ud83d"}, '
                     r'"id": 1}', id="low-then-high"),
        pytest.param(r'{"jsonrpc": "2.0", "method": "A.a", "params": {"x": "\ud83d"}, "id": 1}',
                     id="high-at-end"),
        pytest.param(r'[{"jsonrpc": "2.0", "method": "A.a", "id": 1}, '
                     r'{"jsonrpc": "2.0", "method": "\ud800"}]', id="batch"),
        # A str message with a lone surrogate in it (not an escape): from in-process callers.
        pytest.param('{"jsonrpc": "2.0", "method": "A.a", "params": {"x": "\udfff"}, "id": 1}',
                     id="literal"),
        # Bytes that are not UTF-8: an invalid byte, a surrogate encoded as UTF-8 (CESU), and
        # a sequence cut short.
        pytest.param(b'{"jsonrpc": "2.0", "method": "A.a", "id": "\xff"}', id="bytes-ff"),
        pytest.param(b'{"jsonrpc": "2.0", "method": "A.a", "id": "\xed\xa0\x80"}',
                     id="bytes-cesu"),
        pytest.param(b'{"jsonrpc": "2.0", "method": "A.a", "params": {"x": "\xc3"}, "id": 1}',
                     id="bytes-truncated"),
    ],
)
def test_text_that_is_not_unicode_is_a_parse_error(raw: str | bytes) -> None:
    with pytest.raises(ParseError) as caught:
        jsonrpc.parse(raw)
    assert caught.value.reason == "bad_unicode"
    text = jsonrpc.encode(jsonrpc.error(None, caught.value))
    text.encode("utf-8")  # the answer echoes nothing of it and can be sent
    assert json.loads(text)["error"]["code"] == -32700
    assert json.loads(text)["id"] is None


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (r'"\ud83d\ude00"', "\U0001f600"),
        (r'"\uD83D\uDE00"', "\U0001f600"),
        (r'"x\ud7ff\ue000"', "x\ud7ff\ue000"),
        # An escaped backslash followed by "ud800" is text, not an escape.
        (r'"\\ud800"', "\\ud800"),
    ],
)
def test_surrogate_pairs_and_lookalikes_are_unicode(raw: str, value: str) -> None:
    message = '{"jsonrpc": "2.0", "method": "A.a", "params": {"x": ' + raw + '}, "id": 1}'
    for form in (message, message.encode()):
        entry = parse_one(form)
        assert isinstance(entry, jsonrpc.Request)
        assert entry.params == {"x": value}


def test_decode_refuses_a_lone_surrogate() -> None:
    with pytest.raises(UnicodeError):
        jsonrpc.decode(r'["\udead"]')
    assert jsonrpc.decode(r'["\ud83d\ude00"]') == ["\U0001f600"]


@pytest.mark.parametrize("value", ["\ud800", "ok \udfff", {"k\udc00": 1}])
def test_encode_refuses_a_lone_surrogate(value: Any) -> None:
    # It could not be sent as UTF-8: the caller turns it into an error it can send.
    with pytest.raises(ValueError):
        jsonrpc.encode(jsonrpc.result(1, {"x": value}))
