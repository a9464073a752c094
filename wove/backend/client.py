"""Posting frames to the callback server from synchronous code, and fetching payload blobs.

A keep-alive HTTP/1.1 connection per callback origin, pooled per thread, on a plain socket speaking
:mod:`wove.backend.wire` (answers parsed by ``httptools``): a worker process pays for neither aiohttp's import
nor ``http.client``'s (which pulls in the ``email`` package and parses every answer's headers with it), nor for a
new TCP connection per frame, and a long-lived worker reuses its connection across runs. Retries, deadlines and
uploads follow :mod:`wove.backend.delivery`.
"""

from __future__ import annotations

import array
import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from wove.backend.batch import MAX_ENTRIES, batch_path, encode_batch
from wove.backend.codec import EncodedFrame, encode_frame
from wove.backend.delivery import (
    Attempts,
    Exchange,
    Target,
    client_ssl_context,
    deadline_seconds,
    describe,
    logger,
    parse_retry_after,
    parse_target,
    refusal_reason,
    refuse_untrusted,
    upload_part,
    upload_plan,
)
from wove.backend.wire import COALESCE, READ_SIZE, Answer, host_header, request_parts
from wove.errors import CallbackError

__all__ = ["CallbackConnection", "HeldFrame", "post_event"]


class _Wire:
    """One keep-alive HTTP/1.1 connection: a socket (TLS for https) and the bytes read past the last answer."""

    __slots__ = ("host", "kernel_timeout", "open", "owed", "sock", "timeout")

    def __init__(self, target: Target, timeout: float, unix_socket: str | None = None) -> None:
        sock = _connect(target, timeout, unix_socket)
        self.kernel_timeout = target.scheme == "http" and _KERNEL_TIMEOUTS
        try:
            if sock.family != _AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if target.scheme == "https":
                sock = client_ssl_context().wrap_socket(sock, server_hostname=target.host)
            elif self.kernel_timeout:
                # A blocking socket whose timeouts the kernel enforces: each send or recv is one system call,
                # where a Python-level timeout polls before every call.
                sock.settimeout(None)
                _set_kernel_timeout(sock, timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.timeout = timeout
        self.open = True
        #: A frame sent without reading its answer yet (see CallbackConnection.post_unanswered).
        self.owed: _Owed | None = None
        self.host = host_header(target.scheme, target.host, target.port)

    def close(self) -> None:
        self.open = False
        self.sock.close()

    def set_timeout(self, timeout: float) -> None:
        if timeout != self.timeout:
            if self.kernel_timeout:
                _set_kernel_timeout(self.sock, timeout)
            else:
                self.sock.settimeout(timeout)
            self.timeout = timeout

    def send(self, method: str, path: str, headers: Mapping[str, str], body: EncodedFrame | None) -> None:
        try:
            for data in request_parts(method, path, self.host, headers, body):
                self.sock.sendall(data)
        except BlockingIOError:  # the kernel's send timeout
            raise TimeoutError("timed out sending to the callback server") from None

    def answer(self) -> tuple[int, dict[str, str], bytearray]:
        """Read one final answer: ``(status, headers with lower-case names, body)``.

        One answer per request and no request goes out before the last answer was read, so a read never holds
        bytes of the next answer.
        """
        while True:
            answer = Answer()
            try:
                while not answer.take(self._recv()):
                    pass
            except OSError:
                self.open = False
                raise
            if not answer.keep_alive:
                self.open = False
            if answer.status >= 200:
                return answer.status, answer.headers, answer.body

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(READ_SIZE)
        except BlockingIOError:  # the kernel's receive timeout
            raise TimeoutError("timed out waiting for the callback server") from None


#: Whether SO_RCVTIMEO/SO_SNDTIMEO can carry the timeouts (everywhere but Windows, for plain TCP).
_KERNEL_TIMEOUTS = hasattr(socket, "SO_RCVTIMEO") and sys.platform != "win32"
_AF_UNIX: int | None = getattr(socket, "AF_UNIX", None)


def _connect(target: Target, timeout: float, unix_socket: str | None) -> socket.socket:
    """A socket connected to ``unix_socket`` when one is given and takes the connection, else to the target.

    Falling back keeps a worker working where the socket is not visible (another machine, another mount namespace).
    """
    if unix_socket is not None and _AF_UNIX is not None:
        sock = socket.socket(_AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(unix_socket)
            return sock
        except OSError as exc:
            sock.close()
            logger().debug("callback socket %s not reachable (%s); connecting over TCP", unix_socket, exc)
    # An ASCII host goes to getaddrinfo as bytes: as text it would load the IDNA codec (a cold worker's 2 ms).
    address: str | bytes = target.host.encode("ascii") if target.host.isascii() else target.host
    return socket.create_connection((address, target.port), timeout)  # type: ignore[arg-type]


def _set_kernel_timeout(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    value = array.array("l", (whole, int((seconds - whole) * 1e6))).tobytes()  # a struct timeval
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class HeldFrame(NamedTuple):
    """A frame encoded and held for :meth:`CallbackConnection.post_many`: its run's callback URL and the frame."""

    url: str
    frame: Mapping[str, Any]
    encoded: EncodedFrame


class _Owed:
    """A frame whose answer has not been read yet: what is needed to read it, or to send the frame again."""

    __slots__ = ("encoded", "frame", "url")

    def __init__(self, url: str, frame: Mapping[str, Any], encoded: EncodedFrame) -> None:
        self.url = url
        self.frame = {key: frame.get(key) for key in ("type", "run_id", "task_id")}
        self.encoded = encoded


class _Pool(dict[tuple[str, str, int, str | None], _Wire]):
    """Idle connections of one thread, closed when the thread ends."""

    def __del__(self) -> None:
        for wire in self.values():
            wire.close()


_idle = threading.local()


def _pool() -> _Pool:
    pool: _Pool | None = getattr(_idle, "pool", None)
    if pool is None:
        pool = _idle.pool = _Pool()
    return pool


class CallbackConnection:
    """A keep-alive connection to one callback URL; idle connections are pooled per thread and reused across runs.

    ``unix_socket`` names the server's Unix socket on this host (a payload's ``callback_socket``): the same HTTP goes
    over it, or over TCP to the URL's host when the socket does not take the connection.
    """

    def __init__(self, callback_url: str, *, deadline: float | None = None, unix_socket: str | None = None) -> None:
        self.url = callback_url
        self._target = parse_target(callback_url)
        self.unix_socket = unix_socket
        self._key = (*self._target[:3], unix_socket)
        self._deadline = deadline_seconds(deadline)
        self._wire = _pool().pop(self._key, None)

    @property
    def route(self) -> tuple[str, str, int, str | None]:
        """Where this connection goes (scheme, host, port, Unix socket): frames with the same route share one."""
        return self._key

    def __enter__(self) -> CallbackConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Return the connection to this thread's pool (after reading any answer still owed)."""
        if self._wire is not None and self._wire.owed is not None:
            try:
                self.settle()
            except CallbackError as exc:
                logger().warning("%s", exc)
        if self._wire is not None:
            old = _pool().pop(self._key, None)
            if old is not None:
                old.close()
            if self._wire.open:
                _pool()[self._key] = self._wire
            else:
                self._wire.close()
            self._wire = None

    def post(
        self, frame: Mapping[str, Any], *, deadline: float | None = None, encoded: EncodedFrame | None = None
    ) -> None:
        """Deliver one event frame, retrying until the deadline; frames above the server's limit go in parts.

        ``encoded``: the frame already encoded (:func:`~wove.backend.codec.encode_frame`), when the caller has it.
        """
        self.settle()
        exchange = Exchange(self.url, describe(frame), frame)
        encoded, path = encoded or encode_frame(frame), self._target.path
        part = upload_part(encoded, path, None, exchange)
        for _ in range(3):  # whole, in parts, in the smaller parts the server asked for
            try:
                if part is None:
                    self._request("POST", path, encoded, exchange, deadline)
                else:
                    for target, body, headers in upload_plan(path, encoded, part):
                        self._request("POST", target, body, exchange, deadline, headers)
                return
            except CallbackError as exc:
                smaller = upload_part(encoded, path, exc, exchange)
                if smaller is None or (part is not None and smaller >= part):
                    raise
                part = smaller

    def post_unanswered(self, frame: Mapping[str, Any]) -> None:
        """Send a small frame without waiting for its answer (HTTP pipelining).

        The answer is read by :meth:`settle`, which every later request on this connection (and :meth:`close`)
        calls first, so frames still reach the server in order and a refusal still raises, only later. A frame that
        cannot go out at once (no connection yet, or too large for one write) is posted the ordinary way instead.
        """
        self.settle()
        encoded = encode_frame(frame)
        if self._wire is None or encoded.size > COALESCE:
            self.post(frame)
            return
        try:
            self._wire.set_timeout(Attempts(self._deadline).timeout())
            self._wire.send("POST", self._target.path, {}, encoded)
        except OSError:
            self._drop()
            self.post(frame)
            return
        self._wire.owed = _Owed(self.url, frame, encoded)

    def settle(self) -> None:
        """Read the answer owed for a frame sent by :meth:`post_unanswered`; retry or raise as :meth:`post` would."""
        wire = self._wire
        if wire is None or wire.owed is None:
            return
        owed, wire.owed = wire.owed, None
        exchange = Exchange(owed.url, describe(owed.frame), owed.frame)
        self._request("POST", parse_target(owed.url).path, owed.encoded, exchange, None, sent=True)

    def post_many(self, held: Sequence[HeldFrame]) -> list[CallbackError | None]:
        """Deliver frames of several runs of this server in one request (:mod:`wove.backend.batch`).

        Each frame travels with its own run URL's path and credential and is checked by the server on its own, as
        :meth:`post` would have it checked, at most ``MAX_ENTRIES`` to a request. The request is retried like a post
        (the server drops what it already has). A server that takes no batch (400, 404, 405, 413, 415) gets the
        frames one by one instead. Returns, per frame, ``None`` or the :class:`CallbackError` that frame met.
        """
        if len(held) > MAX_ENTRIES:
            return [
                error
                for start in range(0, len(held), MAX_ENTRIES)
                for error in self.post_many(held[start : start + MAX_ENTRIES])
            ]
        self.settle()
        paths = [parse_target(item.url).path for item in held]
        if len(held) == 1:
            return [self._post_alone(held[0], paths[0])]
        exchange = Exchange(self.url, f"a batch of {len(held)} frames", None)
        body = encode_batch([(path, item.encoded) for path, item in zip(paths, held, strict=True)])
        try:
            results = _batch_results(self._request("POST", batch_path(self._target.path), body, exchange, None), held)
        except CallbackError as exc:
            if exc.status not in _NO_BATCH:
                return [exc] * len(held)
            results = None
        if results is None:  # no batch here: one by one
            return [self._post_alone(item, path) for item, path in zip(held, paths, strict=True)]
        return [
            self._post_alone(item, path) if error is _AGAIN else error
            for item, path, error in zip(held, paths, results, strict=True)
        ]

    def _post_alone(self, item: HeldFrame, path: str) -> CallbackError | None:
        try:
            self._request("POST", path, item.encoded, Exchange(item.url, describe(item.frame), item.frame), None)
        except CallbackError as exc:
            return exc
        return None

    def fetch_blob(self, ref: str) -> bytearray:
        """Download a payload blob stored on the callback server for this run."""
        self.settle()
        segment = ref
        if not (ref.isascii() and ref.isalnum()):  # the server's references (numbers) need no quoting
            from urllib.parse import quote  # imported only here (see delivery._parse_target)

            segment = quote(ref, safe="")
        path = f"{self._target.path.rstrip('/')}/blobs/{segment}"
        exchange = Exchange(self.url, f"payload blob {ref!r}", None)
        blob = self._request("GET", path, None, exchange, None)
        assert blob is not None
        return blob

    def _connection(self, timeout: float) -> _Wire:
        if self._wire is None:
            self._wire = _Wire(self._target, timeout, self.unix_socket)
        else:
            self._wire.set_timeout(timeout)
        return self._wire

    def _drop(self) -> None:
        if self._wire is not None:
            self._wire.close()
            self._wire = None

    def _request(
        self,
        method: str,
        path: str,
        encoded: EncodedFrame | None,
        exchange: Exchange,
        deadline: float | None,
        extra: Mapping[str, str] | None = None,
        *,
        sent: bool = False,
    ) -> bytearray | None:
        attempts = Attempts(self._deadline if deadline is None else deadline)
        fresh_retry = self._wire is not None  # a reused idle connection may have been closed by the server
        headers = extra or {}
        while True:
            retry_after = None
            try:
                wire = self._connection(attempts.timeout())
                if not sent:
                    # The server may answer early (e.g. 413) and close while the body is still going: read that.
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        wire.send(method, path, headers, encoded)
                sent = False
                status, answer_headers, data = wire.answer()
                if not wire.open:
                    self._drop()
                if 200 <= status < 300:
                    return data
                if status != 429 and status < 500:
                    exchange.refused(status, bytes(data))
                    return None
                retry_after = parse_retry_after(answer_headers.get("retry-after"))
                attempts.last, attempts.status = f"HTTP {status} ({refusal_reason(bytes(data)) or 'no reason'})", status
            except OSError as exc:
                sent = False
                self._drop()
                refuse_untrusted(exchange, exc)
                attempts.last = f"{type(exc).__name__}: {exc}"
                if fresh_retry:
                    fresh_retry = False
                    continue
            fresh_retry = False
            wait = attempts.delay(retry_after)
            if wait is None:
                raise exchange.gave_up(attempts)
            logger().debug("retrying %s in %.3fs after %s", exchange.what, wait, attempts.last)
            time.sleep(wait)


#: Answers of a server that takes no batch: an older one, one whose body limit is below the batch, or a malformed one.
_NO_BATCH = frozenset({400, 404, 405, 413, 415})


#: An entry the server could not take for now (429, 5xx): posted again on its own, with retries.
_AGAIN = CallbackError("posted again on its own")


def _batch_results(answer: bytearray | None, held: Sequence[HeldFrame]) -> list[CallbackError | None] | None:
    """Per entry: ``None`` (taken), the error it met, or ``_AGAIN``; ``None`` when the answer is not a batch's."""
    try:
        results = json.loads(answer or b"")
    except ValueError:
        return None
    if not isinstance(results, list) or len(results) != len(held) or not all(isinstance(r, dict) for r in results):
        return None
    return [_entry_error(item, result) for item, result in zip(held, results, strict=True)]


def _entry_error(item: HeldFrame, result: dict[str, Any]) -> CallbackError | None:
    """``None`` for an accepted (or duplicate) entry, else the error a post of it alone would have raised."""
    code = result.get("code")
    if result.get("status") in ("accepted", "duplicate") or type(code) is not int:
        return None
    if code == 429 or code >= 500:
        return _AGAIN
    try:
        Exchange(item.url, describe(item.frame), item.frame).refused(code, json.dumps(result).encode())
    except CallbackError as exc:
        return exc
    return None


def post_event(callback_url: str, frame: Mapping[str, Any], *, timeout: float | None = None) -> None:
    """Post one event frame to a callback URL.

    ``timeout`` bounds the whole delivery, retries included (default ``WOVE_POST_DEADLINE``, 120 s). Raises
    :class:`CallbackError` when the server refuses the frame or stays unreachable until then.
    """
    with CallbackConnection(callback_url, deadline=timeout) as conn:
        conn.post(frame)
