"""``ObjectWatch``: follows one kind of Kubernetes object (list, then watch) on a daemon thread.

The official client's ``Watch`` streams events for one watch request; this adds what a long-lived follower needs:
resuming from the last ``resourceVersion`` when the server ends a watch (every ``WATCH_SECONDS``), a fresh list when
that version expired (HTTP 410), ``DELETED`` for objects that vanished while no watch was open, and a growing pause
between attempts while the API server cannot be reached. Every event reaches ``handler(kind, object)`` on the given
event loop, the object as the plain dict the server sent.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["WATCH_SECONDS", "ObjectWatch"]

logger = logging.getLogger("wove.integrations.kubernetes_jobs")

#: Seconds the API server keeps one watch open; the follower then resumes where it stopped.
WATCH_SECONDS = 60
#: Seconds to connect, and to wait for a list answer.
CONNECT_SECONDS = 10.0
LIST_SECONDS = 60.0
#: Objects per list page.
PAGE_SIZE = 500
#: Longest pause between attempts while the API server fails.
MAX_BACKOFF = 30.0

Handler = Callable[[str, dict[str, Any]], None]


class ObjectWatch:
    """Calls ``handler(kind, obj)`` on ``loop`` for every change of the objects ``list_func`` returns.

    ``list_func`` is a ``list_namespaced_*`` method of the official client; it is called with ``namespace`` and
    ``label_selector`` for lists and, through ``kubernetes.watch.Watch``, for watches. ``kind`` is ``ADDED``,
    ``MODIFIED`` or ``DELETED``.
    """

    def __init__(
        self,
        list_func: Callable[..., Any],
        *,
        namespace: str,
        label_selector: str,
        loop: asyncio.AbstractEventLoop,
        handler: Handler,
        what: str,
    ) -> None:
        self._list = list_func
        self._selection = {"namespace": namespace, "label_selector": label_selector}
        self._loop = loop
        self._handler = handler
        self._what = what
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._watch: Any = None
        self._known: dict[str, dict[str, Any]] = {}
        self._thread = threading.Thread(target=self._follow, name=f"wove-watch-{what}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop following; waits up to ``timeout`` seconds for the thread (it is a daemon either way). Blocking."""
        self._stopped.set()
        if self._thread is threading.current_thread() or not self._thread.is_alive():
            return
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            with self._lock:
                watch = self._watch
            if watch is not None:
                # Shuts the socket down, so a read blocked on it returns at once. Asked again until the thread ends:
                # a watch whose response had not arrived yet has no socket to shut down.
                watch.stop()
            self._thread.join(0.05)

    # -- the thread ----------------------------------------------------------------------------------------------------

    def _follow(self) -> None:
        from kubernetes.client.exceptions import ApiException

        version: str | None = None
        failures = 0
        while not self._stopped.is_set():
            try:
                if version is None:
                    version = self._relist()
                version = self._watch_from(version)
                failures = 0
            except ApiException as exc:
                if exc.status == 410:  # the version is older than the server's history: list again
                    version = None
                    continue
                failures = self._failed(failures, exc)
            except Exception as exc:
                failures = self._failed(failures, exc)

    def _relist(self) -> str:
        """List every object (page by page), report what changed since the last list, return the list's version."""
        items: dict[str, dict[str, Any]] = {}
        token: str | None = None
        while True:
            options: dict[str, Any] = {"limit": PAGE_SIZE}
            if token:
                options["_continue"] = token
            response = self._list(
                **self._selection, **options, _preload_content=False, _request_timeout=(CONNECT_SECONDS, LIST_SECONDS)
            )
            page = json.loads(response.data)
            for item in page.get("items") or ():
                items[item["metadata"]["name"]] = item
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
        for name in list(self._known):
            if name not in items:
                self._deliver("DELETED", self._known.pop(name))
        for name, item in items.items():
            before = self._known.get(name)
            if before is None or _version(before) != _version(item):
                self._known[name] = item
                self._deliver("MODIFIED" if before is not None else "ADDED", item)
        return str(page["metadata"]["resourceVersion"])

    def _watch_from(self, version: str) -> str:
        """Stream events newer than ``version`` until the server ends the watch; return the last version seen."""
        watching: Any = importlib.import_module("kubernetes.watch")  # typed as Any: the module is untyped
        with self._lock:
            if self._stopped.is_set():
                return version
            # Objects stay the dicts the server sent: the adapter reads a few fields, and building the client's
            # models for every event of every pod would cost a millisecond or two each.
            self._watch = watch = watching.Watch(return_type="object")
        try:
            events = watch.stream(
                self._list,
                **self._selection,
                resource_version=version,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(CONNECT_SECONDS, WATCH_SECONDS + 30),
            )
            for event in events:
                if self._stopped.is_set():
                    break
                obj = event["raw_object"]
                version = _version(obj) or version
                kind = event["type"]
                if kind not in ("ADDED", "MODIFIED", "DELETED"):
                    continue  # BOOKMARK: only its version matters
                name = obj["metadata"]["name"]
                if kind == "DELETED":
                    self._known.pop(name, None)
                else:
                    self._known[name] = obj
                self._deliver(kind, obj)
        finally:
            with self._lock:
                self._watch = None
        return version

    def _failed(self, failures: int, exc: BaseException) -> int:
        if self._stopped.is_set():
            return failures
        pause = min(MAX_BACKOFF, 0.5 * 2**failures)
        log = logger.warning if failures == 0 or pause == MAX_BACKOFF else logger.debug
        log("watching %s failed (%s: %s); trying again in %.1fs", self._what, type(exc).__name__, exc, pause)
        self._stopped.wait(pause)
        return failures + 1

    def _deliver(self, kind: str, obj: dict[str, Any]) -> None:
        if self._stopped.is_set():
            return
        try:
            self._loop.call_soon_threadsafe(self._handler, kind, obj)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self._stopped.set()


def _version(obj: Mapping[str, Any]) -> str | None:
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return str(version) if version else None
