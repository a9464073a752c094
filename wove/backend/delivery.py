"""Delivery policy shared by the sync and async clients: deadlines, backoff, what an answer means, uploads.

Connection errors, 429 and 5xx answers are retried with exponential backoff and full jitter until the deadline
(``WOVE_POST_DEADLINE`` seconds, default 120); other 4xx answers are final and raise :class:`CallbackError`. A
``run_not_pending`` refusal of a terminal frame means an earlier copy already arrived (a retry after a lost answer),
so it counts as delivered. A frame larger than the server takes in one request goes to its run URL in parts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from wove._types import TERMINAL_EVENTS
from wove.backend.codec import EncodedFrame
from wove.backend.streams import byte_ranges
from wove.errors import CallbackError, ConfigError, PayloadError

if TYPE_CHECKING:
    import logging
    import ssl

#: Environment variable: seconds a frame may take to deliver, retries included.
DEADLINE_ENV = "WOVE_POST_DEADLINE"
DEFAULT_DEADLINE = 120.0
#: Environment variable: socket timeout of one attempt (connect, or any single read or write).
ATTEMPT_TIMEOUT_ENV = "WOVE_POST_TIMEOUT"
DEFAULT_ATTEMPT_TIMEOUT = 30.0
#: Environment variable: CA bundle that verifies an HTTPS callback server (else the system store is used).
CAFILE_ENV = "WOVE_CALLBACK_CAFILE"
#: First backoff ceiling and largest backoff between attempts, in seconds.
BACKOFF_BASE = 0.05
BACKOFF_CAP = 5.0
#: Bodies above this many bytes are streamed in slices of this size.
STREAM_CHUNK = 1 << 20
#: Frames larger than this go to a run URL in parts of this size, each a request under the server's body limit.
UPLOAD_PART = 32 << 20
#: Header of the request that completes an upload; its value is the frame's size.
UPLOAD_HEADER = "X-Wove-Upload"


def logger() -> logging.Logger:
    import logging  # imported on first use: it costs a cold worker several milliseconds

    return logging.getLogger("wove.backend.client")


def env_seconds(name: str, default: float) -> float:
    """Read a positive number of seconds from the environment."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{name} must be a positive number of seconds, not {raw!r}")
    return value


def deadline_seconds(timeout: float | None) -> float:
    """The delivery deadline: ``timeout`` when given, else ``WOVE_POST_DEADLINE``."""
    return env_seconds(DEADLINE_ENV, DEFAULT_DEADLINE) if timeout is None else timeout


def redact(url: str) -> str:
    """Drop the path (it holds the credential) so a URL can appear in messages and logs."""
    from urllib.parse import urlsplit  # only messages need it (see _parse_target)

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..."


def client_ssl_context() -> ssl.SSLContext:
    """A verifying TLS context; ``WOVE_CALLBACK_CAFILE`` names a CA bundle for a private callback certificate."""
    import ssl

    return ssl.create_default_context(cafile=os.environ.get(CAFILE_ENV) or None)


class Target(NamedTuple):
    """Where a callback URL points: scheme, host, port, and path with query."""

    scheme: str
    host: str
    port: int
    path: str


def parse_target(url: str) -> Target:
    """Split a callback URL; :class:`PayloadError` unless it is http(s) with a host.

    Every run has its own URL under one origin, so the origin (``scheme://host:port``) is parsed once and cached,
    and a run URL is only cut at its path.
    """
    scheme, found, rest = url.partition("://")
    cut = rest.find("/")
    if found and cut > 0 and "#" not in rest and url.isascii() and url.isprintable() and " " not in url:
        origin = url[: len(scheme) + 3 + cut]
        parsed = _origins.get(origin)
        if parsed is None:
            parsed = _parse_target(origin + "/")
            if len(_origins) >= 64:
                _origins.clear()
            _origins[origin] = parsed
        return parsed._replace(path=rest[cut:])
    return _parse_target(url)


_origins: dict[str, Target] = {}


def _parse_target(url: str) -> Target:
    """Split a URL: llhttp's URL parser (httptools, which every client loads for its answers) takes ASCII URLs, and
    what it refuses (a non-ASCII host, an empty port) goes to ``urllib.parse``, whose import (``ipaddress`` with it)
    would cost a cold worker ~2 ms."""
    split = _split_ascii(url) if url.isascii() else None
    if split is None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        split = (parts.scheme, parts.hostname or "", parts.port, parts.path, parts.query)
    scheme, host, port, path, query = split
    if scheme not in ("http", "https") or not host:
        raise PayloadError(f"callback URL must be http:// or https://, not {redact(url)}")
    return Target(
        scheme, host, port or (443 if scheme == "https" else 80), (path or "/") + (f"?{query}" if query else "")
    )


