"""Certificates for TLS tests, made with the ``openssl`` command.

:func:`make_pki` makes the host's CA, a server certificate signed by it (with the IP and
DNS subject alternative names asked for), a client certificate for the engine, and an
unrelated CA with a client certificate of its own (same CN) that the agent must refuse.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.subproc import run

#: The settings openssl is given (-config, -extfile): the host's openssl.cnf plays no part.
_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = @server_names
[server_names]
"""

_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
DAYS = "2"


@dataclass(frozen=True)
class CertKey:
    """A certificate and its private key, PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """The files :func:`make_pki` made."""

    directory: Path
    ca: Path
    ca_key: Path
    server: CertKey
    client: CertKey
    other_ca: Path
    other_client: CertKey

    @property
    def tls_section(self) -> dict[str, str]:
        """The agent's ``[tls]`` configuration for these files."""
        return {"cert_file": str(self.server.cert), "key_file": str(self.server.key),
                "ca_file": str(self.ca)}

    def client_tls(self, client: CertKey | None, *, ca: Path | None = None,
                   check_hostname: bool = True) -> ssl.SSLContext:
        """A client context presenting ``client`` (None: no certificate), trusting ``ca``
        (default: the host's CA)."""
        from virtnode.client import tls_context

        return tls_context(str(ca or self.ca), str(client.cert) if client else None,
                           str(client.key) if client else None, check_hostname=check_hostname)

    async def issue_client(self, name: str, cn: str) -> CertKey:
        """Another client certificate from the host's CA, with subject CN ``cn``."""
        return await _issue(self.directory, name, cn, usage="client", ca=self.ca,
                            ca_key=self.ca_key)


async def _openssl(*args: str | Path) -> None:
    (await run("openssl", *args, timeout=60.0)).check()


async def _make_ca(directory: Path, name: str, cn: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    await _openssl("req", "-x509", "-new", *_NEW_KEY, "-keyout", key, "-out", cert,
                   "-days", DAYS, "-subj", f"/CN={cn}", "-config", directory / "openssl.cnf",
                   "-extensions", "ca")
    return cert, key


async def _issue(directory: Path, name: str, cn: str, *, usage: str, ca: Path,
                 ca_key: Path) -> CertKey:
    pair = CertKey(directory / f"{name}.pem", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    config = directory / "openssl.cnf"
    await _openssl("req", "-new", *_NEW_KEY, "-keyout", pair.key, "-out", csr,
                   "-subj", f"/CN={cn}", "-config", config)
    await _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
                   "-set_serial", f"0x{secrets.randbits(63):x}", "-days", DAYS,
                   "-out", pair.cert, "-extfile", config, "-extensions", usage)
    return pair


def _write_config(directory: Path, text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "openssl.cnf").write_text(text)


async def make_pki(directory: Path, *, server_ips: Sequence[str] = ("127.0.0.1",),
                   server_names: Sequence[str] = ("localhost",),
                   client_cn: str = "engine") -> Pki:
    """Make the certificates in ``directory`` (created); raises AssertionError if openssl
    fails. The server certificate's subject alternative names are ``server_ips`` (IP
    addresses) and ``server_names`` (DNS names)."""
    names = [f"IP.{i} = {ip}" for i, ip in enumerate(server_ips, 1)]
    names += [f"DNS.{i} = {name}" for i, name in enumerate(server_names, 1)]
    await asyncio.to_thread(_write_config, directory, _OPENSSL_CONFIG + "\n".join(names) + "\n")
    ca, ca_key = await _make_ca(directory, "ca", "virtnode test CA")
    server = await _issue(directory, "server", "virtnode agent", usage="server", ca=ca,
                          ca_key=ca_key)
    client = await _issue(directory, "client", client_cn, usage="client", ca=ca, ca_key=ca_key)
    other_ca, other_key = await _make_ca(directory, "other-ca", "unrelated CA")
    other_client = await _issue(directory, "other-client", client_cn, usage="client",
                                ca=other_ca, ca_key=other_key)
    return Pki(directory, ca, ca_key, server, client, other_ca, other_client)
