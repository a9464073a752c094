"""The long-lived worker loop behind ``ProcessAdapter``: ``python -m wove.integrations._process_worker``.

Protocol, one JSON object per line (payloads are JSON-safe, so a line never contains a raw newline):

- parent -> worker: ``{"op": "init", "entrypoint": "module:function", "flush_every": n}`` once, then
  ``{"op": "run", "payload": {...}}`` per run (the pool may hand over several before the first ends: its prefetch)
  and ``{"op": "recall", "run_id"}`` to take back a run it handed over (with ``"steal": true``, only if it has not
  started: another worker is idle). End of input means exit.
- worker -> parent: ``{"op": "ready", "pid", "host", "recalls": true}`` once imports are warm (``recalls``: it
  answers recalls, so the pool may hand it several runs at once). A run whose terminal frame reached the
  callback server needs no line: the pool hears of it from the executor (``ProcessAdapter.run_ended``). Any other
  run ends with ``{"op": "free", "run_id"}``, and ``{"op": "undelivered", "run_id"}`` follows when its outcome
  could not be posted. A recall is answered with ``{"op": "recalled", "run_id", "state", "held"}``: ``"queued"``
  (dropped before it started), ``"running"`` (the worker starts nothing more; ``held`` lists the runs it had not
  started, and every earlier outcome has been answered by the server, so the pool may kill it now) or ``"gone"``
  (it had already ended). A steal is answered the same way, with ``"steal": true``; it never stops the worker.

The worker runs each payload through the same entrypoint real backends use, so events travel back over the
callback HTTP server, never over this pipe. With wove's own entrypoint, the terminal frames of consecutive short
runs are held and posted together (:mod:`wove.backend.outbox`): after ``flush_every`` runs, when the oldest has
waited ``FLUSH_AFTER`` seconds, before the worker waits for work, and before it answers a recall.
"""

from __future__ import annotations

import collections
import importlib
import inspect
import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

#: Seconds the oldest held outcome may wait for later runs before the worker posts what it holds.
FLUSH_AFTER = 0.002


def _protocol_streams() -> tuple[IO[bytes], IO[bytes]]:
    """Keep private copies of stdin/stdout for the protocol; task code gets /dev/null and stderr instead.

    A task that prints or reads stdin must not corrupt or steal protocol lines.
    """
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return proto_in, proto_out


def _load(path: str) -> Callable[..., Any]:
    module, _, attribute = path.partition(":")
    func: Callable[..., Any] = getattr(importlib.import_module(module), attribute)
    return func


class _Lines:
    """Status lines to the pool, from any thread."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with self.lock:
            self.out.write(data)


class _Runs:
    """The runs this worker was handed and has not started, the one it runs, and whether it may start more."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.waiting: collections.deque[tuple[Any, Any]] = collections.deque()
        self.current: Any = None
        self.halted = False  # a recall found its run running: start nothing more, the pool kills this process
        self.closed = False  # end of input

    def add(self, run_id: Any, payload: Any) -> None:
        with self.cond:
            self.waiting.append((run_id, payload))
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    def next(self, outbox: Any) -> tuple[Any, Any] | None:
        """The next run to start (``None`` at end of input); posts what ``outbox`` holds before waiting for work."""
        while True:
            with self.cond:
                if self.waiting and not self.halted:
                    run_id, payload = self.waiting.popleft()
                    self.current = run_id
                    return run_id, payload
                if self.closed:
                    return None
                if outbox is None or not len(outbox):
                    self.cond.wait()
                    continue
            outbox.flush()

    def ended(self) -> bool:
        """The current run is over; whether another one is waiting."""
        with self.cond:
            self.current = None
            return bool(self.waiting)

    def recall(self, run_id: Any, halt: bool) -> tuple[str, list[Any]]:
        """Drop ``run_id`` if it waits; if it runs and ``halt``, start nothing more and list what waits."""
        with self.cond:
            for index, (waiting_id, _) in enumerate(self.waiting):
                if waiting_id == run_id:
                    del self.waiting[index]
                    return "queued", []
            if self.current == run_id:
                if not halt:
                    return "running", []
                self.halted = True
                return "running", [waiting_id for waiting_id, _ in self.waiting]
            return "gone", []