def _split_ascii(url: str) -> tuple[str, str, int | None, str, str] | None:
    """``(scheme, host, port, path, query)`` as ``urlsplit`` gives them (names in lower case), or ``None``."""
    import httptools  # a dependency of the clients, not of the server, which imports this module too

    try:
        parts = httptools.parse_url(url.encode("ascii"))
    except httptools.HttpParserInvalidURLError:
        return None
    text = [(value or b"").decode("ascii") for value in (parts.schema, parts.host, parts.path, parts.query)]
    return text[0].lower(), text[1].lower(), parts.port, text[2], text[3]


class Attempts:
    """Counts attempts and spaces them with full-jitter exponential backoff until a deadline."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.count = 0
        self.last = "no attempt"
        self.status: int | None = None
        self.attempt_timeout = env_seconds(ATTEMPT_TIMEOUT_ENV, DEFAULT_ATTEMPT_TIMEOUT)

    def timeout(self) -> float:
        return min(self.attempt_timeout, max(self.end - time.monotonic(), 0.5))

    def delay(self, retry_after: float | None) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` once the deadline has passed."""
        import random

        remaining = self.end - time.monotonic()
        if remaining <= 0:
            return None
        wait = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**self.count))
        self.count += 1
        return min(max(wait, retry_after or 0.0), remaining)


def refusal(body: bytes) -> dict[str, Any]:
    """The JSON object of a refusal (``{"error", "detail", ...}``), or ``{}``."""
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def refusal_reason(body: bytes) -> str:
    return str(refusal(body).get("error", ""))


def parse_retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), BACKOFF_CAP * 4) if value else None
    except ValueError:
        return None


class Exchange:
    """What a request is for; decides what its answer means."""

    def __init__(self, url: str, what: str, frame: Mapping[str, Any] | None) -> None:
        self.url = url
        self.what = what
        self.run_id = frame.get("run_id") if frame else None
        self.terminal = frame is not None and frame.get("type") in TERMINAL_EVENTS
        #: The server's body limit, when it refused a body as too large.
        self.limit: int | None = None

    def refused(self, status: int, body: bytes) -> None:
        """Handle a final 4xx answer: return when it means "already delivered", raise otherwise."""
        answer = refusal(body)
        reason = str(answer.get("error", ""))
        limit = answer.get("limit")
        self.limit = limit if type(limit) is int and limit > 0 else None
        if self.terminal and reason == "run_not_pending":
            logger().info("%s was already delivered (run no longer pending); not sending it again", self.what)
            return
        raise CallbackError(
            f"callback server {redact(self.url)} refused {self.what}: HTTP {status} ({reason or 'no reason given'})",
            status=status,
            reason=reason,
            run_id=self.run_id if isinstance(self.run_id, str) else None,
        )

    def gave_up(self, attempts: Attempts) -> CallbackError:
        return CallbackError(
            f"could not deliver {self.what} to {redact(self.url)} before the deadline "
            f"({attempts.count + 1} attempts; last: {attempts.last})",
            status=attempts.status,
            reason="unreachable" if attempts.status is None else "server_error",
            run_id=self.run_id if isinstance(self.run_id, str) else None,
        )


def refuse_untrusted(exchange: Exchange, exc: BaseException) -> None:
    """A certificate that does not verify will not verify on retry either: fail at once."""
    ssl = sys.modules.get("ssl")
    cause = getattr(exc, "certificate_error", None) or exc.__cause__ or exc  # aiohttp wraps the ssl error
    if ssl is not None and isinstance(cause, ssl.SSLCertVerificationError):
        raise CallbackError(
            f"callback server {redact(exchange.url)} presented a certificate that does not verify: {cause} "
            f"(set {CAFILE_ENV} to its CA bundle)",
            reason="tls_verify_failed",
            run_id=exchange.run_id if isinstance(exchange.run_id, str) else None,
        ) from exc


def describe(frame: Mapping[str, Any]) -> str:
    """Name a frame for messages."""
    return f"the {frame.get('type')} frame of run {frame.get('run_id')!r}"


def upload_plan(target: str, encoded: EncodedFrame, part: int) -> Iterator[tuple[str, EncodedFrame, dict[str, str]]]:
    """The requests that deliver a large frame to a run URL: its bytes in parts, then a request naming the total."""
    base = target.split("?", 1)[0].rstrip("/")
    for offset, views, length in byte_ranges(encoded.parts, part):
        body = EncodedFrame("application/octet-stream", list(views), length)
        yield f"{base}/upload?offset={offset}&total={encoded.size}", body, {}
    yield target, EncodedFrame(encoded.content_type, [], 0), {UPLOAD_HEADER: str(encoded.size)}


def upload_part(encoded: EncodedFrame, target: str, exc: CallbackError | None, exchange: Exchange) -> int | None:
    """Part size for an upload of ``encoded``, or ``None`` to send it whole (or, after ``exc``, to give up)."""
    if "/wove/runs/" not in target:
        return None  # only run URLs take uploads
    if exc is None:
        return UPLOAD_PART if encoded.size > UPLOAD_PART else None
    return exchange.limit if exc.status == 413 and exchange.limit else None
