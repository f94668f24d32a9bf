"""Identities and roles of callers, for the transports that do not need a real socket."""

from __future__ import annotations

from typing import Any

from virtnode.config import AccessConfig, Role
from virtnode.rpc.identity import certificate_cn, tls_caller

#: What ``SSLSocket.getpeercert()`` gives for a verified certificate (abridged).
ENGINE_CERT: dict[str, Any] = {
    "subject": ((("organizationName", "Example"),), (("commonName", "engine"),)),
    "issuer": ((("commonName", "host CA"),),),
}
PEER = ("192.0.2.7", 40312)


def test_certificate_cn() -> None:
    assert certificate_cn(ENGINE_CERT) == "engine"
    assert certificate_cn({"subject": ((("organizationName", "Example"),),)}) is None
    assert certificate_cn({}) is None
    assert certificate_cn(None) is None


def test_tls_callers_get_tls_role_by_default() -> None:
    caller = tls_caller(ENGINE_CERT, PEER, AccessConfig())
    assert (caller.identity, caller.role, caller.transport) == ("cn:engine", Role.ADMIN, "tls")
    assert caller.may("write")


def test_reader_cns_only_read() -> None:
    access = AccessConfig(tls_reader_cns=("collector",))
    collector = {"subject": ((("commonName", "collector"),),)}
    caller = tls_caller(collector, PEER, access)
    assert (caller.identity, caller.role) == ("cn:collector", Role.READER)
    assert caller.may("read")
    assert not caller.may("write")
    assert tls_caller(ENGINE_CERT, PEER, access).role is Role.ADMIN


def test_tls_role_applies_to_everyone_else() -> None:
    access = AccessConfig(tls_role=Role.READER)
    assert tls_caller(ENGINE_CERT, PEER, access).role is Role.READER


def test_certificate_without_cn_is_named_by_address() -> None:
    caller = tls_caller({"subject": ()}, PEER, AccessConfig())
    assert (caller.identity, caller.role) == ("tls:192.0.2.7:40312", Role.ADMIN)
