"""``ProcessAdapter``: the embedded backend, a bounded pool of long-lived local worker processes.

Each worker runs ``wove.integrations._process_worker``, fed JSON lines on a private pipe. It runs every
payload through wove's worker entrypoint, which posts events to the callback server over HTTP exactly as a
Celery or Slurm worker would; the pipe only tells the pool when a worker is free. Plain subprocesses (rather
than ``multiprocessing``) are used because spawning never re-imports the user's ``__main__`` module and because a
pipe write to an already-warm worker is the cheapest hand-off there is.

While runs are short (the median of the last few under ``PREFETCH_BELOW`` seconds), a worker holds up to
``prefetch`` runs at a time: the one it runs and the next ones, waiting in its pipe; when it holds half of that or
fewer, the pool tops it up with one pipe write. Longer runs go out one per worker. A run is over for the pool once
its terminal frame has reached the executor, which tells the pool (``run_ended``). The worker posts the outcomes of
consecutive short runs together, as one batch request in which each frame keeps its own run's credential
(:mod:`wove.backend.batch`), so a burst of small tasks costs one request per few runs on both sides. The worker
writes ``free`` itself only when a run ended without a terminal frame (its payload could not load, or its outcome
could not be delivered).

Taking a run back (a cancel, or a run the weave gave up on): a worker that holds only that run is killed. One that
holds others is asked first (``recall``): a run still waiting is dropped without killing anyone; a running one
makes the worker post what it holds and start nothing more, then it is killed and the runs it had not started go
back to the front of the queue. When runs turn out uneven and a worker runs out of work while another still holds
runs it has not started, the idle one takes the last of them (a recall that leaves a running run alone), so a run
does not wait behind a long one while a worker idles. A worker that dies on its own takes the runs it held with
it: each is reported lost (``DeliveryLostError``; the task's ``retries`` decide).

Config keys (``executor_config``): ``max_workers``/``workers`` (pool size, default ``os.cpu_count()``),
``min_workers`` (started eagerly by ``start``, default 1), ``prefetch`` (runs a worker holds at a time, default
``PREFETCH``; ``1`` hands out one run at a time, for long tasks of uneven length), ``python`` (interpreter,
default this one), ``env`` (extra environment variables for workers).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from wove._types import Frame
from wove.errors import BackendUnavailableError, ConfigError, SubmitError
from wove.integrations.base import BackendAdapter

__all__ = ["ProcessAdapter", "ProcessSubmission"]

logger = logging.getLogger("wove.integrations.process")

#: Consecutive workers that may die before becoming ready before queued runs are failed instead of retried.
MAX_STARTUP_FAILURES = 3
#: Seconds an idle worker gets to exit on its own at ``close`` before it is killed.
EXIT_GRACE = 2.0
#: Runs a worker holds at a time by default (``prefetch``), while runs are short.
PREFETCH = 16
#: Runs taking less than this many seconds are short: saving a round trip per run is worth a prefetch.
PREFETCH_BELOW = 0.005
#: How many of the last runs' times decide whether runs are short.
RUN_TIME_WINDOW = 8
#: Seconds a worker gets to answer a recall before it is killed (its other runs are then reported lost).
RECALL_TIMEOUT = 5.0

_BOOTSTRAP = (
    "import json, sys; paths = json.loads(sys.argv[1]); "
    "sys.path[:] = paths + [p for p in sys.path if p and p not in paths]; "
    "from wove.integrations._process_worker import main; sys.exit(main())"
)


@dataclass(frozen=True)
class ProcessSubmission:
    """Identifies one submitted payload; ``ProcessAdapter.cancel`` takes it back."""

    run_id: str

    def __str__(self) -> str:
        """The pool knows a job by its run id: that is its id in ``w.result.records``."""
        return self.run_id


@dataclass(eq=False)
class _Job:
    run_id: str
    task_id: Any
    line: bytes
    worker: _Worker | None = None
    cancelled: bool = False
    ended: bool = False  # its terminal frame reached the executor
    stolen: bool = False  # an idle worker asked for it once (see ProcessAdapter._steal)


@dataclass(eq=False)
class _Worker:
    process: asyncio.subprocess.Process
    exited: asyncio.Future[int]  # set with the exit code once the pool has accounted for it
    ready: bool = False
    jobs: dict[str, _Job] = field(default_factory=dict)  # the runs handed to it and not over, in order
    recalls: int = 0  # recalls awaiting an answer: it gets no new runs meanwhile
    since: float = 0.0  # when the run it is on began to occupy it (handed over idle, or the previous one ended)
    prefetches: bool = False  # it answers recalls (a worker of an earlier wove does not): it may hold several runs
    doomed: bool = False  # killed, or about to be
    reader: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid


class ProcessAdapter(BackendAdapter):
    """Runs payloads on local worker processes that stay alive between tasks."""

    backend: ClassVar[str] = "process"
    install_hint: ClassVar[str] = "pip install 'wove[dispatch]'"
    #: A pipe takes any size, but a huge inline payload is base64-encoded and JSON-parsed; past 1 MiB a blob
    #: fetched over HTTP is cheaper.
    inline_payload_limit: ClassVar[int | None] = 1 << 20
    #: Workers are local processes: they call back over the server's Unix socket.
    local_workers: ClassVar[bool] = True
    #: ``module:function`` each worker calls with a payload (sync or async). The synchronous entrypoint posts over
    #: a pooled keep-alive socket (``wove.backend.client``), so workers never import aiohttp and reuse one connection.
    worker_entrypoint: ClassVar[str] = "wove.backend.worker:run_backend_payload"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_workers = _pool_size(self.config)
        self.min_workers = min(self.max_workers, _int_option(self.config, "min_workers", 1, minimum=0))
        self.prefetch = _int_option(self.config, "prefetch", PREFETCH)
        #: Seconds the last runs occupied their workers (a median of them: a cold first run is not typical).
        self._run_times: collections.deque[float] = collections.deque(maxlen=RUN_TIME_WINDOW)
        self._queue: collections.deque[_Job] = collections.deque()
        self._jobs: dict[str, _Job] = {}
        self._workers: set[_Worker] = set()
        self._recalls: dict[str, tuple[_Worker, asyncio.Future[None], asyncio.TimerHandle]] = {}
        self._steals: dict[str, tuple[_Worker, asyncio.TimerHandle]] = {}
        self._spawning = 0
        self._spawners: set[asyncio.Task[None]] = set()
        self._startup_failures = 0
        self._closed = False

    # -- adapter contract ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Launch ``min_workers`` in the background; the first ``submit`` never waits for imports to finish."""
        for _ in range(self.min_workers):
            self._spawn_soon()

    async def submit(self, payload: Frame, frame: Frame) -> ProcessSubmission:
        """Queue ``payload``; an idle worker takes it at once, otherwise the first one to free up does."""
        return self._queue_run(payload, frame)

    def submit_nowait(self, payload: Frame, frame: Frame) -> Any:
        """Queuing on a pipe never waits: the executor may submit without a task per run (unless a subclass
        changed ``submit``, which then must be used)."""
        if type(self).submit is not ProcessAdapter.submit:
            return NotImplemented
        return self._queue_run(payload, frame)

    def _queue_run(self, payload: Frame, frame: Frame) -> ProcessSubmission:
        if self._closed:
            raise SubmitError("the process pool is closed", environment=self.name, run_id=str(frame["run_id"]))
        run_id = str(frame["run_id"])
        message = {"op": "run", "payload": payload}
        job = _Job(run_id, frame.get("task_id"), _encode_line(message).encode() + b"\n")
        self._jobs[run_id] = job
        self._queue.append(job)
        self._dispatch()
        return ProcessSubmission(run_id)

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """Drop a queued run; stop a started one by killing its worker (a replacement is spawned). Returns once
        the run can no longer run."""
        stopped = self._stop_run(run_id, "cancel")
        if stopped is not None:
            await stopped

    def run_abandoned(self, run_id: str) -> None:
        """The weave gave up on the run (its worker went silent): kill that worker so the pool gets its slot back."""
        self._stop_run(run_id, "release the abandoned")

    def _stop_run(self, run_id: str, why: str) -> asyncio.Future[Any] | None:
        """Take a run back from the queue or from its worker; a future that is done once it can no longer run."""
        job = self._jobs.get(run_id)
        if job is None or job.ended:
            return None
        job.cancelled = True
        worker = job.worker
        if worker is None:
            self._jobs.pop(run_id, None)
            self._queue.remove(job)
            return None
        if run_id not in worker.jobs:
            return None  # it ended meanwhile: nothing left to stop
        if len(worker.jobs) == 1 or worker.doomed:
            logger.debug("killing worker %d to %s run %s", worker.pid, why, run_id)
            self._doom(worker)
            return worker.exited
        return self._recall(worker, run_id)

    def _recall(self, worker: _Worker, run_id: str) -> asyncio.Future[None]:
        """Ask ``worker`` for a run it holds along with others (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        overdue = loop.call_later(RECALL_TIMEOUT, self._recall_overdue, worker, run_id)
        self._recalls[run_id] = (worker, answered, overdue)
        worker.recalls += 1
        self._write(worker, _encode_line({"op": "recall", "run_id": run_id}).encode() + b"\n")
        return answered

    def _recalled(self, worker: _Worker, message: dict[str, Any]) -> None:
        run_id = str(message.get("run_id"))
        if message.get("steal"):
            self._stolen(worker, run_id, message.get("state") == "queued")
            return
        entry = self._recalls.pop(run_id, None)
        if entry is None:
            return
        _, answered, overdue = entry
        overdue.cancel()
        worker.recalls -= 1
        if message.get("state") != "running":  # dropped before it started, or already over
            job = worker.jobs.pop(run_id, None)
            if job is not None and self._jobs.get(run_id) is job:
                del self._jobs[run_id]
            answered.set_result(None)
            self._dispatch()
            return
        held = [worker.jobs.pop(str(held_id)) for held_id in message.get("held") or () if str(held_id) in worker.jobs]
        for job in reversed(held):  # never started: first in line again, on another worker
            self._take_back(job)
        logger.debug("killing worker %d to stop run %s (%d held runs requeued)", worker.pid, run_id, len(held))
        self._doom(worker)
        worker.exited.add_done_callback(lambda _: _resolve(answered))
        self._dispatch()

    def _steal(self) -> None:
        """Workers with nothing to do ask the worker holding the most runs for the last one it has not started."""
        for worker in self._workers:
            if worker.jobs or not worker.ready or worker.doomed or worker.process.returncode is not None:
                continue
            donors = [w for w in self._workers if len(w.jobs) > 1 and not w.doomed and not w.recalls]
            if not donors:
                return
            donor = max(donors, key=lambda w: len(w.jobs))
            job = next((j for j in reversed(donor.jobs.values()) if not j.stolen), None)
            if job is None:
                return
            job.stolen = True
            donor.recalls += 1
            overdue = asyncio.get_running_loop().call_later(RECALL_TIMEOUT, self._steal_overdue, job.run_id)
            self._steals[job.run_id] = (donor, overdue)
            line = {"op": "recall", "run_id": job.run_id, "steal": True}
            self._write(donor, _encode_line(line).encode() + b"\n")

    def _stolen(self, donor: _Worker, run_id: str, dropped: bool) -> None:
        """The answer to a steal: a run the donor had not started goes back to the front of the queue."""
        entry = self._steals.pop(run_id, None)
        if entry is None:
            return
        entry[1].cancel()
        donor.recalls -= 1
        job = donor.jobs.pop(run_id, None) if dropped else None
        if job is not None:
            self._take_back(job)
        self._dispatch()

    def _take_back(self, job: _Job) -> None:
        """A run a worker gave back before starting it: first in line again, unless it was cancelled meanwhile."""
        job.worker = None
        if job.cancelled:
            self._jobs.pop(job.run_id, None)
        else:
            self._queue.appendleft(job)

    def _steal_overdue(self, run_id: str) -> None:
        entry = self._steals.pop(run_id, None)
        if entry is not None:
            entry[0].recalls -= 1

    def _recall_overdue(self, worker: _Worker, run_id: str) -> None:
        entry = self._recalls.pop(run_id, None)
        if entry is not None:
            worker.recalls -= 1
            logger.warning("worker %d did not answer a recall of run %s in time: killing it", worker.pid, run_id)
            self._doom(worker)
            worker.exited.add_done_callback(lambda _: _resolve(entry[1]))

    def _doom(self, worker: _Worker) -> None:
        worker.doomed = True
        _kill(worker.process)

    def run_ended(self, run_id: str) -> None:
        """The executor saw the run's terminal frame: its worker may take another payload."""
        job = self._jobs.pop(run_id, None)
        if job is None:
            return
        job.ended = True
        worker = job.worker
        if worker is None or worker.jobs.pop(run_id, None) is None:
            return
        now = time.monotonic()
        self._run_times.append(now - worker.since)
        worker.since = now
        if len(worker.jobs) <= self._holding() // 2:
            self._dispatch()

    def _holding(self) -> int:
        """How many runs a worker may hold now: ``prefetch`` while runs are short, else one."""
        times = self._run_times
        short = bool(times) and sorted(times)[len(times) // 2] < PREFETCH_BELOW
        return self.prefetch if short else 1

    async def close(self) -> None:
        """Stop every worker: idle ones exit when their input closes, busy ones are killed."""
        self._closed = True
        self._queue.clear()
        self._jobs.clear()
        await asyncio.gather(*self._spawners, return_exceptions=True)
        workers = list(self._workers)
        for worker in workers:
            if worker.jobs or not worker.ready:
                _kill(worker.process)
            elif worker.process.stdin is not None:
                worker.process.stdin.close()
        for worker in workers:
            try:
                await asyncio.wait_for(worker.process.wait(), EXIT_GRACE)
            except asyncio.TimeoutError:
                _kill(worker.process)
                await worker.process.wait()
        readers = [w.reader for w in workers if w.reader is not None]
        await asyncio.gather(*readers, return_exceptions=True)

    # -- pool ------------------------------------------------------------------------------------------------

    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of the live workers (for tests and diagnostics)."""
        return tuple(sorted(w.pid for w in self._workers if w.process.returncode is None))

    def running_pid(self, run_id: str) -> int | None:
        """Process id of the worker holding ``run_id`` (running it, or about to), or None while it is queued in the
        pool or finished."""
        job = self._jobs.get(run_id)
        return job.worker.pid if job is not None and job.worker is not None else None

    def _dispatch(self) -> None:
        """Hand queued runs to workers, up to ``prefetch`` each and one pipe write per worker; grow the pool when
        runs wait and there is room."""
        if self._queue:
            given: dict[_Worker, list[bytes]] = {}
            limit = self._holding()
            while self._queue:
                worker = self._least_held(given, limit)
                if worker is None:
                    break
                job = self._queue.popleft()
                job.worker = worker
                if not worker.jobs:
                    worker.since = time.monotonic()
                worker.jobs[job.run_id] = job
                given.setdefault(worker, []).append(job.line)
            for worker, lines in given.items():
                self._write(worker, b"".join(lines))
        if not self._queue and self._jobs:
            self._steal()
        starting = self._spawning + sum(1 for w in self._workers if not w.ready)
        room = self.max_workers - len(self._workers) - self._spawning
        for _ in range(min(room, len(self._queue) - starting)):
            self._spawn_soon()

    def _least_held(self, given: dict[_Worker, list[bytes]], limit: int) -> _Worker | None:
        """The ready worker with the fewest runs that may take another: below ``limit``, and either being topped
        up in this round or down to half of it."""
        best: _Worker | None = None
        for worker in self._workers:
            held = len(worker.jobs)
            most = limit if worker.prefetches else 1
            if (
                worker.ready
                and not worker.doomed
                and not worker.recalls
                and held < most
                and (held <= most // 2 or worker in given)
                and worker.process.returncode is None
                and (best is None or held < len(best.jobs))
            ):
                best = worker
        return best

    def _write(self, worker: _Worker, data: bytes) -> None:
        stdin = worker.process.stdin
        assert stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a dying worker: its reader reports it
            stdin.write(data)

    def _spawn_soon(self) -> None:
        if self._closed:
            return
        self._spawning += 1
        task = asyncio.get_running_loop().create_task(self._spawn())
        self._spawners.add(task)
        task.add_done_callback(self._spawners.discard)

    async def _spawn(self) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                *self._worker_command(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, **{str(k): str(v) for k, v in dict(self.config.get("env") or {}).items()}},
                start_new_session=True,  # Ctrl-C reaches the weave, which stops the pool; not every worker
            )
        except Exception:
            self._spawning -= 1
            logger.exception("environment %r: could not start a worker process", self.name)
            self._startup_failed("could not start a worker process")
            return
        self._spawning -= 1
        worker = _Worker(process, asyncio.get_running_loop().create_future())
        self._workers.add(worker)
        assert process.stdin is not None
        init = {"op": "init", "entrypoint": self.worker_entrypoint, "flush_every": max(self.prefetch // 2, 1)}
        process.stdin.write(json.dumps(init).encode() + b"\n")
        worker.reader = asyncio.get_running_loop().create_task(self._read(worker))
        if self._closed:
            _kill(process)

    async def _read(self, worker: _Worker) -> None:
        """Follow one worker's status lines until it exits, then account for whatever it was running."""
        stdout = worker.process.stdout
        assert stdout is not None
        while line := await stdout.readline():
            message = json.loads(line)
            op = message.get("op")
            if op == "free":  # the run ended without a terminal frame (run_ended never comes for it)
                if worker.jobs.pop(str(message.get("run_id")), None) is not None:
                    self._dispatch()
            elif op == "undelivered":  # ... because its outcome could not be posted: tell the executor
                self._lose(str(message.get("run_id")), "its worker could not deliver the outcome")
            elif op == "recalled":
                self._recalled(worker, message)
            elif op == "done" and worker.jobs:  # a worker of an earlier wove: its oldest run's events are posted
                job = worker.jobs.pop(next(iter(worker.jobs)))
                if self._jobs.get(job.run_id) is job:
                    del self._jobs[job.run_id]
                self._dispatch()
            elif op == "ready":
                worker.ready = True
                worker.prefetches = message.get("recalls") is True
                self._startup_failures = 0
                self._dispatch()
        code = await worker.process.wait()
        self._worker_exited(worker, code)

    def _lose(self, run_id: str, why: str) -> None:
        job = self._jobs.pop(run_id, None)
        if job is None or job.ended or job.cancelled:
            return
        logger.warning("environment %r: %s (run %s)", self.name, why, run_id)
        self.report_lost({"run_id": job.run_id, "task_id": job.task_id}, why)

    def _worker_exited(self, worker: _Worker, code: int) -> None:
        self._workers.discard(worker)
        jobs = list(worker.jobs.values())
        worker.jobs.clear()
        for run_id, (recalled, answered, overdue) in list(self._recalls.items()):
            if recalled is worker:
                del self._recalls[run_id]
                overdue.cancel()
                _resolve(answered)
        for run_id, (donor, overdue) in list(self._steals.items()):
            if donor is worker:
                del self._steals[run_id]
                overdue.cancel()
        worker.exited.set_result(code)
        if self._closed:
            return
        lost = [job for job in jobs if not job.cancelled and not job.ended]
        for job in lost:
            self._jobs.pop(job.run_id, None)
            message = f"worker process {worker.pid} exited with code {code} while running the task"
            logger.warning("environment %r: %s (run %s)", self.name, message, job.run_id)
            self.report_lost({"run_id": job.run_id, "task_id": job.task_id}, message)
        if not jobs:
            logger.info("environment %r: worker process %d exited with code %d", self.name, worker.pid, code)
        if not worker.ready:
            self._startup_failed(f"worker process {worker.pid} exited with code {code} before it was ready")
            return
        self._spawn_soon()  # keep the pool at the size demand grew it to
        self._dispatch()

    def _startup_failed(self, reason: str) -> None:
        """Retry a few times, then fail the queued runs rather than respawning a broken worker forever."""
        self._startup_failures += 1
        if self._startup_failures < MAX_STARTUP_FAILURES:
            logger.warning("environment %r: %s; trying again", self.name, reason)
            self._dispatch()
            return
        logger.error("environment %r: %s; giving up on %d queued run(s)", self.name, reason, len(self._queue))
        while self._queue:
            job = self._queue.popleft()
            self._jobs.pop(job.run_id, None)
            exc = BackendUnavailableError(
                f"environment {self.name!r}: {reason}", environment=self.name, run_id=job.run_id
            )
            ids = {"run_id": job.run_id, "task_id": job.task_id}
            self.report_lost(ids, reason, kind="WorkerStartFailed", retryable=False, exception=exc)

    def _worker_command(self) -> list[str]:
        """The worker's command line. With this interpreter, the worker gets this process's ``sys.path`` (in
        order, before anything is imported), so it imports user modules and this very wove the way the weave
        does. Another interpreter (``python`` config) keeps its own path and must have wove installed."""
        python = str(self.config.get("python") or sys.executable)
        if python != sys.executable:
            return [python, "-m", "wove.integrations._process_worker"]
        return [python, "-c", _BOOTSTRAP, json.dumps([entry or os.getcwd() for entry in sys.path])]


_encode_line = json.JSONEncoder(separators=(",", ":")).encode


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


def _int_option(config: dict[str, Any], key: str, default: int, *, minimum: int = 1) -> int:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"executor_config[{key!r}] must be an integer >= {minimum}, got {value!r}")
    return value


def _pool_size(config: dict[str, Any]) -> int:
    key = "max_workers" if config.get("max_workers") is not None else "workers"
    return _int_option(config, key, os.cpu_count() or 1)
