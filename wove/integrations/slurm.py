"""``SlurmAdapter``: runs each payload as its own Slurm batch job, ``python -m wove.backend_worker``.

``submit`` pipes a small batch script into ``sbatch --parsable`` (an asyncio subprocess: the event loop never
waits on the controller). The script exports the payload in ``WOVE_BACKEND_PAYLOAD`` and execs the worker, which
posts the task's events to the callback server. Bodies above ``inline_payload_limit`` (64 KiB) stay on that server
and the worker fetches them, so a job description stays small whatever the task's size.

One poller per environment asks ``squeue`` about every job in flight at once, each ``poll_interval``. A job that ends
(FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, ... or COMPLETED) without its worker having reported an
outcome ends its run with Slurm's state, reason, exit status and the tail of the job's output file. Cancelling a run
runs ``scancel``; the worker turns Slurm's SIGTERM into ``task_cancelled``.

Config keys (``executor_config``): ``python`` (the interpreter on the compute nodes), ``setup`` (shell lines run
first, e.g. ``module load``), ``env`` (variables exported to the job), ``sbatch_options`` (a mapping or a list),
``job_name_prefix``, ``output_dir`` (job output files, read back on failure), ``poll_interval``, ``submit`` (a callable
that submits a ``SlurmJob`` and returns its id, for sites with their own wrappers), and the commands ``sbatch``,
``squeue``, ``scancel``, ``scontrol``. See docs/backends/slurm.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from wove._types import Frame
from wove.errors import BackendUnavailableError, RunCancelledError, SubmitError
from wove.integrations._slurm_jobs import (
    RETRYABLE_STATES,
    SQUEUE_FORMAT,
    JobStatus,
    SlurmJob,
    SlurmSettings,
    failure_message,
    parse_job_id,
    parse_scontrol,
    parse_squeue,
    tail_text,
)
from wove.integrations.base import BackendAdapter

__all__ = ["SlurmAdapter", "SlurmJob"]

logger = logging.getLogger("wove.integrations.slurm")

#: Seconds any one Slurm command may take (a busy controller answers slowly, but it answers).
COMMAND_TIMEOUT = 60.0
#: sbatch processes running at once per environment: a mapped task of thousands of items queues here, not in the
#: controller's RPC queue.
SUBMIT_CONCURRENCY = 8
#: Job ids per squeue call, so the command line stays short.
POLL_CHUNK = 500
#: Seconds a job that ended like a worker that reported (exit 0/1/143, cancelled) waits before it counts as lost, so
#: the outcome the worker posted just before exiting always wins.
REPORT_GRACE = 1.0
#: Bytes read from the end of a job's output file for a failure message.
TAIL_BYTES = 16 * 1024


@dataclass(eq=False)
class _Job:
    """A submitted job wove still watches."""

    job_id: str
    run_id: str
    task_id: Any
    name: str
    output: str | None
    ended: bool = False  # the run already has its outcome (run_ended): nothing to report
    reporting: bool = False  # the job ended and its report waits out the grace


class _Done(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


class SlurmAdapter(BackendAdapter):
    """Submits each payload with ``sbatch`` and follows the jobs with ``squeue``; one instance per environment."""

    backend: ClassVar[str] = "slurm"
    install_hint: ClassVar[str] = "pip install 'wove[slurm]' (and Slurm's client commands: sbatch, squeue, scancel)"
    #: The payload travels in the batch script as one environment variable, which the kernel caps at 128 KiB; bodies
    #: above 64 KiB (about 86 KiB once encoded) are fetched by the worker from the callback server instead.
    inline_payload_limit: ClassVar[int | None] = 64 * 1024

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = SlurmSettings.from_config(self.name, self.config)
        self._jobs: dict[str, _Job] = {}  # job id -> job in flight
        self._job_of_run: dict[str, str] = {}
        self._submits = asyncio.Semaphore(SUBMIT_CONCURRENCY)
        self._poller: asyncio.Task[None] | None = None
        self._reports: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- adapter contract ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check that Slurm's commands exist and create ``output_dir``."""
        settings = self.settings
        commands = [settings.squeue, settings.scancel, settings.scontrol]
        if settings.submit is None:
            commands.insert(0, settings.sbatch)
        missing = [command[0] for command in commands if shutil.which(command[0]) is None]
        if missing:
            raise BackendUnavailableError(
                f"environment {self.name!r} (slurm): {', '.join(missing)} not found on PATH; run the weave where "
                "Slurm's client commands work (a login node), or name them with executor_config['sbatch'], "
                "['squeue'], ['scancel'], ['scontrol']",
                environment=self.name,
            )
        if settings.output_dir is not None:
            try:
                await self.run_blocking(os.makedirs, settings.output_dir, exist_ok=True)
            except OSError as exc:
                raise BackendUnavailableError(
                    f"environment {self.name!r} (slurm): cannot create output_dir {settings.output_dir!r}: {exc}",
                    environment=self.name,
                ) from exc

    async def submit(self, payload: Frame, frame: Frame) -> str:
        """Submit the run's job and return its Slurm job id once the controller accepted it."""
        from wove.backend.codec import payload_to_b64

        run_id = str(frame["run_id"])
        if self._closed:
            raise SubmitError(f"environment {self.name!r}: the slurm adapter is closed", environment=self.name)
        job = self.settings.job(run_id, str(frame.get("task_name") or "task"), payload_to_b64(payload))
        async with self._submits:
            job_id = await (self._submit_custom(job) if self.settings.submit is not None else self._sbatch(job))
        self._track(_Job(job_id, run_id, frame.get("task_id"), job.name, job.output))
        logger.debug("environment %r: run %s is Slurm job %s (%s)", self.name, run_id, job_id, job.name)
        return job_id

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """``scancel`` the run's job: a pending job never starts, a running worker gets SIGTERM."""
        job_id = self._job_of_run.pop(run_id, None)
        if job_id is None:
            return  # never submitted, or already ended (and reported)
        self._jobs.pop(job_id, None)
        done = await self._run(run_id, "scancel", [*self.settings.scancel, job_id])
        if done.returncode != 0:
            raise SubmitError(
                f"environment {self.name!r} (slurm): scancel {job_id} failed: {_last_lines(done.stderr)}",
                environment=self.name,
                run_id=run_id,
            )

    async def close(self) -> None:
        """Stop polling. Jobs still in flight are left to the runs' orphan policy (``cancel`` scancels them)."""
        if self._closed:
            return
        self._closed = True
        tasks = [task for task in (self._poller, *self._reports) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._jobs:
            logger.debug("environment %r: stopped watching Slurm jobs %s", self.name, ", ".join(self._jobs))
        self._jobs.clear()
        self._job_of_run.clear()

    # -- submission ------------------------------------------------------------------------------------------

    async def _sbatch(self, job: SlurmJob) -> str:
        done = await self._run(job.run_id, "sbatch", job.argv, stdin=job.script.encode())
        if done.returncode != 0:
            message = f"sbatch refused the job (exit status {done.returncode}): {_last_lines(done.stderr)}"
            if "too large" in done.stderr.lower():
                message += "; lower executor_config['inline_payload_limit'] so big arguments go by reference"
            raise SubmitError(f"environment {self.name!r} (slurm): {message}", environment=self.name, run_id=job.run_id)
        return self._job_id(job, done.stdout, "sbatch --parsable printed")

    async def _submit_custom(self, job: SlurmJob) -> str:
        submit = self.settings.submit
        assert submit is not None
        with self.translate_errors("the submit callable", run_id=job.run_id):
            if inspect.iscoroutinefunction(submit):
                result = await submit(job)
            else:
                result = await self.run_blocking(submit, job)
                if inspect.isawaitable(result):
                    result = await result
        return self._job_id(job, result, "the submit callable returned")

    def _job_id(self, job: SlurmJob, value: Any, what: str) -> str:
        try:
            return parse_job_id(value.strip().splitlines()[0] if isinstance(value, str) and value.strip() else value)
        except ValueError as exc:
            raise SubmitError(
                f"environment {self.name!r} (slurm): {what} no job id: {exc}", environment=self.name, run_id=job.run_id
            ) from None

    def run_ended(self, run_id: str) -> None:
        """The run has its outcome: stop following its job, and never read its output for a report."""
        job_id = self._job_of_run.pop(run_id, None)
        job = self._jobs.pop(job_id, None) if job_id is not None else None
        if job is not None:
            job.ended = True

    # -- following jobs --------------------------------------------------------------------------------------

    def _track(self, job: _Job) -> None:
        self._jobs[job.job_id] = job
        self._job_of_run[job.run_id] = job.job_id
        if self._poller is None and not self._closed:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """Every ``poll_interval``: one ``squeue`` for every job in flight; report the ones that ended."""
        try:
            while self._jobs and not self._closed:
                await asyncio.sleep(self.settings.poll_interval)
                job_ids = [job_id for job_id, job in self._jobs.items() if not job.reporting]
                try:
                    statuses = await self._statuses(job_ids)
                except SubmitError as exc:  # the controller is busy or restarting: the next round asks again
                    logger.warning("environment %r: could not poll Slurm: %s", self.name, exc)
                    continue
                for job_id in job_ids:
                    status = statuses.get(job_id)
                    if status is not None and not status.ended:
                        continue
                    job = self._jobs.get(job_id)
                    if job is None or job.reporting:
                        continue  # cancelled, or its run ended, meanwhile; or being reported
                    job.reporting = True
                    self._spawn(self._report(job, status))
        finally:
            self._poller = None

    async def _statuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        statuses: dict[str, JobStatus] = {}
        for start in range(0, len(job_ids), POLL_CHUNK):
            chunk = ",".join(job_ids[start : start + POLL_CHUNK])
            argv = [*self.settings.squeue, "-h", "-t", "all", "-j", chunk, "-O", SQUEUE_FORMAT]
            done = await self._run(None, "squeue", argv)
            if done.returncode != 0:
                if "invalid job id" in done.stderr.lower():
                    continue  # Slurm no longer knows any job of the chunk
                raise SubmitError(f"squeue failed (exit status {done.returncode}): {_last_lines(done.stderr)}")
            statuses.update(parse_squeue(done.stdout))
        return statuses

    async def _report(self, job: _Job, status: JobStatus | None) -> None:
        """End the run of a job that ended; dropped by the executor when the worker's own outcome came first."""
        if status is None or status.worker_reported:
            await asyncio.sleep(REPORT_GRACE)
        if job.ended or self._jobs.get(job.job_id) is not job:
            return  # the worker's own outcome arrived meanwhile
        self._jobs.pop(job.job_id, None)
        self._job_of_run.pop(job.run_id, None)
        output, tail = await self._output_tail(job, status)
        message = failure_message(job.job_id, job.name, status, output, tail)
        ids = {"run_id": job.run_id, "task_id": job.task_id}
        if status is not None and status.state == "CANCELLED":  # by an operator or an admin, not by this weave
            exc = RunCancelledError(f"environment {self.name!r}: {message}", environment=self.name, run_id=job.run_id)
            self.report_lost(ids, message, kind="JobCancelled", retryable=False, exception=exc)
        elif status is None:
            self.report_lost(ids, message, kind="JobLost")
        else:
            self.report_lost(ids, message, kind="JobFailed", retryable=status.state in RETRYABLE_STATES)

    async def _output_tail(self, job: _Job, status: JobStatus | None) -> tuple[str | None, str]:
        """The job's output file and its last lines; asks ``scontrol`` for the file unless wove chose it."""
        path = job.output
        if path is None and (status is None or not status.worker_reported):
            try:
                done = await self._run(job.run_id, "scontrol", [*self.settings.scontrol, "show", "job", job.job_id])
            except SubmitError as exc:  # the report goes out without the output rather than not at all
                logger.debug("environment %r: %s", self.name, exc)
            else:
                path = parse_scontrol(done.stdout).get("StdOut") if done.returncode == 0 else None
        if not path:
            return None, ""
        try:
            return path, tail_text(await self.run_blocking(_read_end, path, TAIL_BYTES))
        except OSError as exc:
            logger.debug("environment %r: cannot read %s: %r", self.name, path, exc)
            return path, ""

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    # -- commands --------------------------------------------------------------------------------------------

    async def _run(self, run_id: str | None, what: str, argv: Sequence[str], stdin: bytes | None = None) -> _Done:
        """Run one Slurm command as an asyncio subprocess; a missing program or a hang becomes ``SubmitError``."""
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            message = f"environment {self.name!r} (slurm): cannot run {what} ({argv[0]}): {exc}"
            raise SubmitError(message, environment=self.name, run_id=run_id) from exc
        try:
            out, err = await asyncio.wait_for(process.communicate(stdin), COMMAND_TIMEOUT)
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            if isinstance(exc, asyncio.TimeoutError):
                message = f"environment {self.name!r} (slurm): {what} did not answer within {COMMAND_TIMEOUT:g}s"
                raise SubmitError(message, environment=self.name, run_id=run_id) from None
            raise
        assert process.returncode is not None
        return _Done(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def _read_end(path: str, limit: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - limit))
        return handle.read()


def _last_lines(text: str, count: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-count:]) or "(no message)"
