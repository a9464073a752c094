"""Posting frames to the callback server from async code (aiohttp), and fetching payload blobs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from wove.backend.codec import EncodedFrame, encode_frame
from wove.backend.delivery import (
    STREAM_CHUNK,
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
from wove.backend.streams import read_stream, slices
from wove.errors import BackendUnavailableError, CallbackError

if TYPE_CHECKING:
    import aiohttp

__all__ = ["AsyncCallbackConnection", "post_event_async"]


def _aiohttp() -> Any:
    try:
        import aiohttp
    except ImportError as exc:
        raise BackendUnavailableError("aiohttp is needed for async callbacks: pip install 'wove[dispatch]'") from exc
    return aiohttp


class AsyncCallbackConnection:
    """The async twin of :class:`CallbackConnection`, on an aiohttp session (its own unless one is given)."""

    def __init__(
        self, callback_url: str, *, deadline: float | None = None, session: aiohttp.ClientSession | None = None
    ) -> None:
        self.url = callback_url
        self._target = parse_target(callback_url)
        self._deadline = deadline_seconds(deadline)
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> AsyncCallbackConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def post(self, frame: Mapping[str, Any], *, deadline: float | None = None) -> None:
        """Deliver one event frame, retrying until the deadline; frames above the server's limit go in parts."""
        exchange = Exchange(self.url, describe(frame), frame)
        encoded = encode_frame(frame)
        part = upload_part(encoded, self.url, None, exchange)
        for _ in range(3):
            try:
                if part is None:
                    await self._request("POST", self.url, encoded, exchange, deadline)
                else:
                    for target, body, headers in upload_plan(self.url, encoded, part):
                        await self._request("POST", target, body, exchange, deadline, headers)
                return
            except CallbackError as exc:
                smaller = upload_part(encoded, self.url, exc, exchange)
                if smaller is None or (part is not None and smaller >= part):
                    raise
                part = smaller

    async def fetch_blob(self, ref: str) -> bytearray:
        """Download a payload blob stored on the callback server for this run."""
        base = self.url.split("?", 1)[0].rstrip("/")
        exchange = Exchange(self.url, f"payload blob {ref!r}", None)
        blob = await self._request("GET", f"{base}/blobs/{quote(ref, safe='')}", None, exchange, None)
        assert blob is not None
        return blob

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            aiohttp = _aiohttp()
            ssl_context = client_ssl_context() if self._target.scheme == "https" else None
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4, ssl=ssl_context or True))
        return self._session

    async def _request(
        self,
        method: str,
        url: str,
        encoded: EncodedFrame | None,
        exchange: Exchange,
        deadline: float | None,
        extra: Mapping[str, str] | None = None,
    ) -> bytearray | None:
        import asyncio

        aiohttp = _aiohttp()
        attempts = Attempts(self._deadline if deadline is None else deadline)
        session = self._client()
        while True:
            retry_after = None
            headers: dict[str, str] = dict(extra or {})
            data: Any = None
            if encoded is not None:
                headers.update({"Content-Type": encoded.content_type, "Content-Length": str(encoded.size)})
                if encoded.size and len(encoded.parts) == 1 and encoded.size <= STREAM_CHUNK:
                    data = encoded.parts[0]
                elif encoded.size:
                    data = slices(encoded.parts, STREAM_CHUNK)  # a new generator per attempt
            timeout = aiohttp.ClientTimeout(sock_connect=attempts.timeout(), sock_read=attempts.timeout())
            try:
                async with session.request(method, url, data=data, headers=headers, timeout=timeout) as response:
                    status = response.status
                    if status == 200 and method == "GET":
                        return await read_stream(response.content, response.content_length, 1 << 62)
                    answer = await response.read()
                    if 200 <= status < 300:
                        return None
                    if status != 429 and status < 500:
                        exchange.refused(status, answer)
                        return None
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                    attempts.last, attempts.status = f"HTTP {status} ({refusal_reason(answer) or 'no reason'})", status
            except (OSError, asyncio.TimeoutError, aiohttp.ClientError, ValueError) as exc:
                refuse_untrusted(exchange, exc)
                attempts.last = f"{type(exc).__name__}: {exc}"
            wait = attempts.delay(retry_after)
            if wait is None:
                raise exchange.gave_up(attempts)
            logger().debug("retrying %s in %.3fs after %s", exchange.what, wait, attempts.last)
            await asyncio.sleep(wait)


async def post_event_async(
    callback_url: str,
    frame: Mapping[str, Any],
    *,
    timeout: float | None = None,
    session: aiohttp.ClientSession | None = None,
) -> None:
    """Async twin of :func:`post_event`; pass ``session`` to reuse its connections."""
    async with AsyncCallbackConnection(callback_url, deadline=timeout, session=session) as conn:
        await conn.post(frame)
