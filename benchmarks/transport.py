"""The callback transport's costs: ingest throughput, worker round trips, cold CLI workers, payload scaling.

Sections (each prints a table):

* ingest      frames/s the callback server takes from 1, 4 and 16 posting processes (``post_event``, one
              keep-alive connection each, run-scoped URLs), and how many frames were lost. Beside it, the same
              raw-socket posters against aiohttp's own low-level server with a handler that only reads the body
              and answers: the most any aiohttp-based receiver can take on this machine. And posters that send
              eight frames a request (``CallbackConnection.post_many``, the batches ``process`` pool workers send).
* roundtrip   payload built -> long-lived worker process -> ``task_result`` at ``recv()``; median and p99, for the
              sync entrypoint and the async one.
* cold        ``python -m wove.backend_worker B64`` spawned per run until ``task_result`` at ``recv()``; beside it
              the bare interpreter start, and the same worker with ``wove/__init__`` bypassed (the transport's own
              share; the package's ``__init__`` adds ``wove.config`` and ``wove.weave``).
* scaling     1 KiB .. 100 MiB argument echoed back as the result (by reference above the inline limit): round-trip
              time and peak RSS growth on each side, each size in fresh processes.

Targets: ingest >= 12,000 frames/s with 16 posters and none lost; round trip median <= 1 ms; cold CLI <= 60 ms;
100 MiB round trip <= 1.5 s with peak memory <= 2x the data on each side.

Run: python benchmarks/transport.py [--only ingest,roundtrip,cold,scaling] [--quick] [--python PATH]

``--python`` runs the worker processes under another interpreter, e.g. a fresh virtualenv with ``wove[dispatch]``
installed the ordinary way (an editable install's import hook slows every start); ``wove`` still comes from this
checkout, ahead on ``PYTHONPATH``. The scaling section's workers also need ``psutil`` there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from wove.backend import BackendCallbackServer, build_backend_payload_for_run, payload_to_b64
from wove.environment.event_loop import new_runtime_loop, runtime_loop_kind

ROOT = Path(__file__).resolve().parents[1]
KIB, MIB = 1 << 10, 1 << 20

POSTER = r"""
import sys
from wove.backend import post_event
url, run_id, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
post_event(url, {"type": "task_started", "run_id": run_id})  # warm: connection open, imports done
print("ready", flush=True)
sys.stdin.readline()
for n in range(count):
    post_event(url, {"type": "heartbeat", "run_id": run_id, "task_id": n})
"""

#: Eight frames a request, as a ``process`` pool worker posts the outcomes of consecutive short runs.
BATCH_POSTER = r"""
import sys
from wove.backend.client import CallbackConnection, HeldFrame
from wove.backend.codec import encode_frame
url, run_id, count = sys.argv[1], sys.argv[2], int(sys.argv[3])

def held(n):
    frame = {"type": "heartbeat", "run_id": run_id, "task_id": n}
    return HeldFrame(url, frame, encode_frame(frame))

with CallbackConnection(url) as conn:
    conn.post({"type": "task_started", "run_id": run_id})  # warm: connection open, imports done
print("ready", flush=True)
sys.stdin.readline()
with CallbackConnection(url) as conn:
    for start in range(0, count, 8):
        errors = conn.post_many([held(n) for n in range(start, min(start + 8, count))])
        assert not any(errors), errors
