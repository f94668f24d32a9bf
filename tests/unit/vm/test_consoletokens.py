"""One-time console tokens."""

from __future__ import annotations

import pytest

from virtnode.config import Role
from virtnode.errors import PermissionDenied, ResourceExhausted
from virtnode.vm.consoletokens import TokenTable

VM = "6695eb01-f6a4-8304-79aa-97f2502e193f"
OTHER = "00000000-0000-4000-8000-000000000001"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(table: TokenTable, token: str, reason: str, **expect: str) -> None:
    with pytest.raises(PermissionDenied) as caught:
        table.take(token, **expect)
    assert caught.value.reason == reason


def test_a_token_is_taken_once() -> None:
    table = TokenTable(60.0, clock=Clock())
    token, grant = table.issue(VM, "serial", "keep", "uid:0", Role.ADMIN)
    assert table.peek(token) == grant and grant.writer and grant.expires_at == 1060.0
    assert table.take(token) == grant
    refused(table, token, "token_unknown")


def test_a_token_expires_and_says_so() -> None:
    clock = Clock()
    table = TokenTable(60.0, clock=clock)
    token, _ = table.issue(VM, "vnc", "keep", "uid:1000", Role.READER)
    clock.now += 60.0
    refused(table, token, "token_expired")
    clock.now += 61.0
    table.issue(VM, "vnc", "keep", "uid:1000", Role.READER)  # purges
    refused(table, token, "token_unknown")


def test_a_token_shown_for_another_vm_or_kind_is_refused_and_gone() -> None:
    table = TokenTable(60.0, clock=Clock())
    token, _ = table.issue(VM, "serial", "keep", "uid:0", Role.ADMIN)
    refused(table, token, "token_mismatch", vm_id=OTHER)
    refused(table, token, "token_unknown", vm_id=VM)
    token, _ = table.issue(VM, "serial", "keep", "uid:0", Role.ADMIN)
    refused(table, token, "token_mismatch", kind="vnc")


def test_malformed_tokens_and_stopped_vms() -> None:
    table = TokenTable(60.0, clock=Clock())
    refused(table, "../../etc/passwd", "token_unknown")
    token, _ = table.issue(VM, "serial", "keep", "uid:0", Role.ADMIN)
    table.drop_vm(VM)
    refused(table, token, "token_unknown")


def test_tokens_waiting_are_bounded() -> None:
    table = TokenTable(60.0, limit=2, clock=Clock())
    table.issue(VM, "serial", "keep", "uid:0", Role.ADMIN)
    table.issue(VM, "serial", "keep", "uid:0", Role.ADMIN)
    with pytest.raises(ResourceExhausted):
        table.issue(VM, "serial", "keep", "uid:0", Role.ADMIN)
