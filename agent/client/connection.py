"""A client for the virtnode API, for engines, scripts and the CLI.

:class:`Client` is the asyncio client: calls, notifications and batches over one
WebSocket, with responses matched by id so calls can run concurrently, and pushed
notifications (events) readable with :meth:`Client.notifications`. :class:`SyncClient`
wraps it for code that is not async.

URLs: ``unix:/run/virtnode/virtnode.sock`` (the default), ``ws://HOST:PORT/rpc``,
``wss://HOST:PORT/rpc``, or ``tcp://HOST:PORT`` and ``tls://HOST:PORT`` as short forms of
``ws://HOST:PORT/rpc`` and ``wss://HOST:PORT/rpc``. The environment variable ``VIRTNODE_URL``
sets the default.

TLS: an agent's tls:// listener wants a client certificate its CA signed. Build a context
with :func:`tls_context` (the CA that signed the agent's certificate, and this client's
certificate and key) and pass it as ``tls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from virtnode.util.jsontypes import JsonObject

ResultCheck = Callable[[str, Any], None]

#: Where clients connect unless told otherwise; ``VIRTNODE_URL`` overrides it.
DEFAULT_URL = os.environ.get("VIRTNODE_URL") or "unix:/run/virtnode/virtnode.sock"


class ClientError(Exception):
    """Base class of the errors this client raises."""


class ConnectionLost(ClientError):
    """The agent could not be reached, or the connection closed before an answer."""


class RemoteError(ClientError):
    """The agent answered with an error object."""

    def __init__(self, error: JsonObject) -> None:
        self.error = error
        self.code: int = error.get("code", 0)
        self.message: str = error.get("message", "")
        data = error.get("data")
        self.data: JsonObject = data if isinstance(data, dict) else {}
        super().__init__(f"{self.name}: {self.message}")

    @property
    def name(self) -> str:
        """The error's vocabulary word (``NotFound``, ``InvalidParams``...)."""
        return str(self.data.get("name", "Unknown"))

    @property
    def reason(self) -> str | None:
        return self.data.get("reason")


#: The WebSocket scheme of each URL scheme the client takes.
_SCHEMES = {"tcp": "ws", "ws": "ws", "tls": "wss", "wss": "wss"}


def endpoint(url: str) -> tuple[str, str | None]:
    """Split a client URL into (WebSocket URL, unix socket path or None).

    Raises ``ValueError`` for a URL the client cannot use.
    """
    if url.startswith("unix:"):
        return "ws://localhost/rpc", url.removeprefix("unix:")
    parts = urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"unsupported URL {url!r}: use unix:/PATH, ws://, wss://, tcp:// "
                         "or tls://")
    if parts.scheme in ("tcp", "tls") or parts.path in ("", "/"):
        return f"{scheme}://{parts.netloc}/rpc", None
    return url, None


