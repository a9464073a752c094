"""The spec's plain composition across processes, large bodies within a memory bound, and HTTPS callbacks."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from tests.unit.backend import backend_tasks
from tests.unit.backend.conftest import ROOT, recv, run_cli, run_task, worker_env
from wove.backend import (
    BackendCallbackServer,
    build_backend_payload,
    build_backend_payload_for_run,
    payload_to_b64,
    post_event,
    post_event_async,
)
from wove.errors import CallbackError


async def _python(script: str, stdin: str = "", env: dict[str, str] | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        env=env or worker_env(),
        cwd=str(ROOT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


RUN_IN_CHILD = """
import json, sys
from wove.backend import run_backend_payload
print(json.dumps(run_backend_payload(json.loads(sys.stdin.read()))))
"""


async def test_payload_run_in_another_process_reaches_recv(server: BackendCallbackServer) -> None:
    frame = run_task(backend_tasks.pid, run_id="plain")
    payload = build_backend_payload(frame, callback_url=server.callback_url, adapter="test")
    child_pid = json.loads(await _python(RUN_IN_CHILD, json.dumps(payload)))
    started, result = await recv(server), await recv(server)
    assert started["type"] == "task_started" and started["pid"] == child_pid
    assert started["at"] <= result.pop("at") and started["execution"] == result.pop("execution")
    assert result == {"type": "task_result", "run_id": "plain", "task_id": "task-plain", "result": child_pid}


POST_IN_CHILD = """
import sys
from wove.backend import post_event
post_event(sys.argv[1], {"type": "task_error", "run_id": "x", "task_id": 3, "exception": KeyError("k"),
                         "error": {"kind": "KeyError", "message": "'k'", "traceback": "", "retryable": False,
                                   "source": "task"}})
"""


async def test_post_event_from_another_process(server: BackendCallbackServer) -> None:
    await _python(POST_IN_CHILD.replace("sys.argv[1]", repr(server.callback_url)))
    frame = await recv(server)
    assert frame["type"] == "task_error" and isinstance(frame["exception"], KeyError)
    assert frame["error"]["kind"] == "KeyError"


# -- large bodies -----------------------------------------------------------------------------------------------------

MB = 1 << 20
SIZE = 20 * MB
#: Peak traced memory allowed on each side, as a multiple of the data size (the bound is 2x; 10% for overheads).
BOUND = 2.2

WORKER_PEAK = """
import sys, tracemalloc
from wove.backend import payload_from_b64, run_backend_payload
payload = payload_from_b64(sys.stdin.read())
tracemalloc.start()
result = run_backend_payload(payload)
peak = tracemalloc.get_traced_memory()[1]
print(peak, len(result))
"""


async def test_large_argument_and_result_round_trip_within_twice_their_size(server: BackendCallbackServer) -> None:
    data = bytes(range(256)) * (SIZE // 256)
    tracemalloc.start()
    try:
        frame = run_task(backend_tasks.reverse, run_id="big", data=data)
        payload = build_backend_payload_for_run(frame, server=server, adapter="test")
        del frame
        assert isinstance(payload["args_pickle"], dict)
        text = payload_to_b64(payload)
        assert len(text) < 4096  # the body stays on the server
        worker = asyncio.ensure_future(_python(WORKER_PEAK, text))
        assert (await recv(server, 60))["type"] == "task_started"
        result = (await recv(server, 60))["result"]
        submit_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    worker_peak, result_len = map(int, (await worker).split())
    assert result == data[::-1] and result_len == SIZE
    print(f"peaks: submit {submit_peak / SIZE:.2f}x worker {worker_peak / SIZE:.2f}x")
    assert submit_peak <= BOUND * SIZE, f"submitting side peaked at {submit_peak / SIZE:.2f}x"
    assert worker_peak <= BOUND * SIZE, f"worker peaked at {worker_peak / SIZE:.2f}x"


# -- TLS --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command-line tool."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
async def tls_server(certificate: tuple[Path, Path]):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    async with BackendCallbackServer(ssl_context=context) as server:
        yield server


async def test_https_callbacks_with_a_trusted_certificate(
    tls_server: BackendCallbackServer, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tls_server.callback_url.startswith("https://127.0.0.1:")
    monkeypatch.setenv("WOVE_CALLBACK_CAFILE", str(certificate[0]))
    await asyncio.to_thread(post_event, tls_server.callback_url, {"type": "heartbeat", "run_id": "sync"})
    await post_event_async(tls_server.callback_url, {"type": "heartbeat", "run_id": "async"})
    assert [(await recv(tls_server))["run_id"] for _ in range(2)] == ["sync", "async"]

    payload = build_backend_payload_for_run(run_task(backend_tasks.add, a=1, b=2), server=tls_server, adapter="t")
    status, _, err = await run_cli(payload_to_b64(payload), env=worker_env(WOVE_CALLBACK_CAFILE=str(certificate[0])))
    assert status == 0, err
    assert [(await recv(tls_server))["type"] for _ in range(2)] == ["task_started", "task_result"]


async def test_an_untrusted_certificate_fails_at_once(tls_server: BackendCallbackServer) -> None:
    frame = {"type": "heartbeat", "run_id": "r"}
    with pytest.raises(CallbackError) as info:
        await asyncio.to_thread(post_event, tls_server.callback_url, frame, timeout=30)
    assert info.value.reason == "tls_verify_failed" and "WOVE_CALLBACK_CAFILE" in str(info.value)
    with pytest.raises(CallbackError) as info:
        await asyncio.wait_for(post_event_async(tls_server.callback_url, frame, timeout=30), 10)
    assert info.value.reason == "tls_verify_failed"


async def test_certificate_files_can_be_given_directly(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WOVE_CALLBACK_CAFILE", str(certificate[0]))
    async with BackendCallbackServer(ssl_certfile=str(certificate[0]), ssl_keyfile=str(certificate[1])) as server:
        await asyncio.to_thread(post_event, server.callback_url, {"type": "heartbeat", "run_id": "r"})
        assert (await recv(server))["run_id"] == "r"
