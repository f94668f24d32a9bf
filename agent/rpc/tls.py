"""The server side of mutual TLS: the context tls:// listeners serve with.

Clients must present a certificate that chains to the configured CA (``CERT_REQUIRED``),
so a peer without one, or with one from another CA, fails the handshake and never
reaches the HTTP application. TLS 1.2 is the oldest version accepted.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from virtnode.config import ConfigError, TlsConfig


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """Build the context of tls:// listeners, reading the files ``config`` names.

    Blocks on file reads (run it in a thread). Raises :class:`ConfigError` naming the
    ``tls.*`` key whose file is unreadable, is not PEM, or whose key does not match.
    """
    cert_text = _read("tls.cert_file", config.cert_file)
    _read("tls.key_file", config.key_file)
    ca_text = _read("tls.ca_file", config.ca_file)
    _check_certificate(config.cert_file, cert_text)
    # Not create_default_context(): without a CA argument it would also trust the
    # system's CAs, and then any certificate they signed would be an engine.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    _load_key(context, config)
    try:
        context.load_verify_locations(cadata=ca_text)
    except ssl.SSLError:
        raise ConfigError(f"tls.ca_file: {config.ca_file} holds no PEM certificate") from None
    return context


def _read(key: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not a PEM file") from None


def _check_certificate(path: str, text: str) -> None:
    # load_cert_chain() cannot say which of its two files it rejects; this can.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except ssl.SSLError:
        raise ConfigError(f"tls.cert_file: {path} holds no PEM certificate") from None


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Without a callback OpenSSL would prompt for the passphrase on the terminal.
    raise _EncryptedKey


def _load_key(context: ssl.SSLContext, config: TlsConfig) -> None:
    key = f"tls.key_file: {config.key_file}"
    try:
        context.load_cert_chain(config.cert_file, config.key_file, password=_no_password)
    except _EncryptedKey:
        raise ConfigError(f"{key} is encrypted; the agent needs an unencrypted key") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{key} is not the key of the certificate in tls.cert_file "
                              f"({config.cert_file})") from None
        raise ConfigError(f"{key} holds no PEM private key") from None
    except OSError as exc:  # a file went away since it was read
        raise ConfigError(f"{key}: {exc.strerror}") from None
