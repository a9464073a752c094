"""Terminal frames a worker holds back, so that the frames of several short runs reach the server in one request.

A worker that is handed several runs at once (the ``process`` pool's prefetch) runs them one after another. Posting
each run's outcome and waiting for the answer before the next run costs a request and a round trip per run on both
sides; held here instead, the outcomes of a few runs go out together as one batch request
(:meth:`~wove.backend.client.CallbackConnection.post_many`, :mod:`wove.backend.batch`): each frame with its own
run's URL path and credential, checked by the server as if posted alone.

The owner decides when to flush (:meth:`Outbox.due`, and before it waits for work or hands a run back); a large
frame is never held. Flushes are serialised: when :meth:`Outbox.flush` returns, everything held before the call has
been answered by the server, which is what a pool relies on before it kills the worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from wove.backend.client import CallbackConnection, HeldFrame
from wove.backend.codec import encode_frame
from wove.backend.wire import COALESCE
from wove.errors import CallbackError

__all__ = ["Outbox"]


class Outbox:
    """Held terminal frames of one worker process; every method is thread-safe.

    ``size``: how many frames make a flush due; ``max_age``: seconds the oldest may wait before one is due;
    ``undelivered(run_id, error)``: told of each frame the server refused or could not be reached for.
    """

    def __init__(self, size: int, max_age: float, undelivered: Callable[[str, CallbackError], None]) -> None:
        self.size = max(size, 1)
        self.max_age = max_age
        self.undelivered = undelivered
        self._held: list[tuple[tuple[str, str, int, str | None], HeldFrame]] = []  # (connection route, frame)
        self._since = 0.0
        self._lock = threading.Lock()
        self._flushing = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def deliver(self, conn: CallbackConnection, frame: Mapping[str, Any]) -> None:
        """Hold ``frame`` (a run's terminal frame, posted on ``conn`` otherwise) or, when large, post it now."""
        encoded = encode_frame(frame)  # an unpicklable value raises PayloadError here, as it would in post()
        if encoded.size > COALESCE:
            conn.post(frame, encoded=encoded)
            return
        summary = {key: frame.get(key) for key in ("type", "run_id", "task_id")}
        with self._lock:
            if not self._held:
                self._since = time.monotonic()
            self._held.append((conn.route, HeldFrame(conn.url, summary, encoded)))

    def due(self) -> bool:
        """Whether enough frames are held, or the oldest has waited long enough, to flush now."""
        held = len(self._held)
        return held >= self.size or (held > 0 and time.monotonic() - self._since >= self.max_age)

    def flush(self) -> None:
        """Post every held frame; returns once the server answered them all (or they met their errors)."""
        with self._flushing:
            with self._lock:
                held, self._held = self._held, []
            start = 0
            while start < len(held):  # frames for one server share its connection (a worker has one server)
                route = held[start][0]
                end = start + 1
                while end < len(held) and held[end][0] == route:
                    end += 1
                batch = [item for _, item in held[start:end]]
                with CallbackConnection(batch[0].url, unix_socket=route[3]) as conn:
                    errors = conn.post_many(batch)
                for item, error in zip(batch, errors, strict=True):
                    if error is not None:
                        self.undelivered(str(item.frame.get("run_id")), error)
                start = end
