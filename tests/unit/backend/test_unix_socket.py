"""The callback server's Unix socket: the same URLs and credentials as over TCP, for workers on the same host.

Each delivery test gives the client a callback URL whose TCP port nobody listens on, so a frame that arrives can
only have come through the socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.unit.backend.conftest import recv, run_task
from wove.backend import BackendCallbackServer, run_backend_payload, run_backend_payload_async
from wove.backend.aclient import AsyncCallbackConnection
from wove.backend.client import CallbackConnection
from wove.backend.codec import build_backend_payload_for_run, validate_payload
from wove.errors import BackendUnavailableError, CallbackError, PayloadError

FRAME = {"type": "heartbeat", "run_id": "r1", "task_id": "t"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unreachable_over_tcp(url: str) -> str:
    """``url`` with its port swapped for one nobody listens on."""
    return f"http://127.0.0.1:{_closed_port()}{urlsplit(url).path}"


def double(x: int) -> int:
    return 2 * x


async def test_the_socket_lives_in_a_private_directory_until_stop() -> None:
    server = BackendCallbackServer()
    with pytest.raises(BackendUnavailableError, match="call start"):
        await server.listen_unix()
    await server.start()
    path = await server.listen_unix()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700  # only this user may connect
    await server.stop()
    assert not os.path.exists(os.path.dirname(path))


async def test_a_socket_path_too_long_is_a_clear_error(
    server: BackendCallbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 120)  # past the kernel's limit for a socket's path (108 bytes on Linux)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with pytest.raises(BackendUnavailableError, match="cannot listen"):
        await server.listen_unix()
    assert list(deep.iterdir()) == []  # the private directory made for it is gone again


async def test_a_run_url_delivers_through_the_socket(server: BackendCallbackServer) -> None:
    path = await server.listen_unix()
    url = unreachable_over_tcp(server.open_run("r1"))

    def post() -> None:
        with CallbackConnection(url, unix_socket=path, deadline=5) as conn:
            conn.post(FRAME)

    await asyncio.to_thread(post)
    assert (await recv(server))["type"] == "heartbeat"


async def test_credentials_are_checked_on_the_socket_too(server: BackendCallbackServer) -> None:
    path = await server.listen_unix()
    url = unreachable_over_tcp(server.open_run("r1")) + "-forged"

    def post() -> None:
        with CallbackConnection(url, unix_socket=path, deadline=5) as conn:
            conn.post(FRAME)

    with pytest.raises(CallbackError) as refused:
        await asyncio.to_thread(post)
    assert refused.value.status == 401


async def test_the_async_client_delivers_through_the_socket(server: BackendCallbackServer) -> None:
    path = await server.listen_unix()
    url = unreachable_over_tcp(server.open_run("r1"))
    async with AsyncCallbackConnection(url, unix_socket=path, deadline=5) as conn:
        await conn.post(FRAME)
    assert (await recv(server))["run_id"] == "r1"


async def test_a_socket_that_is_not_there_falls_back_to_tcp(server: BackendCallbackServer, tmp_path: Path) -> None:
    url = server.open_run("r1")
    missing = str(tmp_path / "gone.sock")

    def post() -> None:
        with CallbackConnection(url, unix_socket=missing, deadline=5) as conn:
            conn.post(FRAME)

    await asyncio.to_thread(post)
    async with AsyncCallbackConnection(url, unix_socket=missing, deadline=5) as conn:
        await conn.post({**FRAME, "type": "task_result", "result": 1})
    assert [(await recv(server))["type"] for _ in range(2)] == ["heartbeat", "task_result"]


@pytest.mark.parametrize("entrypoint", ["sync", "async"])
async def test_worker_entrypoints_call_back_through_the_payloads_socket(
    server: BackendCallbackServer, entrypoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WOVE_POST_DEADLINE", "5")
    path = await server.listen_unix()
    payload = build_backend_payload_for_run(run_task(double, x=21), server=server, adapter="test")
    payload["callback_url"] = unreachable_over_tcp(payload["callback_url"])
    payload["callback_socket"] = path
    if entrypoint == "sync":
        value = await asyncio.to_thread(run_backend_payload, payload)
    else:
        value = await run_backend_payload_async(payload)
    assert value == 42
    kinds = [(await recv(server))["type"] for _ in range(2)]
    assert kinds == ["task_started", "task_result"]


def test_a_payload_socket_must_be_a_path() -> None:
    payload = {
        "version": 1,
        "callback_url": "http://127.0.0.1:1/wove/runs/r/c",
        "run_id": "r",
        "task_name": "t",
        "callable_pickle": "",
        "args_pickle": "",
        "callback_socket": 7,
    }
    with pytest.raises(PayloadError, match="callback_socket"):
        validate_payload(payload)
