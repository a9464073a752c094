"""TLS on the callback server, end to end, with a self-signed certificate made by the test.

What must hold: workers that trust the certificate (``WOVE_CALLBACK_CAFILE``) deliver every result over https; a
worker that does not is refused with a clear TLS error naming the fix, after one connection attempt (no retry
storm), and nothing it sent is accepted. Plain HTTP to the TLS port does not disturb the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability import transport_tasks
from tests.reliability.transport_support import (
    ExecutorDriver,
    TcpProxy,
    build_request,
    record,
    self_signed_certificate,
    until,
)
from tests.unit.backend.conftest import worker_env
from wove._types import Frame
from wove.backend import BackendCallbackServer, payload_to_b64, post_event, post_event_async
from wove.backend.codec import build_backend_payload_for_run
from wove.backend.delivery import CAFILE_ENV
from wove.errors import CallbackError

pytestmark = pytest.mark.integration

RUNS = 6


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path)


@dataclass
class Https:
    server: BackendCallbackServer
    accepted: list[Frame]
    cert: Path

    @property
    def port(self) -> int:
        return int(str(self.server.public_url).rsplit(":", 1)[1])


@pytest.fixture
async def https(certificate: tuple[Path, Path]) -> AsyncIterator[Https]:
    cert, key = certificate
    server = BackendCallbackServer(ssl_certfile=str(cert), ssl_keyfile=str(key))
    accepted: list[Frame] = []
    server.deliver_to(accepted.append)
    await server.start()
    yield Https(server, accepted, cert)
    await server.stop()


async def test_workers_that_trust_the_certificate_deliver_over_https(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    driver = await ExecutorDriver.start(
        {
            "max_workers": 2,
            "callback_ssl_certfile": str(cert),
            "callback_ssl_keyfile": str(key),
            "env": {CAFILE_ENV: str(cert)},
        }
    )
    try:
        assert driver.executor.server is not None
        assert str(driver.executor.server.public_url).startswith("https://127.0.0.1:")
        began = time.monotonic()
        runs = {await driver.submit(transport_tasks.add, a=n, b=1): n + 1 for n in range(RUNS)}
        await until(lambda: all(driver.outcome(run) for run in runs), 60, "every https run resolved")
        took = time.monotonic() - began
        values = {run: driver.outcome(run)["result"] for run in runs}  # type: ignore[index]
        assert values == runs
        assert all(driver.terminal[run] == 1 for run in runs)
    finally:
        await driver.close()
    record(
        "tls: process workers over https", submitted=RUNS, resolved=len(values), duplicated=0, seconds=round(took, 2)
    )


async def test_a_worker_without_the_ca_fails_once_with_a_clear_tls_error(
    https: Https, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = https.port
    proxy = await TcpProxy(port).start()  # counts the connections each client opens
    monkeypatch.delenv(CAFILE_ENV, raising=False)
    try:
        frame = {
            "type": "run_task",
            "run_id": "no-ca",
            "task_id": "t",
            "task_name": "add",
            "callable": transport_tasks.add,
        }
        payload = build_backend_payload_for_run({**frame, "args": {"a": 1, "b": 2}}, server=https.server, adapter="x")
        payload["callback_url"] = payload["callback_url"].replace(f":{port}/", f":{proxy.port}/")
        run_url = payload["callback_url"]

        # a cold worker process, as a Slurm or Kubernetes job runs it
        env = worker_env(WOVE_POST_DEADLINE="30")
        env.pop(CAFILE_ENV, None)
        began = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "wove.backend_worker",
            payload_to_b64(payload),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
        worker_seconds = time.monotonic() - began
        message = err.decode()
        assert process.returncode == 3, message
        assert "does not verify" in message and CAFILE_ENV in message, message
        worker_connections = proxy.accepted

        # the sync and async clients in process: one attempt each, then CallbackError(reason="tls_verify_failed")
        attempts: dict[str, int] = {}
        for name in ("sync", "async"):
            before = proxy.accepted
            with pytest.raises(CallbackError) as info:
                heartbeat = {"type": "heartbeat", "run_id": "no-ca"}
                if name == "sync":
                    await asyncio.to_thread(post_event, run_url, heartbeat, timeout=30)
                else:
                    await post_event_async(run_url, heartbeat, timeout=30)
            assert info.value.reason == "tls_verify_failed"
            assert CAFILE_ENV in str(info.value)
            attempts[name] = proxy.accepted - before
        assert https.accepted == []
        assert worker_connections <= 2 and attempts == {"sync": 1, "async": 1}, (worker_connections, attempts)

        # the positive control: the same URL works once the CA is trusted
        monkeypatch.setenv(CAFILE_ENV, str(https.cert))
        await asyncio.to_thread(post_event, run_url, {"type": "heartbeat", "run_id": "no-ca"}, timeout=30)
        assert [frame["type"] for frame in https.accepted] == ["heartbeat"]
    finally:
        await proxy.close()
    record(
        "tls: worker without the CA",
        worker_exit=process.returncode,
        worker_connections=worker_connections,
        client_attempts=attempts,
        frames_accepted_without_ca=0,
        worker_seconds=round(worker_seconds, 2),
    )


async def test_plain_http_on_the_tls_port_does_not_disturb_the_server(
    https: Https, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = 0
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", https.port)
        writer.write(build_request("POST", f"/wove/events/{https.server.token}", [], b'{"type":"heartbeat"}'))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        closed += data == b"" or not data.startswith(b"HTTP/1.1 2")
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert closed == 20
    assert https.accepted == []
    monkeypatch.setenv(CAFILE_ENV, str(https.cert))
    heartbeat = {"type": "heartbeat", "run_id": "after-plain-http"}
    await asyncio.to_thread(post_event, str(https.server.callback_url), heartbeat, timeout=30)
    assert [frame["type"] for frame in https.accepted] == ["heartbeat"]  # still serving
    record("tls: plain http on the tls port", attempts=20, refused_or_closed=closed)
