"""Service and fixtures for an emulated AWS Batch: moto's API server with a local job runner (no Docker, no AWS).

``tests/services/aws_batch_emulator.py`` runs in a process of its own: moto serves the AWS Batch, CloudWatch Logs and
IAM APIs on a loopback port, and its job runner executes each submitted job's command as a local process, so jobs
really run and their states come from real exit statuses. Tests and wove talk to it with the official boto3 client
over HTTP, with fake credentials. The session fixture ``aws_batch`` creates the compute environment, job queue and
job definition a wove environment needs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.services.base import ManagedProcess, free_port, port_open, wait_until

ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
#: The fake credentials moto accepts; set for the whole session so boto3's default chain finds them.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}
#: The one image the emulated compute environment has: this interpreter, with the repository on PYTHONPATH.
IMAGE = "wove-worker:emulated"
WORKER_COMMAND = ["python", "-m", "wove.backend_worker"]


def require_moto() -> None:
    """Skip without moto's server extra locally; fail in CI, where it must be installed."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        message = f"moto[server,batch] and boto3 are needed: pip install -e '.[dev,aws_batch]' ({exc})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class BatchEmulator:
    """The emulator process, plus boto3 helpers to set up queues and definitions and to look at jobs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.process: ManagedProcess | None = None

    def start(self) -> BatchEmulator:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "tests.services.aws_batch_emulator",
            "--port",
            str(self.port),
            "--state-dir",
            str(self.directory / "jobs"),
            "--image",
            IMAGE,
            "--pythonpath",
            str(ROOT),
        ]
        log = self.directory / "emulator.log"
        self.process = ManagedProcess(command, log, env=CREDENTIALS, cwd=ROOT)
        ready = "emulated AWS Batch ready"
        wait_until(lambda: ready in self.process.output() or not self.process.alive(), 60, "AWS Batch emulator", log)
        assert self.process.alive() and port_open(self.port), self.process.output()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    # -- boto3 ------------------------------------------------------------------------------------------------------

    def client(self, service: str = "batch") -> Any:
        import boto3

        return boto3.session.Session().client(service, endpoint_url=self.endpoint_url, region_name=REGION)

    def create_queue(self, name: str) -> str:
        """A compute environment and a job queue on it (moto needs the queue's ``state``); returns the queue name."""
        iam, batch = self.client("iam"), self.client("batch")
        role = iam.create_role(RoleName=f"{name}-role", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        environment = batch.create_compute_environment(
            computeEnvironmentName=f"{name}-ce", type="UNMANAGED", state="ENABLED", serviceRole=role
        )["computeEnvironmentArn"]
        batch.create_job_queue(
            jobQueueName=name,
            state="ENABLED",
            priority=1,
            computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment}],
        )
        return name

    def register(
        self,
        name: str,
        *,
        image: str = IMAGE,
        command: list[str] | None = None,
        environment: dict[str, str] | None = None,
    ) -> str:
        """Register a container job definition; returns its name."""
        self.client().register_job_definition(
            jobDefinitionName=name,
            type="container",
            containerProperties={
                "image": image,
                "command": command or WORKER_COMMAND,
                "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "512"}],
                "environment": [{"name": k, "value": v} for k, v in (environment or {}).items()],
            },
        )
        return name

    def describe(self, job_id: str) -> dict[str, Any]:
        jobs: list[dict[str, Any]] = self.client().describe_jobs(jobs=[job_id])["jobs"]
        assert len(jobs) == 1, jobs
        return jobs[0]

    def wait_for_status(self, job_id: str, *statuses: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.describe(job_id)
            if job["status"] in statuses:
                return job
            assert time.monotonic() < deadline, f"job {job_id} is {job['status']}, not {statuses}, after {timeout}s"
            time.sleep(0.05)

    def records(self, job_id: str) -> list[dict[str, Any]]:
        """What the runner recorded about the job's process: ``started`` (pid), ``ended`` (exit code, signal)."""
        path = self.directory / "jobs" / "runs.jsonl"
        if not path.exists():
            return []
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [entry for entry in entries if entry["jobId"] == job_id]


class BatchSetup:
    """The emulator with one queue and one job definition running wove's worker, ready for a wove environment."""

    def __init__(self, emulator: BatchEmulator) -> None:
        self.emulator = emulator
        suffix = uuid.uuid4().hex[:6]
        self.job_queue = emulator.create_queue(f"wove-queue-{suffix}")
        # A worker whose weave is gone gives up posting after 10 s, as in the other backends' tests.
        self.job_definition = emulator.register(f"wove-worker-{suffix}", environment={"WOVE_POST_DEADLINE": "10"})

    def config(self, **extra: Any) -> dict[str, Any]:
        """``executor_config`` for the ``aws_batch`` adapter against the emulator (fast polling for tests)."""
        return {
            "region_name": REGION,
            "endpoint_url": self.emulator.endpoint_url,
            "job_queue": self.job_queue,
            "job_definition": self.job_definition,
            "poll_interval": 0.2,
            **extra,
        }


@pytest.fixture(scope="session")
def aws_credentials() -> Iterator[dict[str, str]]:
    """Fake AWS credentials and region in the environment, restored afterwards."""
    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        yield dict(CREDENTIALS)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def batch_emulator(
    aws_credentials: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BatchEmulator]:
    """One emulated AWS Batch for the session."""
    require_moto()
    emulator = BatchEmulator(Path(tmp_path_factory.mktemp("aws-batch"))).start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def aws_batch(batch_emulator: BatchEmulator) -> BatchSetup:
    """A job queue and a job definition running ``python -m wove.backend_worker`` on the emulated AWS Batch."""
    return BatchSetup(batch_emulator)
