"""Posting frames to the callback server from async code, and fetching payload blobs.

The async twin of :mod:`wove.backend.client`: the same protocol (:mod:`wove.backend.wire`) over asyncio streams,
never importing aiohttp. A connection serves one run's frames; an event loop that runs payloads for as long as it
lives (an async task-system worker) calls :func:`keep_connections` so runs share keep-alive connections, and
:func:`close_connections` when it shuts down. Retries, deadlines and uploads follow :mod:`wove.backend.delivery`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import weakref
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

from wove.backend.codec import EncodedFrame, encode_frame
from wove.backend.delivery import (
    STREAM_CHUNK,
    Attempts,
    Exchange,
    Target,
    client_ssl_context,
    deadline_seconds,
    describe,
    logger,
    parse_retry_after,
    parse_target,
    refusal_reason,
    refuse_untrusted,
    upload_part,
    upload_plan,
)
from wove.backend.wire import READ_SIZE, Answer, host_header, request_parts
from wove.errors import CallbackError

__all__ = ["AsyncCallbackConnection", "close_connections", "keep_connections", "post_event_async"]

#: Idle connections kept per event loop and callback origin (an async worker may run this many payloads at once).
POOL_SIZE = 64

T = TypeVar("T")

if sys.version_info >= (3, 11):

    async def _within(seconds: float, awaitable: Awaitable[T]) -> T:
        """``awaitable`` under a deadline; unlike ``wait_for`` before 3.12, never swallows a cancellation."""
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - Python 3.10

    async def _within(seconds: float, awaitable: Awaitable[T]) -> T:
        return await asyncio.wait_for(awaitable, seconds)


class _Stream:
    """One keep-alive HTTP/1.1 connection on asyncio streams."""

    __slots__ = ("host", "open", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host
        self.open = True

    @classmethod
    async def connect(cls, target: Target, unix_socket: str | None = None) -> _Stream:
        """Connect to ``unix_socket`` when one is given and takes the connection, else to the target over TCP."""
        ssl = client_ssl_context() if target.scheme == "https" else None
        hostname = target.host if ssl else None
        host = host_header(target.scheme, target.host, target.port)
        if unix_socket is not None and hasattr(asyncio, "open_unix_connection"):
            try:
                reader, writer = await asyncio.open_unix_connection(
                    unix_socket, ssl=ssl, server_hostname=hostname, limit=READ_SIZE
                )
                return cls(reader, writer, host)
            except OSError as exc:
                logger().debug("callback socket %s not reachable (%s); connecting over TCP", unix_socket, exc)
        reader, writer = await asyncio.open_connection(
            target.host, target.port, ssl=ssl, server_hostname=hostname, limit=READ_SIZE
        )
        return cls(reader, writer, host)

    def close(self) -> None:
        self.open = False
        self.writer.close()

    async def send(self, method: str, path: str, headers: Mapping[str, str], body: EncodedFrame | None) -> None:
        parts = request_parts(method, path, self.host, headers, body)
        if len(parts) == 1:
            self.writer.write(parts[0])
        else:
            for part in parts:
                flat = memoryview(part).cast("B")
                for start in range(0, flat.nbytes, STREAM_CHUNK):
                    self.writer.write(flat[start : start + STREAM_CHUNK])
                    await self.writer.drain()  # never buffer a whole large body in the transport
        await self.writer.drain()

    async def answer(self) -> Answer:
        """Read one final answer (see :meth:`wove.backend.client._Wire.answer`)."""
        while True:
            answer = Answer()
            try:
                while not answer.take(await self.reader.read(READ_SIZE)):
                    pass
            except OSError:
                self.open = False
                raise
            if not answer.keep_alive:
                self.open = False
            if answer.status >= 200:
                return answer


Pool = dict[tuple[str, str, int, str | None], list[_Stream]]

#: Idle connections of the loops that keep them (see :func:`keep_connections`), by callback origin.
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pool] = weakref.WeakKeyDictionary()


def keep_connections() -> None:
    """Let runs on the running loop share keep-alive connections until :func:`close_connections`.

    Only for a loop that outlives its runs and closes the connections before it ends: a connection left open
    when its loop closes cannot be closed properly any more.
    """
    _pools.setdefault(asyncio.get_running_loop(), {})


def _pool() -> Pool | None:
    return _pools.get(asyncio.get_running_loop())


async def close_connections() -> None:
    """Close the running loop's idle connections and stop keeping them (an async worker shutting down)."""
    pool = _pools.pop(asyncio.get_running_loop(), None) or {}
    streams = [stream for idle in pool.values() for stream in idle]
    for stream in streams:
        stream.close()
    for stream in streams:
        with contextlib.suppress(Exception):
            await stream.writer.wait_closed()


