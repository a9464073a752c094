"""A script whose weave holds many remote tasks until someone presses Ctrl-C (the test sends SIGINT).

``python -m tests.reliability.cancel_weave '<json settings>'`` maps ``tasks.hold`` over ``items`` in the ``jobs``
environment (``executor``, ``executor_config``). Once every run is submitted it writes ``status`` (a JSON file with the
callback server's port). On Ctrl-C it prints one JSON line: each run's id and status, the runtime's tasks left after
the cancel, the pool's worker pids, how long ``wove.shutdown()`` took, and whether the callback port was released.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import wove
from tests.reliability.tasks import hold
from wove import weave
from wove.environment import get_runtime


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` any more: a new server could take it (connections the old one closed may linger in
    TIME_WAIT, which ``SO_REUSEADDR`` allows, as every asyncio server sets it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def other_threads(grace: float) -> list[str]:
    """Threads still alive after ``grace`` seconds (idle pool threads of a closed loop exit on their own)."""
    deadline = time.monotonic() + grace
    while True:
        alive = sorted(t.name for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive())
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def callback_port(server: Any) -> int:
    """The port the callback server listens on (its public URL's, as nothing sits in between here)."""
    return int(urlsplit(server.public_url).port or 0)


def watch(items: int, status: Path, stop: threading.Event) -> None:
    """Write ``status`` once all ``items`` runs are in flight (submitted, not resolved)."""
    runtime = get_runtime()
    while not stop.wait(0.01):
        env = runtime._environments.get("jobs")
        if env is None or len(runtime._runs) < items:
            continue
        server = getattr(env.executor, "server", None)
        status.write_text(json.dumps({"port": callback_port(server), "in_flight": len(runtime._runs)}))
        return


async def runtime_tasks() -> list[str]:
    """The runtime loop's tasks other than this one: what would be left if the loop stopped now."""
    me = asyncio.current_task()
    return sorted(getattr(task.get_coro(), "__qualname__", "?") for task in asyncio.all_tasks() if task is not me)


def main(settings: dict[str, Any]) -> int:
    logging.basicConfig(level=logging.WARNING)  # anything wove or asyncio complains about goes to stderr
    jobs = {"executor": settings["executor"], "executor_config": settings.get("executor_config", {})}
    wove.config(environments={"default": {"executor": "local"}, "jobs": jobs})
    items, status = int(settings["items"]), Path(settings["status"])
    stop = threading.Event()
    threading.Thread(target=watch, args=(items, status, stop), daemon=True).start()
    holder: dict[str, Any] = {}
    try:
        with weave(items=range(items), folder=settings["folder"]) as w:
            holder["w"] = w
            w.do("items", environment="jobs")(hold)
    except KeyboardInterrupt:
        interrupted = time.time()
    else:
        print(json.dumps({"error": "the weave finished without being interrupted"}))
        return 1
    stop.set()
    records = holder["w"].result.records["hold"]
    runtime = get_runtime()
    env = runtime._environments["jobs"]
    server = env.executor.server  # type: ignore[attr-defined]
    port = callback_port(server)
    adapter = env.executor.adapter  # type: ignore[attr-defined]
    left = runtime.call(runtime_tasks(), timeout=10)
    pending = {"runs": len(runtime._runs), "callback_runs": len(server.pending_runs)}
    worker_pids = list(adapter.worker_pids()) if hasattr(adapter, "worker_pids") else []
    began = time.monotonic()
    wove.shutdown()
    shutdown_seconds = time.monotonic() - began
    threads = other_threads(grace=5.0)
    print(
        json.dumps(
            {
                "interrupted_at": interrupted,
                "runs": [{"run_id": r.run_id, "status": r.status, "item": r.item} for r in records],
                "pending_after_cancel": pending,
                "runtime_tasks_after_cancel": left,
                "worker_pids": worker_pids,
                "shutdown_seconds": round(shutdown_seconds, 3),
                "port": port,
                "port_released": port_free(port),
                "threads_after_shutdown": threads,
            }
        ),
        flush=True,
    )
    return 130


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
