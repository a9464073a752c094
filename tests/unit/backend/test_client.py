"""Posting frames: retries with backoff until a deadline, final 4xx refusals, keep-alive, sync and async."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from tests.unit.backend.conftest import recv
from wove.backend import BackendCallbackServer, post_event, post_event_async
from wove.backend.client import CallbackConnection
from wove.errors import CallbackError, ConfigError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEARTBEAT = {"type": "heartbeat", "run_id": "r", "task_id": "t"}
RESULT = {"type": "task_result", "run_id": "r", "task_id": "t", "result": 1}


@asynccontextmanager
async def fake_server(handler: Handler) -> AsyncIterator[str]:
    """A plain aiohttp server answering every path with ``handler``; yields its callback URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/wove/runs/r/secret-credential"
    finally:
        await runner.cleanup()


def _scripted(statuses: list[int], seen: list[web.Request], body: bytes = b"{}", headers: dict[str, str] | None = None):
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request)
        status = statuses.pop(0) if statuses else 200
        return web.Response(status=status, body=body, headers=headers, content_type="application/json")

    return handler


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_5xx_and_429_are_retried_until_accepted() -> None:
    seen: list[web.Request] = []
    async with fake_server(_scripted([503, 500, 429], seen)) as url:
        await asyncio.to_thread(post_event, url, HEARTBEAT)
    assert len(seen) == 4


async def test_retry_after_is_honoured() -> None:
    seen: list[web.Request] = []
    async with fake_server(_scripted([429], seen, headers={"Retry-After": "0.3"})) as url:
        started = time.monotonic()
        await asyncio.to_thread(post_event, url, HEARTBEAT)
    assert len(seen) == 2 and time.monotonic() - started >= 0.3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
async def test_other_4xx_are_final_and_named(status: int) -> None:
    seen: list[web.Request] = []
    async with fake_server(_scripted([status] * 5, seen, body=b'{"error": "some_reason"}')) as url:
        with pytest.raises(CallbackError) as info:
            await asyncio.to_thread(post_event, url, HEARTBEAT)
    assert len(seen) == 1
    assert (info.value.status, info.value.reason, info.value.run_id) == (status, "some_reason", "r")
    message = str(info.value)
    assert f"HTTP {status}" in message and "some_reason" in message and "heartbeat" in message
    assert "secret-credential" not in message  # the URL is redacted


async def test_run_not_pending_means_delivered_for_terminal_frames_only() -> None:
    seen: list[web.Request] = []
    async with fake_server(_scripted([403, 403], seen, body=b'{"error": "run_not_pending"}')) as url:
        await asyncio.to_thread(post_event, url, RESULT)  # no error: an earlier copy arrived
        with pytest.raises(CallbackError) as info:
            await asyncio.to_thread(post_event, url, HEARTBEAT)
    assert info.value.reason == "run_not_pending"


async def test_connection_refused_is_retried_until_the_server_comes_up() -> None:
    port = _free_port()
    server = BackendCallbackServer(port=port, token="tok")
    url = f"http://127.0.0.1:{port}/wove/events/tok"
    posting = asyncio.ensure_future(asyncio.to_thread(post_event, url, HEARTBEAT, timeout=10))
    await asyncio.sleep(0.4)
    assert not posting.done()
    await server.start()
    try:
        await asyncio.wait_for(posting, 10)
        assert await recv(server) == HEARTBEAT
    finally:
        await server.stop()


