"""BackendCallbackServer: lifecycle, authentication, refusals, duplicates, ordering and blobs, over real HTTP."""

from __future__ import annotations

import asyncio
import http.client
import json
import pickle
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.unit.backend import backend_tasks
from tests.unit.backend.conftest import no_frame, raw_post, recv
from wove.backend import BackendCallbackServer, codec, post_event, serialize_frame
from wove.errors import BackendUnavailableError, ConfigError, DispatchError


def _json(frame: dict[str, object]) -> bytes:
    return json.dumps(serialize_frame(frame)).encode()


def _result(run_id: str, value: object = 1) -> bytes:
    return _json({"type": "task_result", "run_id": run_id, "task_id": "t", "result": value})


# -- lifecycle --------------------------------------------------------------------------------------------------------


async def test_recv_before_start_names_start() -> None:
    server = BackendCallbackServer()
    with pytest.raises(BackendUnavailableError, match=r"start\(\)"):
        await server.recv()
    assert server.callback_url is None


async def test_start_and_stop_may_be_called_twice() -> None:
    server = BackendCallbackServer()
    await server.start()
    url = server.callback_url
    await server.start()
    assert server.callback_url == url
    await server.stop()
    await server.stop()


async def test_stop_wakes_a_waiting_recv_and_later_recvs_fail() -> None:
    server = BackendCallbackServer()
    await server.start()
    waiting = asyncio.ensure_future(server.recv())
    await asyncio.sleep(0.05)
    await server.stop()
    with pytest.raises(BackendUnavailableError, match="stopped"):
        await asyncio.wait_for(waiting, 2)
    with pytest.raises(BackendUnavailableError):
        await server.recv()


async def test_urls_carry_the_token_and_the_bound_port() -> None:
    async with BackendCallbackServer(token="fixed-token") as server:
        assert server.callback_url is not None
        parts = urlsplit(server.callback_url)
        assert parts.scheme == "http" and parts.hostname == "127.0.0.1" and parts.port
        assert parts.path == "/wove/events/fixed-token"
        assert server.public_url == f"http://127.0.0.1:{parts.port}"


async def test_public_url_is_the_base_of_every_url() -> None:
    async with BackendCallbackServer(public_url="https://wove.example.com/cb/", token="tok") as server:
        assert server.callback_url == "https://wove.example.com/cb/wove/events/tok"
        assert server.open_run("r 1").startswith("https://wove.example.com/cb/wove/runs/r%201/")


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError):
        BackendCallbackServer(token="has/slash")
    with pytest.raises(ConfigError):
        BackendCallbackServer(public_url="wove.example.com")
    with pytest.raises(ConfigError):
        BackendCallbackServer(ssl_keyfile="key.pem")


async def test_a_taken_port_is_a_clear_error(server: BackendCallbackServer) -> None:
    port = urlsplit(server.callback_url).port
    with pytest.raises(BackendUnavailableError, match="cannot listen"):
        await BackendCallbackServer(port=port).start()


async def test_open_run_needs_a_url() -> None:
    with pytest.raises(BackendUnavailableError, match=r"start\(\)"):
        BackendCallbackServer().open_run("r")


# -- delivery ---------------------------------------------------------------------------------------------------------


async def test_post_event_to_the_master_url_reaches_recv(server: BackendCallbackServer) -> None:
    frame = {"type": "task_result", "run_id": "any-run", "task_id": "t", "result": {"answer": 42}}
    await asyncio.to_thread(post_event, server.callback_url, frame)
    assert await recv(server) == frame


async def test_json_frames_with_base64_pickles_are_accepted(server: BackendCallbackServer) -> None:
    status, answer = await raw_post(server.callback_url, _result("r", [1, 2]))
    assert (status, answer) == (200, {"status": "accepted"})
    assert (await recv(server))["result"] == [1, 2]


async def test_run_urls_accept_their_run(server: BackendCallbackServer) -> None:
    url = server.open_run("run/with odd%chars")
    assert server.pending_runs == {"run/with odd%chars"}
    frame = {"type": "heartbeat", "run_id": "run/with odd%chars", "task_id": "t"}
    await asyncio.to_thread(post_event, url, frame)
    assert await recv(server) == frame


