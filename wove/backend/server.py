"""The callback server: an aiohttp receiver inside the submitting process that turns worker posts into frames.

URLs (any path prefix before ``/wove/`` is ignored, so a reverse proxy may add one)::

    POST /wove/events/<token>                          master URL: any run (the plain composition, in-process use)
    POST /wove/runs/<run_id>/<credential>              run URL: frames of that pending run only
    GET  /wove/runs/<run_id>/<credential>/blobs/<ref>  a by-reference payload body of that run
    POST /wove/runs/<run_id>/<credential>/upload?offset=&total=   one part of a frame larger than max_body_size
    POST /wove/batch                                   frames of several runs, each with its run URL's path

No request body may exceed ``max_body_size`` (413 with ``limit``, checked against Content-Length and while
streaming, never buffered whole). A larger frame reaches a run URL in parts written straight into one buffer of its
final size (at most ``max_frame_size``), then a bodiless request with ``X-Wove-Upload: <total>`` posts it.

Every refusal happens before anything in the body is unpickled and answers JSON ``{"error": reason, "detail"}``:
401 ``bad_credential``, 403 ``run_not_pending`` / ``run_mismatch``, 404 ``not_found`` / ``blob_not_found``, 405,
408 ``body_timeout`` (no byte of the body for ``idle_timeout`` seconds; the connection is closed),
409 ``run_already_started`` (a second execution of a started run: a duplicate delivery),
413 ``body_too_large`` / ``frame_too_large``, 400 for malformed bodies (``bad_json``, ``bad_base64``, ``bad_pickle``,
``bad_envelope``, ``bad_frame``, ``unknown_type``, ``missing_run_id``, ``incomplete_body``, ``bad_upload``,
``upload_incomplete``).

A batch (:mod:`wove.backend.batch`) answers 200 with one result per entry; each entry is checked like a post to its
run URL (401, 403, 400 ... in its own result, nothing of a refused entry unpickled). A malformed batch is 400
``bad_batch``, and 415 ``bad_content_type`` when it is not sent as a batch.

The same URLs may also be served on a Unix socket (:meth:`BackendCallbackServer.listen_unix`) for workers on this
host.

A run closes when the server accepts its first terminal frame, or when :meth:`close_run` is called. Later frames on
its run URL are refused with ``run_not_pending``; on the master URL, repeated terminal frames of a resolved run are
acknowledged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import socket
import ssl
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import StreamReader, web

from wove._types import TERMINAL_EVENTS, Frame
from wove.backend import codec
from wove.backend.batch import BATCH_CONTENT_TYPE, split_batch
from wove.backend.credentials import new_secret, new_token, run_credential, same_secret, verify_run_credential
from wove.backend.delivery import UPLOAD_HEADER
from wove.backend.streams import read_stream
from wove.errors import BackendUnavailableError, ConfigError, DispatchError

__all__ = ["BackendCallbackServer"]

logger = logging.getLogger(__name__)

#: Largest request body accepted (a bigger one gets 413 without being buffered).
MAX_BODY_SIZE = 64 * 1024 * 1024
#: Listen backlog: many workers may finish at once.
BACKLOG = 1024
#: Largest frame a run URL assembles from parts (each part at most ``max_body_size``).
MAX_FRAME_SIZE = 1 << 30
#: Resolved run ids remembered to drop duplicate terminal frames posted to the master URL.
RESOLVED_MEMORY = 100_000
#: Bodies above this size are decoded and unpickled in a thread, keeping the event loop free.
OFFLOAD_BYTES = 1 << 20
#: Blob downloads are written in slices of this size.
BLOB_CHUNK = 1 << 20
#: Seconds a connection may stay silent: idle between requests (aiohttp alone keeps it an hour), or inside a request
#: whose body stopped arriving (aiohttp alone waits forever). Workers reconnect on their own.
IDLE_TIMEOUT = 75.0

_TOKEN = re.compile(r"[A-Za-z0-9_.~-]+")
_JSON = {"Content-Type": "application/json"}
_ACCEPTED = b'{"status":"accepted"}'
_DUPLICATE = b'{"status":"duplicate"}'
_ACCEPTED_ENTRY = {"status": "accepted"}
_DUPLICATE_ENTRY = {"status": "duplicate"}


class _Refusal(Exception):
    def __init__(self, status: int, reason: str, detail: str = "", **extra: Any) -> None:
        self.status = status
        self.reason = reason
        self.detail = detail or reason.replace("_", " ")
        self.extra = extra

    def response(self) -> web.Response:
        body = json.dumps({"error": self.reason, "detail": self.detail, **self.extra}).encode()
        response = web.Response(status=self.status, body=body, headers=_JSON)
        if self.status == 408:  # the rest of a stalled body may still come: this connection cannot be reused
            response.force_close()
        return response


class _StallGuard:
    """Fails a request body's stream with ``asyncio.TimeoutError`` once none of it arrived for ``seconds``.

    One timer per request that has to wait for its body, re-armed once per quiet period, not per chunk.
    """

    def __init__(self, stream: StreamReader, seconds: float) -> None:
        self._stream = stream
        self._seconds = seconds
        self._seen = stream.total_bytes
        self._timer = asyncio.get_running_loop().call_later(seconds, self._check)

    def _check(self) -> None:
        if self._stream.total_bytes != self._seen:
            self._seen = self._stream.total_bytes
            self._timer = asyncio.get_running_loop().call_later(self._seconds, self._check)
        else:
            self._stream.set_exception(asyncio.TimeoutError())

    def cancel(self) -> None:
        self._timer.cancel()


class _Upload:
    """A frame arriving in parts, in order: the parts received so far, never more memory than they hold.

    The announced total is only a bound; an upload that announces a gigabyte and sends a byte costs a byte.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.parts: list[bytearray] = []
        self.size = 0

    def place(self, offset: int, length: int) -> bool:
        """Whether a part at ``offset`` is the next one (``True``) or a resend of the last one (``False``, it
        replaces it); anything else is refused: the client sends its parts in order, resending only the last."""
        if offset == self.size:
            return True
        if self.parts and offset == self.size - len(self.parts[-1]) and length == len(self.parts[-1]):
            self.size -= len(self.parts.pop())
            return True
        raise _Refusal(400, "bad_upload", f"parts must arrive in order: expected offset {self.size}, got {offset}")

    def add(self, part: bytearray) -> None:
        self.parts.append(part)
        self.size += len(part)

    def complete(self) -> bool:
        return self.size == self.total

    def assemble(self) -> bytearray:
        """The whole frame in one buffer; each part is released as soon as it is copied in."""
        frame = bytearray(self.total)
        offset = 0
        while self.parts:
            part = self.parts.pop(0)
            frame[offset : offset + len(part)] = part
            offset += len(part)
        return frame