"""

#: A minimal client (one write per request, no header parsing beyond Content-Length): measures the server alone.
RAW_POSTER = r"""
import json, socket, sys
from urllib.parse import urlsplit
url, run_id, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
target = urlsplit(url)
sock = socket.create_connection((target.hostname, target.port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
stream = sock.makefile("rb")

def post(frame):
    body = json.dumps(frame).encode()
    head = f"POST {target.path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    status, length = stream.readline(), 0
    assert b" 200 " in status, status
    while (line := stream.readline()) != b"\r\n":
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    stream.read(length)

post({"type": "task_started", "run_id": run_id})
print("ready", flush=True)
sys.stdin.readline()
for n in range(count):
    post({"type": "heartbeat", "run_id": run_id, "task_id": n})
"""

SYNC_WORKER = r"""
import json, sys
from wove.backend import run_backend_payload
print("ready", flush=True)
for line in sys.stdin:
    run_backend_payload(json.loads(line))
"""

ASYNC_WORKER = r"""
import asyncio, json, sys
from wove.backend import run_backend_payload_async
from wove.backend.aclient import keep_connections

async def main():
    keep_connections()  # a long-lived async worker, as the ARQ/Taskiq/Temporal workers are
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    while line := await reader.readline():
        await run_backend_payload_async(json.loads(line))

asyncio.run(main())
"""

#: The CLI worker with the ``wove`` package's ``__init__`` bypassed: what the transport itself costs at start.
BARE_CLI = r"""
import sys, types
package = types.ModuleType("wove")
package.__path__ = [sys.argv.pop(1)]
sys.modules["wove"] = package
import runpy
runpy.run_module("wove.backend_worker", run_name="__main__", alter_sys=True)
"""

SCALING_WORKER = r"""
import json, resource, sys
import psutil
from wove.backend import run_backend_payload
print("ready", flush=True)
run_backend_payload(json.loads(sys.stdin.readline()))  # warm-up
payload = json.loads(sys.stdin.readline())
before = psutil.Process().memory_info().rss
run_backend_payload(payload)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": peak - before}), flush=True)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # An installed package starts from compiled bytecode: without it, each start would compile what changed.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _frame(run_id: str, fn: Any = dict, **args: Any) -> dict[str, Any]:
    # ``dict`` as the task: importable everywhere, returns its keyword arguments (the result references the input).
    return {
        "type": "run_task",
        "run_id": run_id,
        "task_id": run_id,
        "task_name": "echo",
        "callable": fn,
        "args": args,
        "delivery": {},
    }


async def _spawn(python: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        python,
        *args,
        env=_env(),
        cwd=str(ROOT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def _ready(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line.strip() == b"ready", line


async def _until_result(server: BackendCallbackServer, run_id: str) -> dict[str, Any]:
    while True:
        frame = await asyncio.wait_for(server.recv(), 120)
        if frame["run_id"] == run_id and frame["type"] in ("task_result", "task_error"):
            return frame


def _children_cpu() -> float:
    """CPU seconds used by waited-for child processes (the posters), user and system."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(cell).rjust(w) for cell, w in zip(row, widths, strict=True)))


# -- ingest -----------------------------------------------------------------------------------------------------------


class BareAiohttp:
    """aiohttp's low-level server answering every POST with 200 after reading its body, nothing else: the floor."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[str] = asyncio.Queue()
        self._runner: web.ServerRunner | None = None
        self.port = 0

    async def __aenter__(self) -> BareAiohttp:
        self._runner = web.ServerRunner(web.Server(self._handle, access_log=None))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        await request.read()
        self.frames.put_nowait(request.path)
        return web.Response(body=b'{"status":"accepted"}', content_type="application/json")

    def open_run(self, run_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/wove/runs/{run_id}/x"

    async def recv(self) -> dict[str, str]:
        return {"run_id": (await self.frames.get()).split("/")[3]}


async def ingest(quick: bool, python: str) -> None:
    total = 20_000 if quick else 60_000
    rows = []
    cases = [("post_event", POSTER, n) for n in (1, 4, 16)] + [("raw socket", RAW_POSTER, n) for n in (4, 16)]
    cases += [("post_many, 8 a request", BATCH_POSTER, n) for n in (1, 4, 16)]
    cases += [("raw socket -> bare aiohttp", RAW_POSTER, n) for n in (4, 16)]
    for client, script, posters in cases:
        receiver = BareAiohttp() if "bare" in client else BackendCallbackServer()
        async with receiver as server:
            each = total // posters
            procs = []
            for n in range(posters):
                url = server.open_run(f"poster-{n}")
                procs.append(await _spawn(python, "-c", script, url, f"poster-{n}", str(each)))
            for proc in procs:
                await _ready(proc)
            for _ in procs:
                await server.recv()  # the warm-up task_started frames
            started = time.perf_counter()
            cpu_started = time.process_time()
            children_started = _children_cpu()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            received, seen = 0, {f"poster-{n}": 0 for n in range(posters)}
            try:
                while received < each * posters:
                    frame = await asyncio.wait_for(server.recv(), 30)
                    received += 1
                    seen[frame["run_id"]] += 1
            except asyncio.TimeoutError:
                pass
            elapsed = time.perf_counter() - started
            server_cpu = time.process_time() - cpu_started
            for proc in procs:
                await proc.wait()
            client_cpu = _children_cpu() - children_started
            rows.append(
                [
                    client,
                    str(posters),
                    f"{each * posters:,}",
                    f"{received / elapsed:,.0f}",
                    str(each * posters - received),
                    f"{elapsed:.2f}",
                    f"{server_cpu / max(received, 1) * 1e6:.0f}",
                    f"{client_cpu / max(received, 1) * 1e6:.0f}",
                ]
            )
    _table(
        "callback ingest (heartbeat frames over run URLs, one keep-alive connection per poster; 'raw socket' "
        "posters cost almost nothing, so their rows show the server's own ceiling; 'bare aiohttp' is aiohttp's "
        "low-level server reading each body and answering, without wove)",
        ["client", "posters", "frames", "frames/s", "lost", "seconds", "server us/frame", "client us/frame"],
        rows,
    )


# -- long-lived worker round trip -------------------------------------------------------------------------------------


async def roundtrip(quick: bool, python: str) -> None:
    runs = 500 if quick else 2000
    rows = []
    for label, args in (
        ("sync run_backend_payload", ["-c", SYNC_WORKER]),
        ("async run_backend_payload_async", ["-c", ASYNC_WORKER]),
    ):
        async with BackendCallbackServer() as server:
            proc = await _spawn(python, *args)
            await _ready(proc)
            assert proc.stdin is not None
            samples = []
            for n in range(runs + 100):
                run_id = f"rt-{n}"
                started = time.perf_counter()
                payload = build_backend_payload_for_run(_frame(run_id, n=n), server=server, adapter="bench")
                proc.stdin.write(json.dumps(payload).encode() + b"\n")
                await proc.stdin.drain()
                frame = await _until_result(server, run_id)
                if n >= 100:  # warm-up excluded
                    samples.append(time.perf_counter() - started)
                assert frame["result"] == {"n": n}
            proc.stdin.close()
            await proc.wait()
        rows.append([label, str(runs), f"{statistics.median(samples) * 1e3:.3f}", f"{_pct(samples, 0.99) * 1e3:.3f}"])
    _table(
        "worker round trip: payload built -> long-lived worker -> task_result at recv()",
        ["entrypoint", "runs", "median ms", "p99 ms"],
        rows,
    )


# -- cold CLI worker --------------------------------------------------------------------------------------------------


async def cold(quick: bool, python: str) -> None:
    runs = 10 if quick else 30
    rows = []
    async with BackendCallbackServer() as server:
        for label, prefix in (
            ("python -m wove.backend_worker", ["-m", "wove.backend_worker"]),
            ("same, wove/__init__ bypassed", ["-c", BARE_CLI, str(ROOT / "wove")]),
        ):
            samples, cpu = [], []
            for n in range(runs + 2):
                run_id = f"cold-{label[:4]}-{n}"
                started = time.perf_counter()
                text = payload_to_b64(build_backend_payload_for_run(_frame(run_id, n=n), server=server, adapter="b"))
                before = _children_cpu()
                proc = await asyncio.create_subprocess_exec(python, *prefix, text, env=_env(), cwd=str(ROOT))
                await _until_result(server, run_id)
                if n >= 2:
                    samples.append(time.perf_counter() - started)
                assert await proc.wait() == 0
                if n >= 2:
                    cpu.append(_children_cpu() - before)
            rows.append([label, *_cold_columns(samples, cpu)])
    bare, bare_cpu = [], []
    for _ in range(runs):
        started, before = time.perf_counter(), _children_cpu()
        subprocess.run([python, "-c", "pass"], check=True, env=_env())  # noqa: ASYNC221 (timing it)
        bare.append(time.perf_counter() - started)
        bare_cpu.append(_children_cpu() - before)
    rows.append(["python -c pass (reference)", *_cold_columns(bare, bare_cpu)])
    _table(
        "cold CLI worker: spawn -> task_result at recv() (process CPU is the steadier figure on a busy machine)",
        ["command", "median ms", "p90 ms", "process CPU ms"],
        rows,
    )


def _cold_columns(samples: list[float], cpu: list[float]) -> list[str]:
    return [
        f"{statistics.median(samples) * 1e3:.1f}",
        f"{_pct(samples, 0.9) * 1e3:.1f}",
        f"{statistics.median(cpu) * 1e3:.1f}",
    ]


# -- payload scaling --------------------------------------------------------------------------------------------------


async def _scaling_one(size: int, python: str) -> dict[str, float]:
    """One size in this (fresh) process: time and peak RSS growth on both sides."""
    async with BackendCallbackServer() as server:
        proc = await _spawn(python, "-c", SCALING_WORKER)
        await _ready(proc)
        assert proc.stdin is not None and proc.stdout is not None
        # warm-up run: first connection, lazily imported modules, thread pools
        warm = build_backend_payload_for_run(_frame("warm", data=b"w"), server=server, adapter="bench")
        proc.stdin.write(json.dumps(warm).encode() + b"\n")
        await proc.stdin.drain()
        await _until_result(server, "warm")
        data = b"\x5a" * size
        me = psutil.Process()
        import resource

        before = me.memory_info().rss
        started = time.perf_counter()
        payload = build_backend_payload_for_run(_frame("scale", data=data), server=server, adapter="bench")
        proc.stdin.write(json.dumps(payload).encode() + b"\n")
        await proc.stdin.drain()
        frame = await _until_result(server, "scale")
        elapsed = time.perf_counter() - started
        submit_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        assert len(frame["result"]["data"]) == size
        worker = json.loads(await proc.stdout.readline())
        await proc.wait()
    return {"seconds": elapsed, "submit_peak": submit_peak, "worker_peak": worker["peak"]}


async def scaling(quick: bool, python: str) -> None:
    sizes = [KIB, 64 * KIB, MIB, 10 * MIB, 100 * MIB]
    rows = []
    for size in sizes:
        out = subprocess.run(  # noqa: ASYNC221 (nothing else runs meanwhile)
            [sys.executable, __file__, "--scaling-one", str(size), "--python", python],
            check=True,
            env=_env(),
            capture_output=True,
        )
        result = json.loads(out.stdout)
        ratio = size >= 10 * MIB  # below that, the processes' own baseline swamps the data
        rows.append(
            [
                f"{size // KIB:,} KiB" if size < MIB else f"{size // MIB} MiB",
                f"{result['seconds'] * 1e3:.1f}",
                f"{result['submit_peak'] / MIB:.1f}" + (f" ({result['submit_peak'] / size:.2f}x)" if ratio else ""),
                f"{result['worker_peak'] / MIB:.1f}" + (f" ({result['worker_peak'] / size:.2f}x)" if ratio else ""),
            ]
        )
    _table(
        "payload scaling: argument echoed back as the result (long-lived worker, by reference above 32 KiB)",
        ["size", "round trip ms", "submit peak MiB", "worker peak MiB"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="ingest,roundtrip,cold,scaling")
    parser.add_argument("--quick", action="store_true", help="fewer frames and runs")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the worker processes")
    parser.add_argument("--scaling-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scaling_one:
        print(json.dumps(_run(_scaling_one(args.scaling_one, args.python))))
        return
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, workers run by {args.python}, "
        f"callback server on the {runtime_loop_kind()} loop (WOVE_EVENT_LOOP)"
    )
    sections = {"ingest": ingest, "roundtrip": roundtrip, "cold": cold, "scaling": scaling}
    for name in args.only.split(","):
        _run(sections[name](args.quick, args.python))


def _run(coro: Any) -> Any:
    """Run ``coro`` on the kind of loop wove's runtime uses, where the callback server lives in a weave."""
    loop = new_runtime_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


if __name__ == "__main__":
    main()
