"""A bare pipeline on the parts the ``process`` backend is built from, one request per run: the floor of that design.

A thread runs an event loop (the runtime's loop kind) with aiohttp's low-level server on a Unix socket and worker
subprocesses fed JSON lines on their stdin; each worker unpickles its arguments, runs the function, and posts a
plain JSON frame over a raw keep-alive socket; the handler unpickles the result and hands the next line to that
worker. No run records, credentials, delivery policies, envelope, retries or HTTP parser on the worker side, so it
is not a backend: it only shows what the same processes, pipes and HTTP exchange cost by themselves when every run
has its own request and its own pipe write (the ``process`` pool itself batches both while runs are short).

Used by ``benchmarks/process_backend.py --bare``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from wove.environment.event_loop import new_runtime_loop

WORKER = r"""
import base64, importlib, json, pickle, socket, sys
module, _, name = sys.argv[2].partition(":")
func = getattr(importlib.import_module(module), name)
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
for line in sys.stdin.buffer:
    job = json.loads(line)
    result = func(*pickle.loads(base64.b64decode(job["args"])))
    body = json.dumps({"id": job["id"], "result": base64.b64encode(pickle.dumps(result)).decode()}).encode()
    sock.sendall(b"POST /result HTTP/1.1\r\nHost: bare\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, rest = answer.partition(b"\r\n\r\n")
    length = int(next(l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")).split(b":")[1])
    while len(rest) < length:
        rest += sock.recv(65536)
"""


class BarePipeline:
    """``map(func_path, args)`` over ``workers`` subprocesses; ``func_path`` is ``module:function``."""

    def __init__(self, workers: int, func_path: str) -> None:
        self.loop = new_runtime_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bare-pipeline", daemon=True)
        self.thread.start()
        self.directory = tempfile.mkdtemp(prefix="wove-bare-")
        self.path = os.path.join(self.directory, "s.sock")
        self.waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Any]] = {}
        self.queue: deque[tuple[int, bytes, asyncio.AbstractEventLoop, asyncio.Future[Any]]] = deque()
        self.idle: list[Any] = []
        self.ids = itertools.count()
        asyncio.run_coroutine_threadsafe(self._start(workers, func_path), self.loop).result()

    async def _start(self, workers: int, func_path: str) -> None:
        self.runner = web.ServerRunner(web.Server(self._handle, access_log=None))
        await self.runner.setup()
        await web.UnixSite(self.runner, self.path).start()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        for _ in range(workers):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", WORKER, self.path, func_path, stdin=subprocess.PIPE, env=env
            )
            self.idle.append(process)

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        frame = json.loads(await request.read())
        loop, future, process = self.waiting.pop(frame["id"])
        self.idle.append(process)
        self._dispatch()
        loop.call_soon_threadsafe(future.set_result, pickle.loads(base64.b64decode(frame["result"])))
        return web.Response(body=b'{"status":"accepted"}', content_type="application/json")

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            process = self.idle.pop()
            run, line, loop, future = self.queue.popleft()
            self.waiting[run] = (loop, future, process)
            process.stdin.write(line)

    def _enqueue(self, jobs: list[tuple[int, bytes, asyncio.AbstractEventLoop, asyncio.Future[Any]]]) -> None:
        self.queue.extend(jobs)
        self._dispatch()

    async def _map(self, arguments: list[tuple[Any, ...]]) -> list[Any]:
        loop = asyncio.get_running_loop()
        jobs = []
        for args in arguments:
            run = next(self.ids)
            line = json.dumps({"id": run, "args": base64.b64encode(pickle.dumps(args)).decode()}).encode() + b"\n"
            jobs.append((run, line, loop, loop.create_future()))
        self.loop.call_soon_threadsafe(self._enqueue, jobs)
        return list(await asyncio.gather(*(future for _, _, _, future in jobs)))

    def map(self, arguments: Iterable[tuple[Any, ...]]) -> list[Any]:
        return asyncio.run(self._map(list(arguments)))

    def close(self) -> None:
        async def stop() -> None:
            for process in self.idle:
                assert process.stdin is not None
                process.stdin.close()
                await process.wait()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.rmdir(self.directory)
