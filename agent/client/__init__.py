"""Client side: the API client library, the ``virtnode`` command and its views.

Engines and scripts use the library from here: ``from virtnode.client import Client``.
"""

from virtnode.client.connection import (
    DEFAULT_URL,
    Client,
    ClientError,
    ConnectionLost,
    RemoteError,
    SyncClient,
    endpoint,
    tls_context,
)

__all__ = [
    "DEFAULT_URL",
    "Client",
    "ClientError",
    "ConnectionLost",
    "RemoteError",
    "SyncClient",
    "endpoint",
    "tls_context",
]