class AsyncCallbackConnection:
    """A keep-alive connection to one callback URL, taken from (and given back to) its event loop's pool.

    ``unix_socket``: as for :class:`wove.backend.client.CallbackConnection`.
    """

    def __init__(self, callback_url: str, *, deadline: float | None = None, unix_socket: str | None = None) -> None:
        self.url = callback_url
        self._target = parse_target(callback_url)
        self._unix_socket = unix_socket
        self._key = (*self._target[:3], unix_socket)
        self._deadline = deadline_seconds(deadline)
        self._stream: _Stream | None = None

    async def __aenter__(self) -> AsyncCallbackConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Give the connection back to the loop's pool, or close it (no pool, a full one, or a broken stream)."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        pool = _pool()
        idle = pool.setdefault(self._key, []) if pool is not None else None
        if idle is not None and stream.open and len(idle) < POOL_SIZE:
            idle.append(stream)
            return
        stream.close()
        with contextlib.suppress(Exception):
            await stream.writer.wait_closed()

    async def post(self, frame: Mapping[str, Any], *, deadline: float | None = None) -> None:
        """Deliver one event frame, retrying until the deadline; frames above the server's limit go in parts."""
        exchange = Exchange(self.url, describe(frame), frame)
        encoded, path = encode_frame(frame), self._target.path
        part = upload_part(encoded, path, None, exchange)
        for _ in range(3):  # whole, in parts, in the smaller parts the server asked for
            try:
                if part is None:
                    await self._request("POST", path, encoded, exchange, deadline)
                else:
                    for target, body, headers in upload_plan(path, encoded, part):
                        await self._request("POST", target, body, exchange, deadline, headers)
                return
            except CallbackError as exc:
                smaller = upload_part(encoded, path, exc, exchange)
                if smaller is None or (part is not None and smaller >= part):
                    raise
                part = smaller

    async def fetch_blob(self, ref: str) -> bytearray:
        """Download a payload blob stored on the callback server for this run."""
        path = f"{self._target.path.split('?', 1)[0].rstrip('/')}/blobs/{quote(ref, safe='')}"
        exchange = Exchange(self.url, f"payload blob {ref!r}", None)
        blob = await self._request("GET", path, None, exchange, None)
        assert blob is not None
        return blob

    async def _connection(self) -> _Stream:
        if self._stream is None:
            pool = _pool()
            idle = pool.get(self._key) if pool is not None else None
            while idle:
                stream = idle.pop()
                if stream.open and not stream.reader.at_eof():
                    self._stream = stream
                    return stream
                stream.close()
            self._stream = await _Stream.connect(self._target, self._unix_socket)
        return self._stream

    def _drop(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    async def _request(
        self,
        method: str,
        path: str,
        encoded: EncodedFrame | None,
        exchange: Exchange,
        deadline: float | None,
        extra: Mapping[str, str] | None = None,
    ) -> bytearray | None:
        attempts = Attempts(self._deadline if deadline is None else deadline)
        pool = _pool()
        fresh_retry = self._stream is not None or bool(pool and pool.get(self._key))  # a kept one may have closed
        headers = extra or {}
        while True:
            retry_after = None
            try:
                answer = await _within(attempts.timeout(), self._exchange(method, path, headers, encoded))
                if not self._stream or not self._stream.open:
                    self._drop()
                status = answer.status
                if 200 <= status < 300:
                    return answer.body if method == "GET" else None
                if status != 429 and status < 500:
                    exchange.refused(status, bytes(answer.body))
                    return None
                retry_after = parse_retry_after(answer.headers.get("retry-after"))
                attempts.last = f"HTTP {status} ({refusal_reason(bytes(answer.body)) or 'no reason'})"
                attempts.status = status
            except asyncio.CancelledError:
                self._drop()  # a request cut short leaves the connection in no known state
                raise
            except (OSError, asyncio.TimeoutError) as exc:
                self._drop()
                refuse_untrusted(exchange, exc)
                attempts.last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if fresh_retry and not isinstance(exc, asyncio.TimeoutError):
                    fresh_retry = False
                    continue
            fresh_retry = False
            wait = attempts.delay(retry_after)
            if wait is None:
                raise exchange.gave_up(attempts)
            logger().debug("retrying %s in %.3fs after %s", exchange.what, wait, attempts.last)
            await asyncio.sleep(wait)

    async def _exchange(
        self, method: str, path: str, headers: Mapping[str, str], encoded: EncodedFrame | None
    ) -> Answer:
        stream = await self._connection()
        # The server may answer early (e.g. 413) and close while the body is still going: read that answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await stream.send(method, path, headers, encoded)
        return await stream.answer()


async def post_event_async(callback_url: str, frame: Mapping[str, Any], *, timeout: float | None = None) -> None:
    """Async twin of :func:`post_event`: the same retries, refusals and deadline (``timeout``)."""
    async with AsyncCallbackConnection(callback_url, deadline=timeout) as conn:
        await conn.post(frame)