async def test_frames_arrive_in_order(server: BackendCallbackServer) -> None:
    url = server.open_run("r")

    def post_all() -> None:
        for n in range(50):
            post_event(url, {"type": "heartbeat", "run_id": "r", "task_id": n})

    await asyncio.to_thread(post_all)
    assert [(await recv(server))["task_id"] for _ in range(50)] == list(range(50))


async def test_large_frames_are_decoded_off_the_loop(server: BackendCallbackServer) -> None:
    url = server.open_run("big")
    data = b"\x01" * (3 << 20)
    await asyncio.to_thread(post_event, url, {"type": "task_result", "run_id": "big", "result": data})
    assert (await recv(server))["result"] == data
    status, _ = await raw_post(server.callback_url, _result("big-json", data))  # base64 JSON form
    assert status == 200 and (await recv(server))["result"] == data


# -- authentication and refusals --------------------------------------------------------------------------------------


async def test_wrong_master_token_is_401(server: BackendCallbackServer) -> None:
    url = server.callback_url.rsplit("/", 1)[0] + "/wrong"
    assert await raw_post(url, _result("r")) == (401, {"error": "bad_credential", "detail": "bad credential"})
    await no_frame(server, 0.05)


async def test_wrong_run_credential_is_401_and_nothing_is_unpickled(
    server: BackendCallbackServer, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    server.open_run("a")
    url_b = server.open_run("b")
    forged = url_b.replace("/runs/b/", "/runs/a/")  # run a with run b's credential
    body = _json({"type": "task_result", "run_id": "a", "result": backend_tasks.Marker(str(marker))})
    status, answer = await raw_post(forged, body)
    assert (status, answer["error"]) == (401, "bad_credential")
    status, answer = await raw_post(url_b + "x", body)
    assert (status, answer["error"]) == (401, "bad_credential")
    assert not marker.exists()
    await no_frame(server, 0.05)


async def test_frame_for_another_run_is_403_before_unpickling(server: BackendCallbackServer, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    url = server.open_run("mine")
    server.open_run("theirs")
    content_type, parts, _ = codec.encode_frame(
        {"type": "task_result", "run_id": "theirs", "result": backend_tasks.Marker(str(marker))}
    )
    body = b"".join(parts)
    status, answer = await raw_post(url, bytes(body), content_type=content_type)
    assert (status, answer["error"]) == (403, "run_mismatch")
    assert not marker.exists()
    assert server.pending_runs == {"mine", "theirs"}
    # the positive control: the same kind of body on the right URL is unpickled
    status, _ = await raw_post(server.run_url("theirs"), bytes(body), content_type=content_type)
    assert status == 200 and marker.exists()


async def test_runs_never_opened_or_closed_are_not_pending(server: BackendCallbackServer) -> None:
    never = server.run_url("never")
    status, answer = await raw_post(never, _result("never"))
    assert (status, answer["error"]) == (403, "run_not_pending")
    url = server.open_run("closed")
    server.close_run("closed")
    status, answer = await raw_post(url, _result("closed"))
    assert (status, answer["error"]) == (403, "run_not_pending")
    assert server.pending_runs == frozenset()
    await no_frame(server, 0.05)


async def test_first_terminal_frame_closes_the_run(server: BackendCallbackServer) -> None:
    url = server.open_run("r")
    assert (await raw_post(url, _result("r", "first")))[0] == 200
    status, answer = await raw_post(url, _result("r", "second"))
    assert (status, answer["error"]) == (403, "run_not_pending")
    status, answer = await raw_post(url, _json({"type": "heartbeat", "run_id": "r"}))
    assert (status, answer["error"]) == (403, "run_not_pending")
    assert (await recv(server))["result"] == "first"
    await no_frame(server, 0.05)
    assert server.pending_runs == frozenset()


async def test_master_url_acknowledges_and_drops_duplicates(server: BackendCallbackServer) -> None:
    for value in ("first", "second"):
        assert await raw_post(server.callback_url, _result("r", value)) == (
            200,
            {"status": "accepted" if value == "first" else "duplicate"},
        )
    late_heartbeat = await raw_post(server.callback_url, _json({"type": "heartbeat", "run_id": "r"}))
    assert late_heartbeat == (200, {"status": "duplicate"})
    assert (await recv(server))["result"] == "first"
    await no_frame(server, 0.05)


async def test_master_url_terminal_frame_closes_an_open_run(server: BackendCallbackServer) -> None:
    url = server.open_run("r")
    assert (await raw_post(server.callback_url, _result("r")))[0] == 200
    assert (await raw_post(url, _result("r")))[1]["error"] == "run_not_pending"


async def test_resolved_memory_is_bounded() -> None:
    async with BackendCallbackServer(resolved_memory=2) as server:
        for run_id in ("a", "b", "c"):
            assert (await raw_post(server.callback_url, _result(run_id)))[1]["status"] == "accepted"
        assert (await raw_post(server.callback_url, _result("c")))[1]["status"] == "duplicate"
        assert (await raw_post(server.callback_url, _result("a")))[1]["status"] == "accepted"  # forgotten


async def test_reopening_a_run_makes_it_pending_again(server: BackendCallbackServer) -> None:
    url = server.open_run("r")
    server.close_run("r")
    assert server.open_run("r") == url
    assert (await raw_post(url, _result("r")))[0] == 200


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"{not json", "application/json", "bad_json"),
        (b"[1, 2]", "application/json", "bad_frame"),
        (b'{"type": "task_result", "run_id": "r", "result_pickle": "***"}', "application/json", "bad_base64"),
        (b'{"type": "task_result", "run_id": "r", "result_pickle": 5}', "application/json", "bad_frame"),
        (b'{"type": "task_result", "run_id": "r", "result_pickle": "bm9wZQ=="}', "application/json", "bad_pickle"),
        (b'{"type": "task_result", "run_id": "r"}', "application/json", "bad_frame"),
        (b'{"type": "launch_missiles", "run_id": "r"}', "application/json", "unknown_type"),
        (b'{"type": "run_task", "run_id": "r"}', "application/json", "unknown_type"),
        (b'{"type": "heartbeat"}', "application/json", "missing_run_id"),
        (b'{"type": "heartbeat", "run_id": ""}', "application/json", "missing_run_id"),
        (b'{"type": "heartbeat", "run_id": "r", "task_id": {}}', "application/json", "bad_frame"),
        (b"short", codec.FRAME_CONTENT_TYPE, "bad_envelope"),
        (b"", "application/json", "bad_json"),
    ],
)
async def test_malformed_bodies_are_400_and_the_server_keeps_serving(
    server: BackendCallbackServer, body: bytes, content_type: str, reason: str
) -> None:
    status, answer = await raw_post(server.callback_url, body, content_type=content_type)
    assert (status, answer["error"]) == (400, reason)
    assert answer["detail"]
    assert (await raw_post(server.callback_url, _result("after")))[0] == 200
    assert (await recv(server))["run_id"] == "after"


