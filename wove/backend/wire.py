"""HTTP/1.1 for the callback clients, without I/O: request heads out, answers in (parsed by ``httptools``).

The sync client (:mod:`wove.backend.client`, blocking sockets) and the async one (:mod:`wove.backend.aclient`,
asyncio streams) share this module, so both speak exactly the same protocol: a request goes out as its head and,
when small, its body in one write; an answer is fed to llhttp as it arrives, its body filling one buffer of the
announced size. Answers may use ``Content-Length``, ``chunked`` or end at close, so a proxy in between is fine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wove.backend.codec import EncodedFrame
from wove.errors import BackendUnavailableError

try:
    import httptools
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without the extra
    raise BackendUnavailableError(
        "posting to the callback server needs httptools: pip install 'wove[dispatch]'"
    ) from exc

__all__ = ["COALESCE", "READ_SIZE", "Answer", "BadAnswer", "host_header", "request_parts"]

#: Bodies up to this size go out in the same write as the request head.
COALESCE = 16 * 1024
#: Bytes asked of the connection per read.
READ_SIZE = 64 * 1024


class BadAnswer(OSError):
    """The server's answer is not HTTP/1.x as this client understands it (retried like a connection error)."""


def host_header(scheme: str, host: str, port: int) -> str:
    """The ``Host`` header for a target: brackets for IPv6, the port unless it is the scheme's default."""
    default = 443 if scheme == "https" else 80
    name = f"[{host}]" if ":" in host else host
    return name if port == default else f"{name}:{port}"


def request_parts(
    method: str, path: str, host: str, headers: Mapping[str, str], body: EncodedFrame | None
) -> list[Any]:
    """What to write for one request, in order: the head (with a small body joined to it), then any large parts."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    for name, value in headers.items():
        head += f"{name}: {value}\r\n"
    if body is None:
        return [(head + "\r\n").encode("latin-1")]
    head += f"Content-Type: {body.content_type}\r\nContent-Length: {body.size}\r\n\r\n"
    data = head.encode("latin-1")
    if body.size <= COALESCE:
        return [data + b"".join(body.parts)]
    return [data, *body.parts]


class Answer:
    """One answer, collected from ``httptools`` callbacks as bytes are fed in: status, headers, body.

    Feed every chunk read from the connection to :meth:`feed` until :attr:`complete`; at end of input, call
    :meth:`end`, which says whether the answer was complete by then (one whose length is its connection's end).
    """

    __slots__ = ("_parser", "body", "complete", "filled", "headers", "keep_alive", "status", "until_close")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.filled = 0
        self.complete = False
        self.keep_alive = True
        self.until_close = False
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)

    def take(self, data: bytes) -> bool:
        """Feed one read's bytes (``b""`` once the connection closed); ``True`` once the answer is whole.

        :class:`ConnectionResetError` when the connection closed before the answer was, :class:`BadAnswer` when the
        bytes are not HTTP/1.x. A caller reads and calls this until it says ``True``, then checks
        :attr:`keep_alive` (reuse the connection?) and :attr:`status` (below 200: an interim answer, read the next).
        """
        if not data:
            if self.end():
                return True
            raise ConnectionResetError("the callback server closed the connection before answering")
        self.feed(data)
        return self.complete

    def feed(self, data: bytes) -> None:
        """Parse the next bytes of the answer; :class:`BadAnswer` when they are not HTTP/1.x."""
        assert self._parser is not None, "the answer is finished"
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.keep_alive = False
            self._release()
            raise BadAnswer(f"not an HTTP/1.x answer the client understands: {exc}") from None
        if self.complete:
            self._release()

    def end(self) -> bool:
        """The connection closed: whether that completes the answer (it had no length and its head arrived)."""
        self.keep_alive = False
        done = self.complete or (self.until_close and self.status > 0)
        self._release()
        return done

    def _release(self) -> None:
        self._parser = None  # parser -> answer -> parser: break the cycle so a large body is freed at once

    # -- httptools callbacks ---------------------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        length = self.headers.get("content-length", "")
        if length.isdigit():
            self.body = bytearray(int(length))  # filled in place: one copy of a large blob, not a growing one
        elif "chunked" not in self.headers.get("transfer-encoding", "").lower():
            self.until_close = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, data: bytes) -> None:
        if self.filled + len(data) <= len(self.body):  # the buffer sized from Content-Length
            self.body[self.filled : self.filled + len(data)] = data
        else:
            self.body += data
        self.filled += len(data)

    def on_message_complete(self) -> None:
        self.complete = True
        if self.filled < len(self.body):
            del self.body[self.filled :]
