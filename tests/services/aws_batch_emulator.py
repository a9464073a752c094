"""An emulated AWS Batch for the tests: moto's Batch API, with each job run as a local process.

Run as ``python -m tests.services.aws_batch_emulator --port PORT --state-dir DIR --image NAME``.

moto serves the real AWS Batch, CloudWatch Logs and IAM HTTP APIs on one port, so the official boto3 client talks to
it as to AWS. In its no-Docker mode moto marks every job SUCCEEDED the moment it is submitted, without running it,
which is not what a client of AWS Batch ever sees. This emulator replaces that one step with a job runner:

* each submitted job goes SUBMITTED -> PENDING -> RUNNABLE -> STARTING -> RUNNING, then SUCCEEDED or FAILED from the
  real exit status of its command, run as a local process in a session of its own (the container's stand-in) with
  the job's environment: the job definition's variables, overridden by the job's ``containerOverrides``, plus the
  ``AWS_BATCH_*`` variables AWS Batch sets;
* the states, ``statusReason``, ``startedAt``/``stoppedAt`` and the attempt's ``container.exitCode``, ``reason`` and
  ``logStreamName`` read as AWS Batch reports them; the process's output goes to CloudWatch Logs (group
  ``/aws/batch/job``, stream ``<job definition>/default/<task id>``);
* images are emulated: ``--image NAME`` names an image the runner "has" (its processes get ``python`` from this
  interpreter's directory and ``--pythonpath``); any other image fails the job the way a failed pull does, and a
  command that does not exist fails it the way a container that cannot start does;
* TerminateJob (and CancelJob before a job starts) stops the process as ECS stops a task: SIGTERM to the session,
  SIGKILL after ``--stop-timeout`` seconds; the job ends FAILED with the reason given;
* at most ``--slots`` jobs run at once; the rest wait in RUNNABLE, as on a full compute environment.

Every job's process is recorded in ``DIR/runs.jsonl`` (job id, pid, exit code, the signal sent), so tests can check
what happened to it. SIGTERM stops the emulator and every process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3

logger = logging.getLogger("aws_batch_emulator")

REGION = "us-east-1"
LOG_GROUP = "/aws/batch/job"
#: Seconds between two observable state changes of a job, and between checks of a running one.
TICK = 0.02
#: Lines of a job's output kept in CloudWatch Logs.
MAX_LOG_LINES = 1000


class Runner:
    """Takes the jobs moto accepts through their states and runs their commands as local processes."""

    def __init__(self, endpoint: str, state_dir: Path, images: set[str], pythonpath: str, slots: int, stop: float):
        self.state_dir = state_dir
        self.images = images
        self.image_env = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
            "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1",
            "HOME": str(state_dir),
            "LANG": "C.UTF-8",
        }
        self.stop_timeout = stop
        self.slots = threading.Semaphore(slots)
        self.logs = boto3.session.Session().client("logs", endpoint_url=endpoint, region_name=REGION)
        self._lock = threading.Lock()
        self._running: dict[str, subprocess.Popen[bytes]] = {}
        with contextlib.suppress(Exception):  # already there
            self.logs.create_log_group(logGroupName=LOG_GROUP)

    def accept(self, job: Any) -> None:
        """Called by moto for a job it created: run it on a thread of its own."""
        threading.Thread(target=self._run, args=(job,), name=f"job-{job.job_id}", daemon=True).start()

    def shutdown(self) -> None:
        with self._lock:
            processes = list(self._running.values())
        for process in processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

    # -- one job ----------------------------------------------------------------------------------------------------

    def _run(self, job: Any) -> None:
        try:
            for state in ("PENDING", "RUNNABLE"):
                time.sleep(TICK)
                job.status = state
            while not job.stop:
                if self.slots.acquire(timeout=TICK):
                    try:
                        self._start(job)
                    finally:
                        self.slots.release()
                    return
            self._finish(job, "FAILED", job.job_stopped_reason)  # cancelled or terminated before it started
        except Exception as exc:
            logger.exception("job %s: emulator failure", job.job_id)
            self._finish(job, "FAILED", f"emulator failure: {exc!r}")

    def _start(self, job: Any) -> None:
        if job.stop:
            self._finish(job, "FAILED", job.job_stopped_reason)
            return
        job.status = "STARTING"
        time.sleep(TICK)
        properties = job.job_definition.container_properties or {}
        task_id = uuid.uuid4().hex
        image = str(properties.get("image", ""))
        if image not in self.images:
            reason = f"CannotPullContainerError: pull image manifest has been retried 5 time(s): {image}: not found"
            self._finish(job, "FAILED", "Task failed to start", container={"reason": reason}, task_id=task_id)
            return
        command = _substitute(list(job.container_overrides.get("command") or properties.get("command") or []), job)
        env = {**self.image_env, **_environment(job)}
        output = self.state_dir / f"{job.job_id}.out"
        try:
            with output.open("wb") as out:
                process = subprocess.Popen(
                    command,
                    env=env,
                    cwd=self.state_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except (OSError, IndexError) as exc:  # no such executable, not executable, empty command
            name = command[0] if command else ""
            reason = f"CannotStartContainerError: exec: {name!r}: {type(exc).__name__}: {exc}"
            self._finish(job, "FAILED", "Task failed to start", container={"reason": reason}, task_id=task_id)
            return
        job.log_stream_name = f"{job.job_definition.name}/default/{task_id}"
        job.job_started_at = datetime.now()
        job.status = "RUNNING"
        with self._lock:
            self._running[job.job_id] = process
        self._record({"event": "started", "jobId": job.job_id, "jobName": job.job_name, "pid": process.pid})
        signalled = self._wait(job, process)
        with self._lock:
            self._running.pop(job.job_id, None)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the container is gone: so is whatever it left running
        code = process.returncode if process.returncode >= 0 else 128 - process.returncode
        self._record({"event": "ended", "jobId": job.job_id, "pid": process.pid, "exitCode": code, "signal": signalled})
        self._upload(job.log_stream_name, output)
        container = {"exitCode": code, "logStreamName": job.log_stream_name}
        if job.stop:
            self._finish(job, "FAILED", job.job_stopped_reason, container=container, task_id=task_id)
        else:
            status = "SUCCEEDED" if code == 0 else "FAILED"
            self._finish(job, status, "Essential container in task exited", container=container, task_id=task_id)

    def _wait(self, job: Any, process: subprocess.Popen[bytes]) -> str | None:
        """Wait for the process; stop it as ECS would when the job is terminated or runs past its timeout."""
        limit = (job.timeout or job.job_definition.timeout or {}).get("attemptDurationSeconds")
        deadline = time.monotonic() + limit if limit else None
        signalled: str | None = None
        kill_at = 0.0
        while process.poll() is None:
            if deadline is not None and time.monotonic() > deadline and not job.stop:
                job.terminate("Job attempt duration exceeded timeout")
            if job.stop and signalled is None:
                signalled, kill_at = "SIGTERM", time.monotonic() + self.stop_timeout
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGTERM)
            elif signalled == "SIGTERM" and time.monotonic() > kill_at:
                signalled = "SIGKILL"
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
            time.sleep(TICK)
        return signalled

    def _finish(
        self,
        job: Any,
        status: str,
        reason: str | None,
        *,
        container: dict[str, Any] | None = None,
        task_id: str | None = None,
    ) -> None:
        """End the job as AWS Batch reports it: times and reason first, then the status clients poll for."""
        now = datetime.now()
        job.job_stopped_reason = reason
        job.job_stopped_at = now
        job.job_stopped = True
        if container is not None:
            started = job.job_started_at if job.log_stream_name else now
            attempt_container = {"taskArn": f"arn:aws:ecs:{REGION}:123456789012:task/emulated/{task_id}", **container}
            job.exit_code = container.get("exitCode")
            job.attempts.append(
                {
                    "container": attempt_container,
                    "startedAt": int(started.timestamp() * 1000),
                    "stoppedAt": int(now.timestamp() * 1000),
                    "statusReason": reason,
                }
            )
        job.status = status

    # -- records and logs -------------------------------------------------------------------------------------------

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock, (self.state_dir / "runs.jsonl").open("a") as out:
            out.write(json.dumps(entry) + "\n")

    def _upload(self, stream: str, output: Path) -> None:
        lines = output.read_text(errors="replace").splitlines()[-MAX_LOG_LINES:]
        now = int(time.time() * 1000)
        try:
            self.logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
            events = [{"timestamp": now, "message": line} for line in lines if line.strip()]
            if events:
                self.logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream, logEvents=events)
        except Exception:
            logger.exception("could not store the output of %s", stream)


def _environment(job: Any) -> dict[str, str]:
    """The job definition's variables, then the job's overrides, then what AWS Batch adds."""
    properties = job.job_definition.container_properties or {}
    env = {item["name"]: item["value"] for item in properties.get("environment") or []}
    env.update({item["name"]: item["value"] for item in job.container_overrides.get("environment") or []})
    env.update(
        {
            "AWS_BATCH_JOB_ID": job.job_id,
            "AWS_BATCH_JOB_ATTEMPT": "1",
            "AWS_BATCH_JQ_NAME": job.job_queue.name,
            "AWS_BATCH_CE_NAME": "emulated",
        }
    )
    return env


def _substitute(command: list[str], job: Any) -> list[str]:
    """Replace ``Ref::name`` placeholders with the job's parameters, as AWS Batch does."""
    parameters: dict[str, str] = job.parameters or {}
    return [parameters.get(part[5:], part) if part.startswith("Ref::") else part for part in command]