async def test_unknown_paths_and_methods(server: BackendCallbackServer) -> None:
    base = server.public_url
    assert (await raw_post(f"{base}/elsewhere", b"{}"))[0] == 404
    async with aiohttp.ClientSession() as session, session.get(server.callback_url) as response:
        assert response.status == 405
    async with aiohttp.ClientSession() as session, session.put(server.open_run("r") + "/blobs/1") as response:
        assert response.status == 405


async def test_oversized_bodies_are_413_without_buffering() -> None:
    async with BackendCallbackServer(max_body_size=1024) as server:
        big = _json({"type": "heartbeat", "run_id": "r", "pad": "x" * 4096})
        status, answer = await raw_post(server.callback_url, big)
        assert (status, answer["error"]) == (413, "body_too_large")

        async def chunks():  # no Content-Length: the cap applies while streaming
            for _ in range(8):
                yield b"x" * 512

        async with aiohttp.ClientSession() as session, session.post(server.callback_url, data=chunks()) as response:
            assert response.status == 413
        assert (await raw_post(server.callback_url, _result("small")))[0] == 200


async def test_oversized_bodies_from_the_sync_client_get_a_clear_refusal() -> None:
    from wove.errors import CallbackError

    async with BackendCallbackServer(max_body_size=64 * 1024) as server:
        frame = {"type": "task_result", "run_id": "r", "result": b"x" * (8 << 20)}
        with pytest.raises(CallbackError) as info:
            await asyncio.to_thread(post_event, server.callback_url, frame, timeout=5)
        assert (info.value.status, info.value.reason) == (413, "body_too_large")


async def test_connections_are_kept_alive(server: BackendCallbackServer) -> None:
    parts = urlsplit(server.callback_url)

    def post_three() -> list[int]:
        conn = http.client.HTTPConnection(parts.hostname, parts.port)
        statuses = []
        for n in range(3):
            conn.request("POST", parts.path, body=_json({"type": "heartbeat", "run_id": f"r{n}"}))
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            assert not response.will_close
        conn.close()
        return statuses

    assert await asyncio.to_thread(post_three) == [200, 200, 200]