def tls_context(ca_file: str | None = None, cert_file: str | None = None,
                key_file: str | None = None, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client TLS context for wss:// (and tls://) URLs.

    ``ca_file`` is the CA bundle the agent's certificate must chain to (the system's CAs
    when None); ``cert_file`` and ``key_file`` are this client's certificate and key (the
    key may be in ``cert_file``). The agent's certificate must name the host or IP address
    in the URL, unless ``check_hostname`` is false: then only its chain is checked.
    Raises ``ValueError`` naming a file that cannot be used.
    """
    if key_file and not cert_file:
        raise ValueError("a client key needs its certificate")
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"CA file {ca_file}: {_why(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file, password=_no_password)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ValueError(f"client certificate {cert_file}"
                             f"{f' and key {key_file}' if key_file else ''}: {_why(exc)}"
                             ) from None
    return context


def _no_password() -> str:
    # Without a callback OpenSSL would prompt for a passphrase on the terminal.
    raise ValueError("the key is encrypted")


def _why(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "the key is not the certificate's"
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


class Client:
    """An asyncio client on one WebSocket. Use :meth:`connect` to make one."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse,
                 result_check: ResultCheck | None = None) -> None:
        self._session = session
        self._ws = ws
        self._result_check = result_check
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._notifications: asyncio.Queue[JsonObject | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def connect(cls, url: str = DEFAULT_URL, *, timeout: float = 10.0,
                      max_msg_size: int = 64 * 1024 * 1024,
                      result_check: ResultCheck | None = None,
                      tls: ssl.SSLContext | None = None) -> Client:
        """Open a WebSocket to the agent at ``url``.

        ``result_check(method, result)`` is called on every successful result (the test
        suite validates results against the schema with it). ``tls`` (see
        :func:`tls_context`) is used for wss:// URLs; without it they use the system's CAs
        and no client certificate. Raises :class:`ConnectionLost` (also when the TLS
        handshake fails), and ``ValueError`` for a URL it cannot use or ``tls`` with a URL
        that is not wss://.
        """
        ws_url, unix_path = endpoint(url)
        if tls is not None and not ws_url.startswith("wss:"):
            raise ValueError(f"{url}: a TLS context needs a wss:// or tls:// URL")
        connector = aiohttp.UnixConnector(path=unix_path) if unix_path else None
        session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, connect=timeout)
        )
        try:
            ws = await session.ws_connect(
                ws_url, timeout=aiohttp.ClientWSTimeout(ws_close=timeout),
                max_msg_size=max_msg_size, autoping=True, ssl=tls if tls is not None else True,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            await session.close()
            raise ConnectionLost(f"cannot connect to {url}: {exc}") from None
        client = cls(session, ws, result_check)
        client._reader = asyncio.create_task(client._read(), name="virtnode-client-reader")
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def call(self, method: str, params: JsonObject | None = None, *,
                   timeout: float | None = None) -> JsonObject:
        """Call ``method`` and return its result.

        Raises :class:`RemoteError` for an error answer, :class:`ConnectionLost` if the
        connection ends first, and ``TimeoutError`` after ``timeout`` seconds.
        """
        request_id, future = self._register(method)
        await self._send(_request(method, params, request_id))
        async with asyncio.timeout(timeout):
            return await self._result(method, future)

    async def notify(self, method: str, params: JsonObject | None = None) -> None:
        """Send a notification: no answer comes back, not even an error."""
        message: JsonObject = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await self._send(message)

    async def batch(self, calls: Sequence[tuple[str, JsonObject | None]], *,
                    timeout: float | None = None) -> list[JsonObject | RemoteError]:
        """Send several calls in one batch; returns results or errors in call order."""
        registered = [self._register(method) for method, _ in calls]
        await self._send([
            _request(method, params, request_id)
            for (method, params), (request_id, _) in zip(calls, registered, strict=True)
        ])
        answers: list[JsonObject | RemoteError] = []
        async with asyncio.timeout(timeout):
            for (method, _), (_, future) in zip(calls, registered, strict=True):
                try:
                    answers.append(await self._result(method, future))
                except RemoteError as exc:
                    answers.append(exc)
        return answers

    async def notifications(self) -> AsyncIterator[JsonObject]:
        """Yield the ``params`` of every notification pushed by the agent, with its method.

        Each item is ``{"method": ..., "params": {...}}``; the iteration ends when the
        connection closes.
        """
        while (item := await self._notifications.get()) is not None:
            yield item

    async def close(self) -> None:
        """Close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._session.close()

    def _register(self, method: str) -> tuple[int, asyncio.Future[Any]]:
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (method, future)
        return request_id, future

    async def _send(self, message: Any) -> None:
        if self._ws.closed:
            raise ConnectionLost("the connection is closed")
        await self._ws.send_str(json.dumps(message, separators=(",", ":")))

    async def _result(self, method: str, future: asyncio.Future[Any]) -> JsonObject:
        response = await future
        if "error" in response:
            raise RemoteError(response["error"])
        value: JsonObject = response["result"]
        if self._result_check is not None:
            self._result_check(method, value)
        return value

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self._dispatch(json.loads(msg.data))
        finally:
            reason = f"connection closed (code {self._ws.close_code})"
            for _, future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionLost(reason))
            self._pending.clear()
            self._notifications.put_nowait(None)

    def _dispatch(self, message: Any) -> None:
        for item in message if isinstance(message, list) else [message]:
            if not isinstance(item, dict):
                continue
            if "method" in item:
                self._notifications.put_nowait(
                    {"method": item["method"], "params": item.get("params", {})}
                )
                continue
            request_id = item.get("id")
            entry = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
            if entry is not None:
                entry[1].set_result(item)
            elif item.get("id") is None and "error" in item:
                # The agent could not tell which request failed: fail them all.
                for _, future in self._pending.values():
                    if not future.done():
                        future.set_result(item)
                self._pending.clear()


def _request(method: str, params: JsonObject | None, request_id: int) -> JsonObject:
    message: JsonObject = {"jsonrpc": "2.0", "method": method, "id": request_id}
    if params is not None:
        message["params"] = params
    return message


class SyncClient:
    """A blocking wrapper around :class:`Client` with its own event loop."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 10.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self._url = url
        self._timeout = timeout
        self._tls = tls
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None

    def __enter__(self) -> SyncClient:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        """Connect; raises :class:`ConnectionLost`."""
        self._loop = asyncio.new_event_loop()
        self._client = self._loop.run_until_complete(
            Client.connect(self._url, timeout=self._timeout, tls=self._tls)
        )

    def call(self, method: str, params: JsonObject | None = None, *,
             timeout: float | None = None) -> JsonObject:
        """Call ``method``; raises like :meth:`Client.call`."""
        loop, client = self._require()
        return loop.run_until_complete(client.call(method, params, timeout=timeout))

    def batch(self, calls: Sequence[tuple[str, JsonObject | None]]
              ) -> list[JsonObject | RemoteError]:
        loop, client = self._require()
        return loop.run_until_complete(client.batch(calls))

    def close(self) -> None:
        """Close the connection and the loop. Idempotent."""
        if self._loop is None:
            return
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._client.close())
        self._loop.close()
        self._loop = self._client = None

    def _require(self) -> tuple[asyncio.AbstractEventLoop, Client]:
        if self._loop is None or self._client is None:
            raise ConnectionLost("the client is not open")
        return self._loop, self._client
