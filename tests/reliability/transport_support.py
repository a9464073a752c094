"""Tools for attacking the callback transport: a callback server on its own thread, raw HTTP, a tripwire pickle, a
TCP proxy that takes the server off the network, and resource snapshots.

The server runs on a thread with its own event loop, so a test (or a hypothesis example) can hammer it with plain
blocking sockets, and its tasks and connections can be counted apart from the test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httptools
import psutil  # type: ignore[import-untyped]

from tests.services.base import require_binary
from wove._types import TERMINAL_EVENTS, Frame
from wove.backend import BackendCallbackServer, codec, serialize_frame
from wove.environment.remote import BackendAdapterEnvironmentExecutor

T = TypeVar("T")

#: Characters of the master token and of run credentials (URL-safe base64).
TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def record(scenario: str, **measured: Any) -> None:
    """Print what a scenario counted and measured; append it to ``$WOVE_RELIABILITY_LOG`` as a JSON line."""
    line = json.dumps({"scenario": scenario, **measured}, default=str)
    print(f"\nreliability: {line}")
    path = os.environ.get("WOVE_RELIABILITY_LOG")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


# -- the tripwire ---------------------------------------------------------------------------------------------------

#: Paths passed to :func:`trip`, in call order: anything here means a body was unpickled.
TRIPS: list[str] = []


def trip(path: str) -> str:
    """Called by unpickling a :class:`Tripwire`: flips this module's record and creates ``path``."""
    TRIPS.append(path)
    Path(path).touch()
    return path


