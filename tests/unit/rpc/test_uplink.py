"""The agent's reading of an upstream's answer to its hello: anything else is refused."""

from __future__ import annotations

import pytest

from virtnode.rpc.uplink import UplinkError, parse_hello_answer


def answer(result: object, **extra: object) -> str:
    import json

    return json.dumps({"jsonrpc": "2.0", "id": "hello", "result": result, **extra})


def test_a_good_answer() -> None:
    assert parse_hello_answer(answer({"epoch": "e1", "since": 12})) == {
        "epoch": "e1", "since": 12}
    assert parse_hello_answer(answer({"since": None})) == {"epoch": None, "since": None}


@pytest.mark.parametrize(("text", "match"), [
    ("not json", "not JSON"),
    ('{"jsonrpc": "2.0", "id": 7, "result": {}}', "other than the answer"),
    ('{"jsonrpc": "2.0", "method": "event", "params": {}}', "other than the answer"),
    ('{"jsonrpc": "2.0", "id": "hello", "error": {"code": 1}}', "refused the hello"),
    ('[1, 2]', "other than the answer"),
    (answer([1]), "no result object"),
    (answer({"epoch": "e", "since": -1}), "since must be"),
    (answer({"epoch": "e", "since": "12"}), "since must be"),
    (answer({"epoch": "e", "since": True}), "since must be"),
    (answer({"epoch": 5, "since": 1}), "epoch must be"),
    (answer({"epoch": "x" * 65, "since": 1}), "epoch must be"),
    (answer({"since": 3}), "needs the epoch"),
])
def test_bad_answers_are_refused(text: str, match: str) -> None:
    with pytest.raises(UplinkError, match=match):
        parse_hello_answer(text)