async def test_the_deadline_ends_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{_free_port()}/wove/runs/r/secret-credential"
    started = time.monotonic()
    with pytest.raises(CallbackError) as info:
        await asyncio.to_thread(post_event, url, HEARTBEAT, timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 3
    assert info.value.status is None and info.value.reason == "unreachable"
    assert "before the deadline" in str(info.value) and "secret-credential" not in str(info.value)

    monkeypatch.setenv("WOVE_POST_DEADLINE", "0.3")
    started = time.monotonic()
    with pytest.raises(CallbackError):
        await asyncio.to_thread(post_event, url, HEARTBEAT)
    assert time.monotonic() - started < 2


async def test_server_errors_until_the_deadline_report_the_last_status() -> None:
    seen: list[web.Request] = []
    async with fake_server(_scripted([502] * 1000, seen, body=b'{"error": "upstream"}')) as url:
        with pytest.raises(CallbackError) as info:
            await asyncio.to_thread(post_event, url, HEARTBEAT, timeout=0.5)
    assert len(seen) > 2
    assert info.value.status == 502 and "upstream" in str(info.value)


def test_bad_settings_and_urls_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WOVE_POST_DEADLINE", "soon")
    with pytest.raises(ConfigError, match="WOVE_POST_DEADLINE"):
        post_event("http://127.0.0.1:1/", HEARTBEAT)
    monkeypatch.delenv("WOVE_POST_DEADLINE")
    with pytest.raises(ValueError, match="http:// or https://"):
        post_event("ftp://example.com/x", HEARTBEAT)


async def test_frames_of_one_run_share_a_connection_and_stale_ones_are_replaced() -> None:
    seen: list[web.Request] = []
    async with fake_server(_scripted([], seen)) as url:

        def post_run() -> None:
            with CallbackConnection(url) as conn:
                for _ in range(3):
                    conn.post(HEARTBEAT)
            post_event(url, RESULT)  # the pooled connection is reused by the next run

        await asyncio.to_thread(post_run)
        peers = {request.transport.get_extra_info("peername") for request in seen if request.transport}
        assert len(seen) == 4 and len(peers) == 1

    # the server is gone: its connections died with it. A new server on another port, same thread, still works.
    async with fake_server(_scripted([], seen)) as url:
        await asyncio.to_thread(post_event, url, HEARTBEAT)


async def test_a_pooled_connection_closed_by_the_server_is_retried_at_once() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/wove/events/tok"
    loop = asyncio.get_running_loop()
    servers = [BackendCallbackServer(port=port, token="tok")]
    await servers[0].start()

    def restart() -> None:  # drops every connection, then listens again on the same port
        asyncio.run_coroutine_threadsafe(servers[0].stop(), loop).result()
        servers.append(BackendCallbackServer(port=port, token="tok"))
        asyncio.run_coroutine_threadsafe(servers[1].start(), loop).result()

    def post_twice() -> float:
        with CallbackConnection(url) as conn:
            conn.post(HEARTBEAT)
            restart()
            started = time.monotonic()
            conn.post(HEARTBEAT)
            return time.monotonic() - started

    assert await asyncio.to_thread(post_twice) < 1.0  # a stale keep-alive connection is replaced, not a failure
    assert (await recv(servers[1]))["type"] == "heartbeat"
    await servers[1].stop()


# -- async ------------------------------------------------------------------------------------------------------------


async def test_async_post_retries_and_refuses_like_the_sync_one() -> None:
    seen: list[web.Request] = []
    async with fake_server(_scripted([503, 429], seen)) as url:
        await post_event_async(url, HEARTBEAT)
    assert len(seen) == 3

    seen.clear()
    async with fake_server(_scripted([422], seen, body=b'{"error": "nope"}')) as url:
        with pytest.raises(CallbackError) as info:
            await post_event_async(url, HEARTBEAT)
    assert (len(seen), info.value.status, info.value.reason) == (1, 422, "nope")

    async with fake_server(_scripted([403], seen, body=b'{"error": "run_not_pending"}')) as url:
        await post_event_async(url, RESULT)


async def test_async_post_reaches_the_callback_server(server: BackendCallbackServer) -> None:
    big = {"type": "task_result", "run_id": "big", "result": b"z" * (3 << 20)}
    await post_event_async(server.callback_url, big)
    assert (await recv(server))["result"] == big["result"]


async def test_async_post_gives_up_at_the_deadline() -> None:
    with pytest.raises(CallbackError) as info:
        await post_event_async(f"http://127.0.0.1:{_free_port()}/x", HEARTBEAT, timeout=0.3)
    assert info.value.reason == "unreachable"


async def test_frames_above_the_part_size_are_uploaded_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    from wove.backend import delivery

    monkeypatch.setattr(delivery, "UPLOAD_PART", 100_000)
    seen: list[web.Request] = []
    frame = {"type": "task_result", "run_id": "r", "result": b"\x01" * 250_000}
    async with fake_server(_scripted([], seen)) as url:
        await asyncio.to_thread(post_event, url, frame)
        sync_paths = [(request.path_qs, request.headers.get("X-Wove-Upload")) for request in seen]
        seen.clear()
        await post_event_async(url, frame)
        async_paths = [(request.path_qs, request.headers.get("X-Wove-Upload")) for request in seen]
    assert sync_paths == async_paths
    total = int(sync_paths[-1][1] or 0)
    assert total > 250_000
    assert sync_paths == [
        (f"/wove/runs/r/secret-credential/upload?offset=0&total={total}", None),
        (f"/wove/runs/r/secret-credential/upload?offset=100000&total={total}", None),
        (f"/wove/runs/r/secret-credential/upload?offset=200000&total={total}", None),
        ("/wove/runs/r/secret-credential", str(total)),
    ]


async def test_master_urls_never_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    from wove.backend import delivery

    monkeypatch.setattr(delivery, "UPLOAD_PART", 1000)
    seen: list[web.Request] = []
    async with fake_server(_scripted([], seen)) as url:
        master = url.replace("/wove/runs/r/secret-credential", "/wove/events/token")
        await asyncio.to_thread(post_event, master, {"type": "task_result", "run_id": "r", "result": b"x" * 5000})
    assert [request.path for request in seen] == ["/wove/events/token"]


# -- answer framing ---------------------------------------------------------------------------------------------------


async def test_chunked_answers_and_closing_answers_are_read_whole() -> None:
    """A proxy may re-frame answers: chunked bodies and ``Connection: close`` both work, and a closed connection
    is not reused."""
    peers: list[object] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        if request.method == "GET":  # a chunked body of three pieces
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for piece in (b"abc", b"", b"defgh", b"i" * 70_000):
                await response.write(piece)
            await response.write_eof()
            return response
        return web.Response(body=b"{}", headers={"Connection": "close"}, content_type="application/json")

    async with fake_server(handler) as url:

        def talk() -> bytearray:
            with CallbackConnection(url) as conn:
                conn.post(HEARTBEAT)
                conn.post(HEARTBEAT)  # the first answer closed its connection: a new one carries this
                return conn.fetch_blob("1")

        blob = await asyncio.to_thread(talk)
    assert bytes(blob) == b"abcdefgh" + b"i" * 70_000
    assert len(peers) == 3 and len(set(peers)) == 3


async def test_an_answer_that_is_not_http_is_retried_then_named() -> None:
    """Garbage on the wire (not an HTTP answer) is treated like a broken connection: retried until the deadline."""
    answered = 0

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        await reader.read(65536)
        answered += 1
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(CallbackError, match="before the deadline") as caught:
            await asyncio.to_thread(post_event, f"http://127.0.0.1:{port}/wove/events/t", HEARTBEAT, timeout=0.5)
    assert answered >= 2
    assert "BadAnswer" in str(caught.value)