# -- blobs ------------------------------------------------------------------------------------------------------------


async def _get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


async def test_blobs_are_served_to_their_run_only(server: BackendCallbackServer) -> None:
    url = server.open_run("r")
    other = server.open_run("other")
    data = bytes(range(256)) * 20_000
    ref = server.put_blob("r", data)
    assert await _get(f"{url}/blobs/{ref}") == (200, data)
    forged = other.replace("/runs/other/", "/runs/r/")
    assert (await _get(f"{forged}/blobs/{ref}"))[0] == 401
    assert (await _get(f"{other}/blobs/{ref}"))[0] == 404  # other run: its own (empty) store
    status, body = await _get(f"{url}/blobs/nope")
    assert status == 404 and json.loads(body)["error"] == "blob_not_found"
    server.close_run("r")
    status, body = await _get(f"{url}/blobs/{ref}")
    assert status == 403 and json.loads(body)["error"] == "run_not_pending"


async def test_blobs_are_dropped_once_the_run_starts(server: BackendCallbackServer) -> None:
    url = server.open_run("r")
    ref = server.put_blob("r", b"body")
    await asyncio.to_thread(post_event, url, {"type": "task_started", "run_id": "r"})
    assert (await _get(f"{url}/blobs/{ref}"))[0] == 404


def test_put_blob_needs_a_pending_run() -> None:
    server = BackendCallbackServer(public_url="http://127.0.0.1:1")
    with pytest.raises(DispatchError, match="open_run"):
        server.put_blob("r", b"x")
    server.open_run("r")
    assert server.put_blob("r", bytearray(b"x")) != server.put_blob("r", memoryview(b"y"))


async def test_unpickling_failures_of_exceptions_keep_the_frame(server: BackendCallbackServer) -> None:
    error = codec.error_info(ValueError("v"), source="task")
    wire = {
        "type": "task_error",
        "run_id": "r",
        "exception_pickle": codec.b64encode(b"junk"),
        "error_pickle": codec.b64encode(pickle.dumps(error)),
    }
    assert (await raw_post(server.callback_url, json.dumps(wire).encode()))[0] == 200
    frame = await recv(server)
    assert "exception" not in frame and frame["error"] == error


# -- frames larger than one request -----------------------------------------------------------------------------------


async def test_frames_above_the_body_limit_reach_run_urls_in_parts() -> None:
    from wove.backend import post_event_async

    async with BackendCallbackServer(max_body_size=64 * 1024) as server:
        data = bytes(range(256)) * 4096  # 1 MiB: sixteen parts
        url = server.open_run("sync")
        await asyncio.to_thread(post_event, url, {"type": "task_result", "run_id": "sync", "result": data})
        assert (await recv(server))["result"] == data
        url = server.open_run("async")
        await post_event_async(url, {"type": "task_result", "run_id": "async", "result": data})
        assert (await recv(server))["result"] == data
        assert server.pending_runs == frozenset() and not server._uploads


async def _part(url: str, body: bytes, query: str, **headers: str) -> tuple[int, dict[str, object]]:
    return await raw_post(f"{url}/upload{query}", body, content_type="application/octet-stream", headers=headers)


async def test_upload_refusals() -> None:
    async with BackendCallbackServer(max_body_size=1024, max_frame_size=4096) as server:
        url = server.open_run("r")
        assert (await _part(url, b"x", ""))[1]["error"] == "bad_upload"
        assert (await _part(url, b"x", "?offset=a&total=3"))[1]["error"] == "bad_upload"
        status, answer = await _part(url, b"x" * 2048, "?offset=0&total=3000")
        assert (status, answer["error"], answer["limit"]) == (413, "body_too_large", 1024)
        assert (await _part(url, b"x", "?offset=0&total=5000"))[:1] == (413,)
        assert (await _part(url, b"xx", "?offset=2999&total=3000"))[1]["error"] == "bad_upload"
        assert (await _part(url, b"xx", "?offset=-1&total=3000"))[1]["error"] == "bad_upload"
        forged = server.open_run("other").replace("/runs/other/", "/runs/r/")
        assert (await _part(forged, b"x", "?offset=0&total=3"))[0] == 401
        assert (await _part(server.run_url("never"), b"x", "?offset=0&total=3"))[1]["error"] == "run_not_pending"

        finish = {"X-Wove-Upload": "3"}
        status, answer = await raw_post(url, b"", content_type=codec.FRAME_CONTENT_TYPE, headers=finish)
        assert (status, answer["error"]) == (400, "upload_incomplete")
        assert (await _part(url, b"ab", "?offset=0&total=3"))[0] == 200
        status, answer = await raw_post(url, b"", content_type=codec.FRAME_CONTENT_TYPE, headers=finish)
        assert (status, answer["error"]) == (400, "upload_incomplete")  # one byte never came
        assert server.pending_runs == {"r", "other"}


