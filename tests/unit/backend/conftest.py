"""Fixtures for the callback transport tests: a live callback server, frames, and worker subprocesses."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from wove.backend import BackendCallbackServer

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
async def server() -> AsyncIterator[BackendCallbackServer]:
    srv = BackendCallbackServer()
    await srv.start()
    yield srv
    await srv.stop()


def run_task(fn: Callable[..., Any], *, run_id: str = "run-1", delivery: dict[str, Any] | None = None, **args: Any):
    """A ``run_task`` command frame for ``fn(**args)``."""
    return {
        "type": "run_task",
        "run_id": run_id,
        "task_id": f"task-{run_id}",
        "task_name": getattr(fn, "__name__", "task"),
        "callable": fn,
        "args": args,
        "delivery": delivery or {},
    }


async def recv(server: BackendCallbackServer, timeout: float = 10.0) -> dict[str, Any]:
    return await asyncio.wait_for(server.recv(), timeout)


async def no_frame(server: BackendCallbackServer, wait: float = 0.2) -> None:
    """Assert nothing arrives within ``wait`` seconds."""
    with pytest.raises(asyncio.TimeoutError):
        frame = await asyncio.wait_for(server.recv(), wait)
        pytest.fail(f"unexpected frame {frame}")


def worker_env(**extra: str) -> dict[str, str]:
    """Environment for worker subprocesses: the repository root importable (tests' task modules), fast deadlines."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


async def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, timeout: float = 30.0
) -> tuple[int, str, str]:
    """Run ``python -m wove.backend_worker ARGS``; return ``(exit status, stdout, stderr)``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wove.backend_worker",
        *args,
        env=env or worker_env(),
        cwd=str(ROOT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin or b""), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def raw_post(
    url: str, body: bytes, *, content_type: str = "application/json", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as is; return the status and the JSON answer."""
    async with aiohttp.ClientSession() as session:
        sent = {"Content-Type": content_type, **(headers or {})}
        data = io.BytesIO(body) if len(body) > 1 << 20 else body  # aiohttp warns about large raw bodies
        async with session.post(url, data=data, headers=sent) as response:
            text = await response.read()
            try:
                answer = json.loads(text)
            except ValueError:
                answer = {"raw": text.decode(errors="replace")}
            return response.status, answer