def install(runner: Runner) -> None:
    """Hand every job moto's no-Docker backend creates to ``runner`` instead of marking it SUCCEEDED."""
    from moto.batch.exceptions import ClientException
    from moto.batch.models import JOB_NAME_REGEX
    from moto.batch_simple.models import BatchSimpleBackend

    def take(backend: Any, include_start_attempt: bool, job: Any) -> None:
        if JOB_NAME_REGEX.match(job.job_name) is None:  # what AWS (and moto's Docker mode) refuses
            job.job_queue.jobs.remove(job)
            raise ClientException("Job name should match valid pattern")
        backend.backend._jobs[job.job_id] = job
        if include_start_attempt:  # an array job's parent only tracks its children
            runner.accept(job)

    BatchSimpleBackend._mark_job_as_finished = take  # type: ignore[method-assign]


def _post(endpoint: str, path: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        endpoint + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--image", action="append", default=[], help="an image the runner has (repeatable)")
    parser.add_argument("--pythonpath", default="", help="PYTHONPATH of the emulated image")
    parser.add_argument("--slots", type=int, default=8, help="jobs running at once")
    parser.add_argument("--stop-timeout", type=float, default=5.0, help="seconds from SIGTERM to SIGKILL")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=options.port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{options.port}"
    _post(endpoint, "/moto-api/config", {"batch": {"use_docker": False}})
    # The runner sets every state itself: moto must never advance a job on its own.
    _post(
        endpoint,
        "/moto-api/state-manager/set-transition",
        {"model_name": "batch::job", "transition": {"progression": "manual", "times": 1_000_000_000}},
    )
    options.state_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(
        endpoint, options.state_dir, set(options.image), options.pythonpath, options.slots, options.stop_timeout
    )
    install(runner)

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    print(f"emulated AWS Batch ready at {endpoint}", flush=True)
    stopped.wait()
    runner.shutdown()
    server.stop()


if __name__ == "__main__":
    main()
