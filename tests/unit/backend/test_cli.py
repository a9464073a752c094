"""``python -m wove.backend_worker`` in real subprocesses: input forms, exit statuses, SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys

import pytest

from tests.unit.backend import backend_tasks
from tests.unit.backend.conftest import ROOT, no_frame, recv, run_cli, run_task, worker_env
from wove.backend import BackendCallbackServer, build_backend_payload_for_run, payload_to_b64
from wove.backend_worker import EXIT_CALLBACK, EXIT_TASK_FAILED, EXIT_USAGE


def _b64(server: BackendCallbackServer, fn, *, run_id: str = "run-1", delivery=None, **args) -> str:
    frame = run_task(fn, run_id=run_id, delivery=delivery, **args)
    return payload_to_b64(build_backend_payload_for_run(frame, server=server, adapter="cli"))


async def test_payload_from_argv(server: BackendCallbackServer) -> None:
    status, _, err = await run_cli(_b64(server, backend_tasks.add, a=1, b=2))
    assert (status, err) == (0, "")
    started = await recv(server)
    assert started["type"] == "task_started" and started["pid"] > 0
    assert (await recv(server))["result"] == 3


async def test_payload_from_the_environment_and_stdin(server: BackendCallbackServer) -> None:
    env = worker_env(WOVE_BACKEND_PAYLOAD=_b64(server, backend_tasks.add, run_id="env", a=1, b=1))
    assert (await run_cli(env=env))[0] == 0
    text = _b64(server, backend_tasks.add, run_id="stdin", a=2, b=2)
    assert (await run_cli("-", stdin=text.encode()))[0] == 0
    frames = [await recv(server) for _ in range(4)]
    assert [f["result"] for f in frames if f["type"] == "task_result"] == [2, 4]


async def test_lambdas_and_closures_run_by_value(server: BackendCallbackServer) -> None:
    offset = 100
    status, _, err = await run_cli(_b64(server, lambda x: x + offset, x=1))
    assert status == 0, err
    await recv(server)
    assert (await recv(server))["result"] == 101


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {}, "no payload given"),
        (("",), {}, "no payload given"),
        (("a", "b"), {}, "expected at most one argument"),
        (("not-a-payload",), {}, "invalid payload: not a wove payload"),
        (("jeyJ2ZXJzaW9uIjogOX0",), {}, "invalid payload: unsupported payload version 9"),
        ((), {"WOVE_BACKEND_PAYLOAD": "z@@@"}, "invalid payload"),
    ],
)
async def test_usage_errors_are_one_line_without_traceback(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    base = worker_env()
    base.pop("WOVE_BACKEND_PAYLOAD", None)
    status, out, err = await run_cli(*args, env={**base, **env})
    assert status == EXIT_USAGE
    assert err.count("\n") == 1 and err.startswith("wove.backend_worker: ") and message in err
    assert "Traceback" not in err and out == ""


async def test_help_exits_zero() -> None:
    status, out, _ = await run_cli("--help")
    assert status == 0 and "Exit status" in out


async def test_task_errors_exit_1_with_their_traceback(server: BackendCallbackServer) -> None:
    status, _, err = await run_cli(_b64(server, backend_tasks.boom, message="kaput"))
    assert status == EXIT_TASK_FAILED
    assert "Traceback" in err and "in boom" in err
    assert err.strip().splitlines()[-1] == "wove.backend_worker: task 'boom' failed: ValueError: kaput"
    await recv(server)
    assert (await recv(server))["error"]["message"] == "kaput"


async def test_an_unreachable_callback_server_exits_3() -> None:
    server = BackendCallbackServer()
    await server.start()
    text = _b64(server, backend_tasks.add, a=1, b=2)
    await server.stop()
    status, _, err = await run_cli(text, env=worker_env(WOVE_POST_DEADLINE="0.5"))
    assert status == EXIT_CALLBACK
    assert err.count("\n") == 1 and "before the deadline" in err and "Traceback" not in err


async def test_a_refused_run_exits_3_without_running(server: BackendCallbackServer, tmp_path) -> None:
    marker = tmp_path / "ran"
    text = _b64(server, backend_tasks.touch, path=str(marker))
    server.close_run("run-1")
    status, _, err = await run_cli(text)
    assert status == EXIT_CALLBACK and "run_not_pending" in err
    assert not marker.exists()


@pytest.mark.parametrize("heartbeat", [None, 0.3])
async def test_sigterm_posts_task_cancelled(server: BackendCallbackServer, heartbeat: float | None) -> None:
    delivery = {"heartbeat_seconds": heartbeat}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wove.backend_worker",
        _b64(server, backend_tasks.sleep_then, delivery=delivery, seconds=30),
        env=worker_env(),
        cwd=str(ROOT),
        stderr=asyncio.subprocess.PIPE,
    )
    assert (await recv(server))["type"] == "task_started"
    if heartbeat:
        assert (await recv(server))["type"] == "heartbeat"
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    frame = await recv(server)
    while frame["type"] == "heartbeat":
        frame = await recv(server)
    assert isinstance(frame.pop("at"), float) and isinstance(frame.pop("execution"), str)
    assert frame == {"type": "task_cancelled", "run_id": "run-1", "task_id": "task-run-1"}
    assert proc.returncode == 128 + signal.SIGTERM, err
    await no_frame(server, 0.1)


CHAINED = """
import signal, sys
from wove.backend import payload_from_b64, run_backend_payload

def previous(signum, frame):
    print("previous handler ran", flush=True)

signal.signal(signal.SIGTERM, previous)
try:
    run_backend_payload(payload_from_b64(sys.stdin.read()))
finally:
    print("handler restored:", signal.getsignal(signal.SIGTERM) is previous, flush=True)
"""


async def test_sigterm_runs_the_previous_handler_then_exits(server: BackendCallbackServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHAINED,
        env=worker_env(),
        cwd=str(ROOT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(_b64(server, backend_tasks.sleep_then, seconds=30).encode())
    proc.stdin.close()
    assert (await recv(server))["type"] == "task_started"
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert (await recv(server))["type"] == "task_cancelled"
    assert out.decode().splitlines() == ["previous handler ran", "handler restored: True"]
    assert proc.returncode == 143, err
