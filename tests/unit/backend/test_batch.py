"""Frames of several runs in one request: the batch layout, the server's endpoint, the client and the outbox."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.unit.backend import backend_tasks
from tests.unit.backend.conftest import no_frame, raw_post, recv
from tests.unit.backend.test_client import fake_server
from wove.backend import BackendCallbackServer, codec
from wove.backend.batch import BATCH_CONTENT_TYPE, MAX_ENTRIES, batch_path, encode_batch, split_batch
from wove.backend.client import CallbackConnection, HeldFrame
from wove.backend.outbox import Outbox
from wove.backend.wire import COALESCE
from wove.errors import CallbackError


def _frame(kind: str, run_id: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "run_id": run_id, "task_id": f"t-{run_id}", **fields}


def _held(url: str, frame: dict[str, Any]) -> HeldFrame:
    return HeldFrame(url, frame, codec.encode_frame(frame))


def _batch(entries: list[tuple[str, dict[str, Any]]]) -> bytes:
    """A batch body: each frame posted to the path of the URL given with it."""
    from urllib.parse import urlsplit

    encoded = encode_batch([(urlsplit(url).path, codec.encode_frame(frame)) for url, frame in entries])
    return b"".join(bytes(part) for part in encoded.parts)


def _batch_url(server: BackendCallbackServer) -> str:
    assert server.callback_url is not None
    return server.callback_url.rsplit("/wove/", 1)[0] + "/wove/batch"


# -- layout -----------------------------------------------------------------------------------------------------------


def test_a_batch_splits_into_the_frames_it_was_made_of() -> None:
    first = codec.encode_frame(_frame("heartbeat", "a"))
    second = codec.encode_frame(_frame("task_result", "b", result={"big": "x" * 100}))
    encoded = encode_batch([("/wove/runs/a/s1", first), ("/p/wove/runs/b/s2", second)])
    body = b"".join(bytes(part) for part in encoded.parts)
    assert encoded.content_type == BATCH_CONTENT_TYPE and encoded.size == len(body)
    assert split_batch(body) == [
        ("/wove/runs/a/s1", first.content_type, b"".join(bytes(p) for p in first.parts)),
        ("/p/wove/runs/b/s2", second.content_type, b"".join(bytes(p) for p in second.parts)),
    ]


@pytest.mark.parametrize(
    "body",
    [b"", b"/wove/runs/a/s application/json", b"/wove/runs/a/s application/json x\n{}", b"/p json 10\n{}", b"a b\n"],
)
def test_malformed_batches_are_refused(body: bytes) -> None:
    with pytest.raises(codec.FrameError) as caught:
        split_batch(body)
    assert caught.value.reason == "bad_batch"


def test_a_batch_holds_a_bounded_number_of_frames() -> None:
    encoded = codec.encode_frame(_frame("heartbeat", "a"))
    split_batch(b"".join(bytes(p) for p in encode_batch([("/wove/runs/a/s", encoded)] * MAX_ENTRIES).parts))
    with pytest.raises(codec.FrameError, match=f"at most {MAX_ENTRIES}"):
        split_batch(b"".join(bytes(p) for p in encode_batch([("/wove/runs/a/s", encoded)] * (MAX_ENTRIES + 1)).parts))


async def test_post_many_sends_a_large_set_in_several_batches() -> None:
    sizes: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        entries = split_batch(await request.read())  # a single post here would fail the test: not a batch
        sizes.append(len(entries))
        return web.json_response([{"status": "accepted"}] * len(entries))

    async with fake_server(handler) as url:
        held = [_held(url, _frame("heartbeat", "r", n=n)) for n in range(MAX_ENTRIES + 3)]
        assert await asyncio.to_thread(_post_many, url, held) == [None] * len(held)
    assert sizes == [MAX_ENTRIES, 3]


def test_the_batch_endpoint_sits_beside_the_runs() -> None:
    assert batch_path("/proxy/wove/runs/r1/cred") == "/proxy/wove/batch"
    with pytest.raises(ValueError, match="run URL"):
        batch_path("/wove/events/token")


# -- the server's endpoint ----------------------------------------------------------------------------------------


async def test_frames_of_several_runs_arrive_from_one_batch(server: BackendCallbackServer) -> None:
    url_a, url_b = server.open_run("a"), server.open_run("b")
    body = _batch([(url_a, _frame("heartbeat", "a")), (url_b, _frame("task_result", "b", result=[1, 2]))])
    status, answer = await raw_post(_batch_url(server), body, content_type=BATCH_CONTENT_TYPE)
    assert (status, answer) == (200, [{"status": "accepted"}, {"status": "accepted"}])
    first, second = await recv(server), await recv(server)
    assert (first["type"], first["run_id"]) == ("heartbeat", "a")
    assert (second["type"], second["run_id"], second["result"]) == ("task_result", "b", [1, 2])
    assert server.pending_runs == {"a"}


async def test_an_entry_with_a_forged_credential_is_refused_alone_and_never_unpickled(
    server: BackendCallbackServer, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    url_a, url_b = server.open_run("a"), server.open_run("b")
    forged = url_b.replace("/runs/b/", "/runs/a/")  # run a with run b's credential
    body = _batch(
        [
            (forged, _frame("task_result", "a", result=backend_tasks.Marker(str(marker)))),
            (url_b, _frame("heartbeat", "b")),
        ]
    )
    status, answer = await raw_post(_batch_url(server), body, content_type=BATCH_CONTENT_TYPE)
    assert status == 200
    assert answer == [{"code": 401, "error": "bad_credential"}, {"status": "accepted"}]
    assert not marker.exists()
    assert (await recv(server))["run_id"] == "b"
    await no_frame(server, 0.05)
    assert server.pending_runs == {"a", "b"}
    # the positive control: the same entry with run a's own credential is unpickled
    body = _batch([(url_a, _frame("task_result", "a", result=backend_tasks.Marker(str(marker))))])
    assert (await raw_post(_batch_url(server), body, content_type=BATCH_CONTENT_TYPE))[0] == 200
    assert marker.exists()


async def test_entries_answer_as_posts_to_their_urls_would(server: BackendCallbackServer) -> None:
    url, url_b = server.open_run("a"), server.open_run("b")
    master = server.callback_url
    assert master is not None
    body = _batch(
        [
            (url, _frame("task_result", "a", result=1)),
            (url, _frame("task_result", "a", result=2)),  # the run closed with the first
            (url, _frame("heartbeat", "other")),
            (url_b, _frame("heartbeat", "a")),  # run a's frame on run b's URL
            (master, _frame("heartbeat", "a")),  # the master URL is never a batch entry
        ]
    )
    status, answer = await raw_post(_batch_url(server), body, content_type=BATCH_CONTENT_TYPE)
    assert status == 200
    assert answer == [
        {"status": "accepted"},
        {"code": 403, "error": "run_not_pending"},
        {"code": 403, "error": "run_not_pending"},
        {"code": 403, "error": "run_mismatch"},
        {"code": 400, "error": "bad_batch"},
    ]
    assert (await recv(server))["result"] == 1
    await no_frame(server, 0.05)


async def test_malformed_and_mislabelled_batches_are_refused_whole(server: BackendCallbackServer) -> None:
    url = server.open_run("a")
    good = _batch([(url, _frame("heartbeat", "a"))])
    assert await raw_post(_batch_url(server), good) == (
        415,
        {"error": "bad_content_type", "detail": f"a batch is sent as {BATCH_CONTENT_TYPE}"},
    )
    status, answer = await raw_post(_batch_url(server), b"no header line", content_type=BATCH_CONTENT_TYPE)
    assert (status, answer["error"]) == (400, "bad_batch")
    await no_frame(server, 0.05)
    assert (await raw_post(_batch_url(server), good, content_type=BATCH_CONTENT_TYPE))[0] == 200


async def test_a_batch_over_the_body_limit_is_413() -> None:
    async with BackendCallbackServer(max_body_size=256) as server:
        url = server.open_run("a")
        body = _batch([(url, _frame("heartbeat", "a", note="x" * 300))])
        status, answer = await raw_post(_batch_url(server), body, content_type=BATCH_CONTENT_TYPE)
        assert (status, answer["error"]) == (413, "body_too_large")


# -- the client ------------------------------------------------------------------------------------------------------


def _post_many(url: str, held: list[HeldFrame]) -> list[CallbackError | None]:
    with CallbackConnection(url) as conn:
        return conn.post_many(held)


async def test_post_many_delivers_each_frame_to_its_run(server: BackendCallbackServer) -> None:
    urls = [server.open_run(name) for name in ("a", "b", "c")]
    held = [_held(url, _frame("task_result", name, result=name)) for url, name in zip(urls, "abc", strict=True)]
    assert await asyncio.to_thread(_post_many, urls[0], held) == [None, None, None]
    assert sorted([(await recv(server))["result"] for _ in range(3)]) == ["a", "b", "c"]
    assert server.pending_runs == frozenset()


async def test_post_many_reports_each_refusal_against_its_own_frame(server: BackendCallbackServer) -> None:
    url_a, url_b = server.open_run("a"), server.open_run("b")
    server.close_run("b")
    held = [
        _held(url_a, _frame("heartbeat", "a")),
        _held(url_b, _frame("heartbeat", "b")),  # closed: refused
        _held(url_b, _frame("task_result", "b", result=1)),  # a terminal frame of a closed run: already delivered
    ]
    first, second, third = await asyncio.to_thread(_post_many, url_a, held)
    assert first is None and third is None
    assert isinstance(second, CallbackError) and second.reason == "run_not_pending" and second.status == 403
    assert (await recv(server))["run_id"] == "a"


async def test_post_many_posts_one_by_one_where_no_batch_is_taken() -> None:
    """An older server (no batch route: 404) still gets every frame, each on its own."""
    seen: list[tuple[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        if request.path.endswith("/wove/batch"):
            return web.json_response({"error": "not_found"}, status=404)
        seen.append((request.path, json.loads(body)["run_id"]))
        return web.json_response({"status": "accepted"})

    async with fake_server(handler) as url:
        other = url.replace("/runs/r/", "/runs/q/")
        held = [_held(url, _frame("heartbeat", "r")), _held(other, _frame("heartbeat", "q"))]
        assert await asyncio.to_thread(_post_many, url, held) == [None, None]
    assert seen == [("/wove/runs/r/secret-credential", "r"), ("/wove/runs/q/secret-credential", "q")]


async def test_post_many_sends_frames_again_that_the_server_could_not_take_yet() -> None:
    """An entry answered 503 inside a batch is posted again on its own, with the usual retries."""
    singles: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        if request.path.endswith("/wove/batch"):
            return web.json_response([{"status": "accepted"}, {"code": 503, "error": "busy"}])
        singles.append(request.path)
        return web.json_response({"status": "accepted"})

    async with fake_server(handler) as url:
        other = url.replace("/runs/r/", "/runs/q/")
        held = [_held(url, _frame("heartbeat", "r")), _held(other, _frame("heartbeat", "q"))]
        assert await asyncio.to_thread(_post_many, url, held) == [None, None]
    assert singles == ["/wove/runs/q/secret-credential"]


# -- the outbox ------------------------------------------------------------------------------------------------------


async def test_the_outbox_holds_small_frames_until_flushed(server: BackendCallbackServer) -> None:
    refused: list[tuple[str, CallbackError]] = []
    outbox = Outbox(3, 60.0, lambda run_id, exc: refused.append((run_id, exc)))
    urls = {name: server.open_run(name) for name in ("a", "b", "big", "gone")}

    def hold(name: str, **fields: Any) -> None:
        with CallbackConnection(urls[name]) as conn:
            outbox.deliver(conn, _frame("heartbeat" if name == "gone" else "task_result", name, **fields))

    await asyncio.to_thread(hold, "a", result=1)
    await asyncio.to_thread(hold, "big", result="x" * (COALESCE + 1))  # too large to hold: posted at once
    assert (await recv(server))["run_id"] == "big"
    await no_frame(server, 0.1)
    assert len(outbox) == 1 and not outbox.due()
    server.close_run("gone")
    await asyncio.to_thread(hold, "gone")
    await asyncio.to_thread(hold, "b", result=2)
    assert outbox.due()  # three held
    await asyncio.to_thread(outbox.flush)
    assert len(outbox) == 0
    assert sorted([(await recv(server))["run_id"] for _ in range(2)]) == ["a", "b"]
    assert [(run_id, exc.reason) for run_id, exc in refused] == [("gone", "run_not_pending")]


def test_the_oldest_held_frame_makes_a_flush_due() -> None:
    outbox = Outbox(100, 0.0, lambda run_id, exc: None)
    assert not outbox.due()
    with CallbackConnection("http://127.0.0.1:9/wove/runs/a/cred") as conn:  # nothing is sent while held
        outbox.deliver(conn, _frame("task_result", "a", result=1))
    assert outbox.due()