async def test_upload_parts_without_a_length_are_refused(server: BackendCallbackServer) -> None:
    url = server.open_run("r")

    async def chunks():
        yield b"abc"

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/upload?offset=0&total=3", data=chunks()) as response,
    ):
        assert response.status == 400 and (await response.json())["error"] == "bad_upload"


async def test_closing_a_run_drops_its_upload(server: BackendCallbackServer) -> None:
    url = server.open_run("r")
    assert (await _part(url, b"ab", "?offset=0&total=3"))[0] == 200
    assert set(server._uploads) == {"r"}
    server.close_run("r")
    assert not server._uploads


async def test_a_sink_takes_frames_instead_of_recv_and_its_failure_still_acknowledges(
    server: BackendCallbackServer,
) -> None:
    taken: list[dict[str, object]] = []

    def sink(frame: dict[str, object]) -> None:
        taken.append(frame)
        if frame["type"] == "task_result":
            raise RuntimeError("the owner failed")

    server.deliver_to(sink)
    url = server.open_run("r1")
    await asyncio.to_thread(post_event, url, {"type": "heartbeat", "run_id": "r1"})
    await asyncio.to_thread(post_event, url, {"type": "task_result", "run_id": "r1", "result": 7})
    assert [frame["type"] for frame in taken] == ["heartbeat", "task_result"] and taken[1]["result"] == 7
    assert "r1" not in server.pending_runs  # the terminal frame closed the run even though the sink failed
    await no_frame(server)
    server.deliver_to(None)
    await asyncio.to_thread(post_event, server.callback_url, {"type": "heartbeat", "run_id": "r2"})
    assert (await recv(server))["run_id"] == "r2"


async def test_compressed_bodies_are_not_inflated(server: BackendCallbackServer) -> None:
    """Workers never compress, so a gzip body is taken as the bytes it is: a small zip bomb stays small."""
    import gzip

    bomb = gzip.compress(b"[" * (64 << 20), 9)  # 64 MiB of brackets in about 64 KiB
    status, answer = await raw_post(server.callback_url, bomb, headers={"Content-Encoding": "gzip"})
    assert (status, answer["error"]) == (400, "bad_json")
    frame = json.dumps({"type": "heartbeat", "run_id": "gz"}).encode()
    status, answer = await raw_post(server.callback_url, gzip.compress(frame), headers={"Content-Encoding": "gzip"})
    assert status == 400  # not inflated into the valid frame it holds
    await no_frame(server)


async def test_an_upload_holds_only_the_bytes_it_sent_and_takes_parts_in_order(server: BackendCallbackServer) -> None:
    """Announcing a 1 GiB frame and sending ten bytes costs ten bytes; parts arrive in order, and the last one may be
    sent again (a retry after a lost answer) without being counted twice."""
    url = server.open_run("up")
    total = server.max_frame_size
    octets = "application/octet-stream"
    status, _ = await raw_post(f"{url}/upload?offset=0&total={total}", b"x" * 10, content_type=octets)
    assert status == 200
    upload = server._uploads["up"]
    assert upload.size == 10 and [len(part) for part in upload.parts] == [10]
    status, answer = await raw_post(f"{url}/upload?offset=20&total={total}", b"y" * 5, content_type=octets)
    assert (status, answer["error"]) == (400, "bad_upload")
    status, _ = await raw_post(f"{url}/upload?offset=0&total={total}", b"z" * 10, content_type=octets)
    assert status == 200 and upload.size == 10 and bytes(upload.parts[0]) == b"z" * 10
    status, _ = await raw_post(f"{url}/upload?offset=10&total={total}", b"w" * 6, content_type=octets)
    assert status == 200 and upload.size == 16