def _route(raw_path: str) -> tuple[str, str, str, str] | None:
    """Split a request path into ``(kind, run_id, secret, blob_ref)``; ``None`` when it is not a wove path."""
    seg = raw_path.split("?", 1)[0].split("/")
    if len(seg) >= 7 and seg[-6] == "wove" and seg[-5] == "runs" and seg[-2] == "blobs":
        return "blob", unquote(seg[-4]), seg[-3], unquote(seg[-1])
    if len(seg) >= 6 and seg[-5] == "wove" and seg[-4] == "runs" and seg[-1] == "upload":
        return "upload", unquote(seg[-3]), seg[-2], ""
    if len(seg) >= 5 and seg[-4] == "wove" and seg[-3] == "runs":
        return "run", unquote(seg[-2]), seg[-1], ""
    if len(seg) >= 4 and seg[-3] == "wove" and seg[-2] == "events":
        return "master", "", seg[-1], ""
    if len(seg) >= 3 and seg[-2] == "wove" and seg[-1] == "batch":
        return "batch", "", "", ""
    return None


class BackendCallbackServer:
    """Small HTTP receiver that turns backend worker callbacks into executor frames.

    ``public_url`` is the base URL workers use to reach this server when it differs from ``host:port`` (NAT, a
    proxy); the server appends its own paths to it, and after :meth:`start` the attribute holds the base URL in use
    either way. ``token`` fixes the master URL's secret (generated otherwise). HTTPS is served with ``ssl_context``,
    or with one built from ``ssl_certfile``/``ssl_keyfile``. A connection silent for ``idle_timeout`` seconds is
    closed (a request whose body stalled gets 408 first).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        public_url: str | None = None,
        token: str | None = None,
        max_body_size: int = MAX_BODY_SIZE,
        ssl_context: ssl.SSLContext | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        backlog: int = BACKLOG,
        resolved_memory: int = RESOLVED_MEMORY,
        max_frame_size: int = MAX_FRAME_SIZE,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        if token is not None and not _TOKEN.fullmatch(token):
            raise ConfigError("callback token may hold only letters, digits and '-', '_', '.', '~'")
        if public_url is not None and not public_url.startswith(("http://", "https://")):
            raise ConfigError(f"public_url must start with http:// or https://, not {public_url!r}")
        if not idle_timeout > 0:
            raise ConfigError(f"idle_timeout must be a positive number of seconds, not {idle_timeout!r}")
        self.host = host
        self.port = port
        self.public_url = public_url
        self.token = token or new_token()
        self.max_body_size = max_body_size
        self.max_frame_size = max_frame_size
        self.idle_timeout = idle_timeout
        if ssl_context is None and (ssl_certfile or ssl_keyfile):
            if not ssl_certfile:
                raise ConfigError("ssl_keyfile needs ssl_certfile too")
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(ssl_certfile, ssl_keyfile)
        self.ssl_context = ssl_context
        self.backlog = backlog
        #: The master URL (any run); set by :meth:`start`. Keep it inside this process.
        self.callback_url: str | None = None
        self._secret = new_secret()
        self._memory = resolved_memory
        self._public_given = public_url is not None
        self._base: str | None = public_url.rstrip("/") if public_url else None
        self._runner: web.ServerRunner | None = None
        self._queue: asyncio.Queue[Frame | None] | None = None
        self._pending: dict[str, str] = {}  # run id -> its credential, computed once at open_run
        self._resolved: OrderedDict[str, None] = OrderedDict()
        self._blobs: dict[str, dict[str, bytes]] = {}
        self._uploads: dict[str, _Upload] = {}
        self._refs = itertools.count(1)
        self._sink: Callable[[Frame], None] | None = None
        self._executions: dict[str, str] = {}  # run id -> the execution id of its accepted task_started
        self._unix_paths: list[str] = []  # sockets listen_unix made, removed at stop (with their private directories)

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for callbacks. A second call while running does nothing."""
        if self._runner is not None:
            return
        # Workers never compress; a compressed body (a zip bomb, even before the credential check) is not inflated.
        server = web.Server(self._handle, access_log=None, keepalive_timeout=self.idle_timeout, auto_decompress=False)
        runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context, backlog=self.backlog)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise BackendUnavailableError(f"callback server cannot listen on {self.host}:{self.port}: {exc}") from exc
        self._runner = runner
        self._queue = asyncio.Queue()
        if not self._public_given:
            scheme = "https" if self.ssl_context else "http"
            host = socket.gethostname() if self.host in ("", "0.0.0.0", "::") else self.host
            host = f"[{host}]" if ":" in host else host
            self._base = self.public_url = f"{scheme}://{host}:{runner.addresses[0][1]}"
        self.callback_url = f"{self._base}/wove/events/{self.token}"
        logger.debug("callback server listening on %s:%s", self.host, runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening and wake :meth:`recv`. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await runner.cleanup()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(path))
        self._unix_paths.clear()
        self._pending.clear()
        self._blobs.clear()
        self._uploads.clear()
        self._executions.clear()
        if self._queue is not None:
            self._queue.put_nowait(None)

    async def listen_unix(self) -> str:
        """Also serve on a Unix socket, for workers on this host; returns its path.

        The same URLs, credentials and TLS apply. The socket lives in a new private directory (mode 0700), so only
        this user can connect, and both go at :meth:`stop`. A frame over a Unix socket skips the kernel's loopback
        TCP stack, a sizeable part of what a small frame costs both sides. Raises
        :class:`BackendUnavailableError` when the server is not started or the platform has no Unix sockets.
        """
        if self._runner is None:
            raise BackendUnavailableError("callback server is not running: call start() before listen_unix()")
        if sys.platform == "win32" or not hasattr(socket, "AF_UNIX"):
            raise BackendUnavailableError(f"no Unix sockets on {sys.platform}")
        directory = tempfile.mkdtemp(prefix="wove-")
        path = os.path.join(directory, "callback.sock")
        site = web.UnixSite(self._runner, path, ssl_context=self.ssl_context, backlog=self.backlog)
        try:
            await site.start()
        except OSError as exc:  # a temporary directory so deep that the path passes the socket name limit
            os.rmdir(directory)
            raise BackendUnavailableError(f"callback server cannot listen on {path}: {exc}") from exc
        self._unix_paths.append(path)
        return path

    async def __aenter__(self) -> BackendCallbackServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def deliver_to(self, sink: Callable[[Frame], None] | None) -> None:
        """Hand each accepted frame to ``sink`` (called in the server's loop, before the worker gets its answer)
        instead of queueing it for :meth:`recv`; ``None`` restores the queue. ``recv`` still ends at :meth:`stop`.

        For an owner that handles frames at once anyway: it saves a queue hop and a task switch per frame.
        """
        self._sink = sink

    async def recv(self) -> Frame:
        """Return the next event frame, in arrival order, waiting until one exists."""
        if self._queue is None:
            raise BackendUnavailableError("callback server is not running: call start() before recv()")
        frame = await self._queue.get()
        if frame is None:
            self._queue.put_nowait(None)  # wake any other waiter too
            raise BackendUnavailableError("callback server was stopped; no more frames")
        return frame

    # -- runs ---------------------------------------------------------------------------------------------------------

    @property
    def pending_runs(self) -> frozenset[str]:
        """Run ids opened with :meth:`open_run` that have not resolved or closed."""
        return frozenset(self._pending)

    def open_run(self, run_id: str) -> str:
        """Register a pending run and return its run-scoped callback URL (the one to put in its payload)."""
        if not isinstance(run_id, str) or not run_id:
            raise ValueError("run_id must be a non-empty string")
        url = self.run_url(run_id)
        self._pending[run_id] = url.rsplit("/", 1)[1]
        self._resolved.pop(run_id, None)
        return url

    def run_url(self, run_id: str) -> str:
        """The run-scoped callback URL of ``run_id`` (valid only while the run is pending)."""
        if self._base is None:
            raise BackendUnavailableError("callback server has no URL yet: call start() first or pass public_url")
        segment = run_id if run_id.isascii() and run_id.isalnum() else quote(run_id, safe="")  # wove's ids: hex
        return f"{self._base}/wove/runs/{segment}/{run_credential(self._secret, run_id)}"

    def close_run(self, run_id: str) -> None:
        """Mark a run no longer pending: its URL stops working and its blobs are dropped."""
        self._forget_state(run_id)
        self._remember(run_id)

    def put_blob(self, run_id: str, data: bytes) -> str:
        """Keep ``data`` for a pending run's worker to fetch; return its reference.

        The blob is dropped when the run's ``task_started`` arrives (the worker has fetched its body by then) or when
        the run closes.
        """
        if run_id not in self._pending:
            raise DispatchError(f"run {run_id!r} is not pending: call open_run() first", run_id=run_id)
        ref = str(next(self._refs))
        self._blobs.setdefault(run_id, {})[ref] = data if isinstance(data, bytes) else bytes(data)
        return ref

    def _remember(self, run_id: str) -> None:
        self._resolved[run_id] = None
        self._resolved.move_to_end(run_id)
        if len(self._resolved) > self._memory:
            self._resolved.popitem(last=False)

    # -- HTTP ---------------------------------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            route = _route(request.raw_path)
            if route is None:
                raise _Refusal(404, "not_found")
            kind, run_id, secret, ref = route
            if kind == "blob":
                if request.method != "GET":
                    raise _Refusal(405, "method_not_allowed")
                return await self._send_blob(request, run_id, secret, ref)
            if request.method != "POST":
                raise _Refusal(405, "method_not_allowed")
            if kind == "upload":
                return await self._accept_part(request, run_id, secret)
            if kind == "batch":
                return await self._accept_batch(request)
            return await self._accept(request, run_id if kind == "run" else None, secret)
        except _Refusal as refusal:
            log = logger.warning if refusal.status == 401 else logger.debug
            log("refused %s %s: %s", request.method, "callback" if refusal.status != 404 else "path", refusal.reason)
            return refusal.response()

    def _authorise(self, run: str | None, secret: str) -> None:
        if run is None:
            if not same_secret(self.token, secret):
                raise _Refusal(401, "bad_credential")
        else:
            expected = self._pending.get(run)
            if expected is not None and same_secret(expected, secret):
                return
            if not verify_run_credential(self._secret, run, secret):
                raise _Refusal(401, "bad_credential")
            raise _Refusal(403, "run_not_pending", f"run {run!r} is not pending (resolved, closed or never opened)")

    async def _accept(self, request: web.BaseRequest, run: str | None, secret: str) -> web.Response:
        self._authorise(run, secret)
        content_type = request.content_type
        uploaded = request.headers.get(UPLOAD_HEADER)
        if uploaded is not None and run is not None:
            upload = self._uploads.pop(run, None)
            if upload is None or str(upload.total) != uploaded or not upload.complete():
                raise _Refusal(400, "upload_incomplete", "not every part of the uploaded frame arrived")
            body, content_type = upload.assemble(), codec.FRAME_CONTENT_TYPE
        else:
            with self._reading(request.content):
                body = await read_stream(request.content, request.content_length, self.max_body_size)
        accepted = await self._take(run, content_type, body)
        return web.Response(body=_ACCEPTED if accepted else _DUPLICATE, headers=_JSON)

    async def _accept_batch(self, request: web.BaseRequest) -> web.Response:
        """Frames of several runs in one body (:mod:`wove.backend.batch`), each taken as if posted on its own."""
        if request.content_type != BATCH_CONTENT_TYPE:
            raise _Refusal(415, "bad_content_type", f"a batch is sent as {BATCH_CONTENT_TYPE}")
        with self._reading(request.content):
            body = await read_stream(request.content, request.content_length, self.max_body_size)
        try:
            entries = split_batch(body)
        except codec.FrameError as exc:
            raise _Refusal(400, exc.reason, str(exc)) from None
        answers: list[dict[str, Any]] = []
        for path, content_type, frame_body in entries:
            try:
                route = _route(path)
                if route is None or route[0] != "run":
                    raise _Refusal(400, "bad_batch", "a batch entry is posted to a run URL")
                _, run, secret, _ = route
                self._authorise(run, secret)
                accepted = await self._take(run, content_type, frame_body)
                answers.append(_ACCEPTED_ENTRY if accepted else _DUPLICATE_ENTRY)
            except _Refusal as refusal:
                if refusal.status == 401:
                    logger.warning("refused a batch entry: %s", refusal.reason)
                answers.append({"code": refusal.status, "error": refusal.reason})
        return web.json_response(answers)

    async def _take(self, run: str | None, content_type: str, body: bytes | bytearray) -> bool:
        """Decode, check and hand on one authorised frame; ``False`` when it is a duplicate to acknowledge only."""
        big = len(body) > OFFLOAD_BYTES
        try:
            if big:
                header, parts = await asyncio.to_thread(codec.split_frame, content_type, body)
            else:
                header, parts = codec.split_frame(content_type, body)
            run_id = codec.validate_event_header(header)
        except codec.FrameError as exc:
            raise _Refusal(400, exc.reason, str(exc)) from None
        if run is not None and run_id != run:
            raise _Refusal(403, "run_mismatch", "frame run_id differs from the run of its URL")
        if not self._check_open(run, run_id):
            return False
        self._check_execution(header, run_id)
        try:
            frame = await asyncio.to_thread(codec.load_frame, header, parts) if big else codec.load_frame(header, parts)
        except codec.FrameError as exc:
            raise _Refusal(400, exc.reason, str(exc)) from None
        if not self._check_open(run, run_id):  # state may have changed while unpickling in a thread
            return False
        kind = frame["type"]
        if kind in TERMINAL_EVENTS:
            self._forget_state(run_id)
            self._remember(run_id)
        elif kind == "task_started":
            self._blobs.pop(run_id, None)
            execution = frame.get("execution")
            if isinstance(execution, str) and run_id in self._pending:
                self._executions.setdefault(run_id, execution)
        if self._sink is not None:
            try:
                self._sink(frame)
            except Exception:  # the frame was accepted: the worker must not retry it, whatever its owner did
                logger.exception("frame sink failed on a %s frame of run %s", kind, run_id)
        else:
            assert self._queue is not None
            self._queue.put_nowait(frame)
        return True

    async def _accept_part(self, request: web.BaseRequest, run: str, secret: str) -> web.Response:
        """Store one part of a frame too large for one request; the frame's own request names the total."""
        self._authorise(run, secret)
        try:
            offset, total = int(request.query["offset"]), int(request.query["total"])
        except (KeyError, ValueError):
            raise _Refusal(400, "bad_upload", "offset and total query parameters are required") from None
        length = request.content_length
        if length is None:
            raise _Refusal(400, "bad_upload", "an upload part needs a Content-Length")
        if length > self.max_body_size:
            raise _Refusal(413, "body_too_large", limit=self.max_body_size)
        if total > self.max_frame_size:
            raise _Refusal(413, "frame_too_large", f"frames may hold {self.max_frame_size} bytes")
        if offset < 0 or offset + length > total:
            raise _Refusal(400, "bad_upload", "part lies outside the frame")
        upload = self._uploads.get(run)
        if upload is None or upload.total != total:
            upload = self._uploads[run] = _Upload(total)
        upload.place(offset, length)
        with self._reading(request.content):
            part = await read_stream(request.content, length, self.max_body_size)
        upload.add(part)
        return web.Response(body=_ACCEPTED, headers=_JSON)

    @contextlib.contextmanager
    def _reading(self, stream: StreamReader) -> Iterator[None]:
        """Around a body read: refusals for its failures, and 408 once the body stalls for ``idle_timeout``."""
        guard = None if stream.is_eof() else _StallGuard(stream, self.idle_timeout)  # is_eof: all of it is here
        try:
            yield
        except ValueError as exc:
            if str(exc) == "body_too_large":
                raise _Refusal(413, "body_too_large", limit=self.max_body_size) from None
            raise _Refusal(400, str(exc)) from None
        except asyncio.TimeoutError:
            raise _Refusal(408, "body_timeout", f"no byte of the body arrived for {self.idle_timeout}s") from None
        except ConnectionError:  # the client went away mid-body: nobody reads this answer, but no 500 either
            raise _Refusal(400, "incomplete_body") from None
        finally:
            if guard is not None:
                guard.cancel()

    def _check_execution(self, header: Mapping[str, Any], run_id: str) -> None:
        """409 for a frame of a second execution of a started run (an at-least-once backend delivered it twice).

        Workers stamp every frame with a random ``execution`` id; the first ``task_started`` fixes the run's. A
        duplicate delivery's ``task_started`` is refused, so its worker never runs the task body, and so are any
        other frames it sends.
        """
        started = self._executions.get(run_id)
        execution = header.get("execution")
        if started is not None and isinstance(execution, str) and execution != started:
            raise _Refusal(409, "run_already_started", f"run {run_id!r} already runs in another execution")

    def _forget_state(self, run_id: str) -> None:
        self._pending.pop(run_id, None)
        self._blobs.pop(run_id, None)
        self._uploads.pop(run_id, None)
        self._executions.pop(run_id, None)

    def _check_open(self, run: str | None, run_id: str) -> bool:
        """``False`` for a master-URL frame of a resolved run (acknowledge, drop); 403 for a closed run URL."""
        if run is not None:
            if run not in self._pending:
                raise _Refusal(403, "run_not_pending", f"run {run!r} is not pending (resolved, closed or never opened)")
            return True
        return run_id not in self._resolved

    async def _send_blob(self, request: web.BaseRequest, run: str, secret: str, ref: str) -> web.StreamResponse:
        self._authorise(run, secret)
        blob = self._blobs.get(run, {}).get(ref)
        if blob is None:
            raise _Refusal(404, "blob_not_found", f"no blob {ref!r} for run {run!r} (already fetched and started?)")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(blob)
        await response.prepare(request)
        with memoryview(blob) as view:
            for start in range(0, len(view), BLOB_CHUNK):
                await response.write(view[start : start + BLOB_CHUNK])
        await response.write_eof()
        return response