def main() -> int:
    proto_in, proto_out = _protocol_streams()
    init = json.loads(proto_in.readline() or b"{}")
    if init.get("op") != "init":
        print("wove process worker: expected an init line", file=sys.stderr)
        return 2
    entrypoint = _load(init["entrypoint"])
    flush_every = init.get("flush_every")
    lines, runs = _Lines(proto_out), _Runs()
    outbox = _outbox(entrypoint, flush_every if isinstance(flush_every, int) else 1, lines)
    # Runs are served from one long-lived thread rather than the main thread: the synchronous entrypoint, when it
    # finds itself in the main thread, starts a helper thread per task to watch for SIGTERM. The pool never sends
    # SIGTERM (it kills), so that per-task thread would be pure latency. Another thread reads the pipe, so a recall
    # is answered while a run is going; it is a daemon, so a task's SystemExit ends the process without it.
    codes: list[int] = []
    thread = threading.Thread(target=_serve, args=(runs, lines, entrypoint, outbox, codes), name="wove-worker")
    reader = threading.Thread(target=_read, args=(proto_in, runs, lines, outbox), name="wove-pipe", daemon=True)
    thread.start()
    reader.start()
    lines.send({"op": "ready", "pid": os.getpid(), "host": socket.gethostname(), "recalls": True})
    thread.join()
    return codes[0] if codes else 1


def _read(proto_in: IO[bytes], runs: _Runs, lines: _Lines, outbox: Any) -> None:
    """Take the pool's lines: runs join the queue, recalls are answered at once."""
    for line in proto_in:
        message = json.loads(line)
        op = message.get("op")
        if op == "run":
            payload = message["payload"]
            runs.add(payload.get("run_id"), payload)
        elif op == "recall":
            steal = message.get("steal") is True
            state, held = runs.recall(message.get("run_id"), halt=not steal)
            if state != "queued" and not steal and outbox is not None:
                outbox.flush()  # every earlier outcome is answered before the pool acts on the reply
            answer = {"op": "recalled", "run_id": message.get("run_id"), "state": state, "held": held}
            lines.send({**answer, "steal": True} if steal else answer)
    runs.close()


def _outbox(entrypoint: Callable[..., Any], flush_every: int, lines: _Lines) -> Any:
    """An outbox for wove's own synchronous entrypoint when the pool hands over several runs at once, else None."""
    from wove.backend import worker as backend_worker

    if entrypoint is not backend_worker.run_backend_payload or flush_every <= 1:
        return None
    from wove.backend.outbox import Outbox
    from wove.errors import CallbackError

    def undelivered(run_id: str, exc: CallbackError) -> None:
        print(f"wove process worker: run {run_id}: {exc}", file=sys.stderr)
        if not exc.duplicate_delivery:
            lines.send({"op": "free", "run_id": run_id})
            lines.send({"op": "undelivered", "run_id": run_id})

    return Outbox(flush_every, FLUSH_AFTER, undelivered)


def _serve(runs: _Runs, lines: _Lines, entrypoint: Callable[..., Any], outbox: Any, codes: list[int]) -> None:
    from wove.errors import BackendUnavailableError, CallbackError, PayloadError

    run = entrypoint
    from wove.backend import worker as backend_worker

    reports_end = entrypoint is backend_worker.run_backend_payload
    trace = backend_worker.RunTrace()
    if reports_end:
        # The pool never hands a payload out twice, so a run need not wait for its task_started to be accepted,
        # and a short run folds its start into its terminal frame (see wove.backend.worker.run_payload). The pool
        # learns the run ended from that terminal frame, so nothing goes back on the pipe unless it failed.
        def run(payload: Any) -> Any:
            return backend_worker.run_payload(payload, trace, start=backend_worker.START_LAZY, outbox=outbox)

    elif inspect.iscoroutinefunction(entrypoint):
        import asyncio

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        def run(payload: Any) -> Any:
            return loop.run_until_complete(entrypoint(payload))

    code = 0
    while (item := runs.next(outbox)) is not None:
        run_id, payload = item
        ended = False  # its terminal frame reached the callback server (or waits in the outbox)
        trace.task_exception = None
        try:
            run(payload)
            ended = reports_end
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            break
        except BaseException as exc:
            if exc is trace.task_exception:
                ended = reports_end  # the task's own exception, already reported to the weave as task_error
            elif isinstance(exc, (CallbackError, PayloadError, BackendUnavailableError)):
                # The run could not be loaded or its events not delivered: worth a line on stderr.
                print(f"wove process worker: run {run_id}: {exc}", file=sys.stderr)
                if isinstance(exc, CallbackError) and not exc.duplicate_delivery:
                    runs.ended()
                    lines.send({"op": "free", "run_id": run_id})
                    lines.send({"op": "undelivered", "run_id": run_id})
                    continue
        sys.stdout.flush()
        sys.stderr.flush()
        more = runs.ended()
        if not ended:
            lines.send({"op": "free", "run_id": run_id})
        if outbox is not None and (not more or outbox.due()):
            outbox.flush()
    if outbox is not None:
        outbox.flush()
    codes.append(code)


if __name__ == "__main__":
    sys.exit(main())