class Tripwire:
    """A value whose unpickling calls :func:`trip`; sent where nothing may be unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return trip, (self.path,)


def json_body(frame: Frame) -> bytes:
    """A frame in the JSON wire form (pickles as base64 text)."""
    return json.dumps(serialize_frame(frame)).encode()


def envelope_body(frame: Frame) -> bytes:
    """A frame in the binary envelope wire form."""
    encoded = codec.encode_frame(frame)
    return b"".join(bytes(part) for part in encoded.parts)


# -- a callback server on its own thread ----------------------------------------------------------------------------


class ServerThread:
    """A :class:`BackendCallbackServer` serving from a thread of its own; accepted frames collect in ``frames``."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.server = BackendCallbackServer(**options)
        self.frames: list[Frame] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="callback-server", daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.server.deliver_to(self.frames.append)
        self.run(self.server.start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.run(self.server.stop())
        self.run(_drain())  # connections aiohttp cancelled at stop (a lingering read) finish before the loop closes
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` on the server's loop (the server's methods are not thread-safe)."""

        async def inside() -> T:
            return fn(*args)

        return self.run(inside())

    @property
    def port(self) -> int:
        assert self.server.public_url is not None
        return int(self.server.public_url.rsplit(":", 1)[1])

    @property
    def master_path(self) -> str:
        return f"/wove/events/{self.server.token}"

    def open_run(self, run_id: str) -> str:
        """Open ``run_id`` and return the path of its run URL."""
        return path_of(self.call(self.server.open_run, run_id))

    def run_path(self, run_id: str) -> str:
        return path_of(self.call(self.server.run_url, run_id))

    def accepted(self) -> list[Frame]:
        """A copy of the frames accepted so far (read on the server's loop)."""
        return self.call(list, self.frames)

    def usage(self) -> Usage:
        """What the server holds right now: asyncio tasks, HTTP connections, sockets on its port, and RSS."""

        async def inside() -> tuple[int, int]:
            runner = self.server._runner  # private: aiohttp's open request handlers, nothing public counts them
            handlers = len(runner.server.connections) if runner is not None and runner.server is not None else 0
            return len(asyncio.all_tasks(self.loop)), handlers

        tasks, handlers = self.run(inside())
        return Usage(tasks, handlers, sockets_on(self.port), psutil.Process().memory_info().rss)


async def _drain() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def path_of(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


def sockets_on(port: int) -> int:
    """TCP sockets of this process whose local port is ``port`` and that are not closed yet (listener excluded)."""
    return sum(
        1
        for conn in psutil.Process().net_connections("tcp")
        if conn.laddr and conn.laddr.port == port and conn.status != psutil.CONN_LISTEN
    )


@dataclass
class Usage:
    tasks: int
    connections: int
    sockets: int
    rss: int


def wait_for(condition: Callable[[], bool], bound: float, what: str) -> float:
    """Poll ``condition`` until true and return the seconds it took; fail as a hang after ``bound`` seconds."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > bound:
            raise AssertionError(f"hang: {what} still not true after {bound}s")
        time.sleep(0.05)
    return time.monotonic() - began


# -- raw HTTP -------------------------------------------------------------------------------------------------------


def build_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    chunked: bool = False,
    close: bool = True,
) -> bytes:
    """A request exactly as given (no validation); Content-Length or chunked framing added unless a header says."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    named = {name.lower() for name, _ in headers or []}
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if close and "connection" not in named:
        lines.append("Connection: close")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        framed = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in _pieces(body, 1000)) + b"0\r\n\r\n"
    else:
        if "content-length" not in named and (body or method not in ("GET", "HEAD")):
            lines.append(f"Content-Length: {len(body)}")
        framed = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + framed


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@dataclass
class Answer:
    """What came back for one raw request: the status (``None`` when the server closed without answering)."""

    status: int | None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}


class _Collect:
    def __init__(self, head_only: bool) -> None:
        self.head_only = head_only
        self.status: int | None = None
        self.body = bytearray()
        self.headers: dict[str, str] = {}
        self.done = False
        self.parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.head_only:
            self.done = True

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.done = True


def exchange(port: int, data: bytes, *, timeout: float = 10.0, head: bool = False) -> Answer:
    """Send ``data`` as is on a fresh connection and read one answer (or none: closed, reset, or ``timeout``)."""
    collect = _Collect(head)
    parser = collect.parser = httptools.HttpResponseParser(collect)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # an early refusal: read it anyway
            sock.sendall(data)
        with contextlib.suppress(TimeoutError, ConnectionResetError, httptools.HttpParserError):
            while not collect.done:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                parser.feed_data(chunk)
    collect.parser = None
    return Answer(collect.status, bytes(collect.body), collect.headers)


def post(port: int, path: str, body: bytes, content_type: str = "application/json", **headers: str) -> Answer:
    """POST ``body`` to ``path`` with well-formed framing."""
    sent = [("Content-Type", content_type), *headers.items()]
    return exchange(port, build_request("POST", path, sent, body))


# -- a TCP proxy that can take the server off the network -----------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to the callback server. :meth:`drop` closes the listener and resets every open
    connection (workers see the server unreachable); :meth:`restore` listens on the same port again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._listener: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> TcpProxy:
        self._listener = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._listener.sockets[0].getsockname()[1]
        return self

    async def drop(self) -> None:
        assert self._listener is not None
        listener, self._listener = self._listener, None
        listener.close()
        for writer in list(self._open):  # before yielding to the loop: no pump forwards another byte
            writer.transport.abort()
        self._open.clear()
        await listener.wait_closed()

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        if self._listener is not None:
            await self.drop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._open.update((writer, up_writer))
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer), return_exceptions=True)
        for each in (writer, up_writer):
            self._open.discard(each)
            each.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        writer.transport.abort()


async def until(condition: Callable[[], bool | Awaitable[bool]], bound: float, what: str) -> float:
    """Async :func:`wait_for`: poll until true, fail as a hang after ``bound`` seconds; return the seconds taken."""
    began = time.monotonic()
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return time.monotonic() - began
        if time.monotonic() - began > bound:
            raise AssertionError(f"hang: {what} still not true after {bound}s")
        await asyncio.sleep(0.05)


# -- TLS ------------------------------------------------------------------------------------------------------------


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1, made with the openssl command."""
    openssl = require_binary("openssl", "apt-get install openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


# -- driving an executor as the runtime does ------------------------------------------------------------------------


class ExecutorDriver:
    """Sends ``run_task`` frames to a :class:`BackendAdapterEnvironmentExecutor` and collects each run's frames."""

    def __init__(self, executor: BackendAdapterEnvironmentExecutor) -> None:
        self.executor = executor
        self.frames: dict[str, list[Frame]] = {}
        self.terminal: Counter[str] = Counter()
        self._receiver = asyncio.get_running_loop().create_task(self._receive())

    @classmethod
    async def start(cls, executor_config: dict[str, Any], name: str = "reliability") -> ExecutorDriver:
        executor = BackendAdapterEnvironmentExecutor(name)
        await executor.start(
            environment_name=name,
            environment_config={"executor": "process", "executor_config": executor_config},
            run_config={},
        )
        return cls(executor)

    async def _receive(self) -> None:
        while True:
            frame = await self.executor.recv()
            self.frames.setdefault(frame["run_id"], []).append(frame)
            if frame["type"] in TERMINAL_EVENTS:
                self.terminal[frame["run_id"]] += 1

    async def submit(self, func: Callable[..., Any], **args: Any) -> str:
        run_id = uuid.uuid4().hex
        frame = {
            "type": "run_task",
            "run_id": run_id,
            "task_id": f"task-{run_id[:6]}",
            "task_name": func.__name__,
            "callable": func,
            "args": args,
            "delivery": {},
        }
        await self.executor.send(frame)
        return run_id

    def outcome(self, run_id: str) -> Frame | None:
        """The run's first terminal frame, if it has one."""
        return next((f for f in self.frames.get(run_id, []) if f["type"] in TERMINAL_EVENTS), None)

    async def close(self) -> None:
        self._receiver.cancel()
        await asyncio.gather(self._receiver, return_exceptions=True)
        await self.executor.stop()


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick; another process could take it, which none here does)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
