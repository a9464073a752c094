"""Posting frames to the callback server from synchronous code, and fetching payload blobs.

The standard library's ``http.client`` on a keep-alive connection pooled per thread: a worker process pays for
neither aiohttp's import nor a new TCP connection per frame, and a long-lived worker reuses its connection across
runs. Retries, deadlines and uploads follow :mod:`wove.backend.delivery`.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from wove.backend.codec import EncodedFrame, encode_frame
from wove.backend.delivery import (
    Attempts,
    Exchange,
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
from wove.errors import CallbackError

__all__ = ["CallbackConnection", "post_event"]


class _OneSend(http.client.HTTPConnection):
    """Sends a request's header block and a small body in one write.

    ``http.client`` writes them separately: two segments, so the server wakes up twice per frame. Only public
    ``HTTPConnection`` methods are used; ``send`` is held back while ``endheaders`` emits the header block.
    """

    _held: list[Any] | None = None

    def send(self, data: Any) -> None:
        if self._held is not None:
            self._held.append(data)
            return
        super().send(data)

    def send_request(self, method: str, path: str, headers: Mapping[str, str], parts: list[Any]) -> None:
        self.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            self.putheader(name, value)
        self._held = []
        try:
            self.endheaders()
        finally:
            head, self._held = b"".join(self._held), None
        if parts and sum(len(part) for part in parts) <= _COALESCE:
            self.send(head + b"".join(parts))
            parts = []
        elif parts and len(parts[0]) <= _COALESCE:
            self.send(head + parts[0])
            parts = parts[1:]
        else:
            self.send(head)
        for part in parts:
            self.send(part)


class _HTTPSOneSend(_OneSend, http.client.HTTPSConnection):
    pass


#: Bodies up to this size go out in the same write as the request headers.
_COALESCE = 16 * 1024


class _Pool(dict[tuple[str, str, int], _OneSend]):
    """Idle connections of one thread, closed when the thread ends."""

    def __del__(self) -> None:
        for conn in self.values():
            conn.close()


_idle = threading.local()


def _pool() -> _Pool:
    pool: _Pool | None = getattr(_idle, "pool", None)
    if pool is None:
        pool = _idle.pool = _Pool()
    return pool


class CallbackConnection:
    """A keep-alive connection to one callback URL; idle connections are pooled per thread and reused across runs."""

    def __init__(self, callback_url: str, *, deadline: float | None = None) -> None:
        self.url = callback_url
        self._target = parse_target(callback_url)
        self._key = self._target[:3]
        self._deadline = deadline_seconds(deadline)
        self._conn = _pool().pop(self._key, None)

    def __enter__(self) -> CallbackConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Return the connection to this thread's pool."""
        if self._conn is not None:
            old = _pool().pop(self._key, None)
            if old is not None:
                old.close()
            _pool()[self._key] = self._conn
            self._conn = None

    def post(self, frame: Mapping[str, Any], *, deadline: float | None = None) -> None:
        """Deliver one event frame, retrying until the deadline; frames above the server's limit go in parts."""
        exchange = Exchange(self.url, describe(frame), frame)
        encoded, path = encode_frame(frame), self._target.path
        part = upload_part(encoded, path, None, exchange)
        for _ in range(3):  # whole, in parts, in the smaller parts the server asked for
            try:
                if part is None:
                    self._request("POST", path, encoded, exchange, deadline)
                else:
                    for target, body, headers in upload_plan(path, encoded, part):
                        self._request("POST", target, body, exchange, deadline, headers)
                return
            except CallbackError as exc:
                smaller = upload_part(encoded, path, exc, exchange)
                if smaller is None or (part is not None and smaller >= part):
                    raise
                part = smaller

    def fetch_blob(self, ref: str) -> bytearray:
        """Download a payload blob stored on the callback server for this run."""
        path = f"{self._target.path.rstrip('/')}/blobs/{quote(ref, safe='')}"
        exchange = Exchange(self.url, f"payload blob {ref!r}", None)
        blob = self._request("GET", path, None, exchange, None)
        assert blob is not None
        return blob

    def _connection(self, timeout: float) -> _OneSend:
        if self._conn is None:
            scheme, host, port, _ = self._target
            if scheme == "https":
                ctx = client_ssl_context()
                self._conn = _HTTPSOneSend(host, port, timeout=timeout, context=ctx)
            else:
                self._conn = _OneSend(host, port, timeout=timeout)
        else:
            self._conn.timeout = timeout
            if self._conn.sock is not None:
                self._conn.sock.settimeout(timeout)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _request(
        self,
        method: str,
        path: str,
        encoded: EncodedFrame | None,
        exchange: Exchange,
        deadline: float | None,
        extra: Mapping[str, str] | None = None,
    ) -> bytearray | None:
        attempts = Attempts(self._deadline if deadline is None else deadline)
        fresh_retry = self._conn is not None  # a reused idle connection may have been closed by the server
        headers: dict[str, str] = dict(extra or {})
        parts: list[Any] = []
        if encoded is not None:
            headers.update({"Content-Type": encoded.content_type, "Content-Length": str(encoded.size)})
            parts = encoded.parts
        while True:
            retry_after = None
            try:
                conn = self._connection(attempts.timeout())
                # The server may answer early (e.g. 413) and close while the body is still going: read that answer.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    conn.send_request(method, path, headers, parts)
                response = conn.getresponse()
                status = response.status
                if status == 200 and method == "GET":
                    return _read_exact(response)
                data = response.read()
                if 200 <= status < 300:
                    return None
                if status != 429 and status < 500:
                    exchange.refused(status, data)
                    return None
                retry_after = parse_retry_after(response.getheader("Retry-After"))
                attempts.last, attempts.status = f"HTTP {status} ({refusal_reason(data) or 'no reason'})", status
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                refuse_untrusted(exchange, exc)
                attempts.last = f"{type(exc).__name__}: {exc}"
                if fresh_retry:
                    fresh_retry = False
                    continue
            fresh_retry = False
            wait = attempts.delay(retry_after)
            if wait is None:
                raise exchange.gave_up(attempts)
            logger().debug("retrying %s in %.3fs after %s", exchange.what, wait, attempts.last)
            time.sleep(wait)


def _read_exact(response: http.client.HTTPResponse) -> bytearray:
    length = response.length
    if length is None:
        return bytearray(response.read())
    buf = bytearray(length)
    with memoryview(buf) as view:
        done = 0
        while done < length:
            got = response.readinto(view[done:])
            if not got:
                raise http.client.IncompleteRead(bytes(view[:done]), length - done)
            done += got
    return buf


def post_event(callback_url: str, frame: Mapping[str, Any], *, timeout: float | None = None) -> None:
    """Post one event frame to a callback URL.

    ``timeout`` bounds the whole delivery, retries included (default ``WOVE_POST_DEADLINE``, 120 s). Raises
    :class:`CallbackError` when the server refuses the frame or stays unreachable until then.
    """
    with CallbackConnection(callback_url, deadline=timeout) as conn:
        conn.post(frame)
