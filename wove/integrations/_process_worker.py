"""The long-lived worker loop behind ``ProcessAdapter``: ``python -m wove.integrations._process_worker``.

Protocol, one JSON object per line (payloads are JSON-safe, so a line never contains a raw newline):

- parent -> worker: ``{"op": "init", "entrypoint": "module:function"}`` once, then
  ``{"op": "run", "payload": {...}}`` per task. End of input means exit.
- worker -> parent: ``{"op": "ready", "pid", "host"}`` once imports are warm. A run whose terminal frame reached the
  callback server needs no line: the pool hears of it from the executor (``ProcessAdapter.run_ended``). Any other
  run ends with ``{"op": "free", "run_id"}``, and ``{"op": "undelivered", "run_id"}`` follows when its outcome
  could not be posted.

The worker runs each payload through the same entrypoint real backends use, so events travel back over the
callback HTTP server, never over this pipe. The pipe only tells the pool when the worker is free again.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import IO, Any


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


def _send(out: IO[bytes], message: dict[str, Any]) -> None:
    out.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def main() -> int:
    proto_in, proto_out = _protocol_streams()
    init = json.loads(proto_in.readline() or b"{}")
    if init.get("op") != "init":
        print("wove process worker: expected an init line", file=sys.stderr)
        return 2
    entrypoint = _load(init["entrypoint"])
    # Serve from one long-lived thread rather than the main thread: the synchronous entrypoint, when it finds
    # itself in the main thread, starts a helper thread per task to watch for SIGTERM. The pool never sends
    # SIGTERM (it kills), so that per-task thread would be pure latency.
    codes: list[int] = []
    thread = threading.Thread(target=_serve, args=(proto_in, proto_out, entrypoint, codes), name="wove-worker")
    thread.start()
    thread.join()
    return codes[0] if codes else 1


def _serve(proto_in: IO[bytes], proto_out: IO[bytes], entrypoint: Callable[..., Any], codes: list[int]) -> None:
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
            return backend_worker.run_payload(payload, trace, start=backend_worker.START_LAZY)

    elif inspect.iscoroutinefunction(entrypoint):
        import asyncio

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        def run(payload: Any) -> Any:
            return loop.run_until_complete(entrypoint(payload))

    _send(proto_out, {"op": "ready", "pid": os.getpid(), "host": socket.gethostname()})
    code = 0
    for line in proto_in:
        payload = json.loads(line)["payload"]
        run_id = payload.get("run_id")
        ended = False  # its terminal frame reached the callback server
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
                    _send(proto_out, {"op": "free", "run_id": run_id})
                    _send(proto_out, {"op": "undelivered", "run_id": run_id})
                    continue
        sys.stdout.flush()
        sys.stderr.flush()
        if not ended:
            _send(proto_out, {"op": "free", "run_id": run_id})
    codes.append(code)


if __name__ == "__main__":
    sys.exit(main())
