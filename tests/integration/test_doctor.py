"""``wove doctor`` and ``wove worker`` against real backends: the process pool, and Celery and RQ on a real Redis with
real workers that ``wove worker celery`` and ``wove worker rq`` started.

Each doctor run goes through ``wove.cli.main`` with a ``wove_config.py`` of the test's own, as an operator would run
``wove doctor --config ...``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celery  # noqa: F401  # a missing Celery fails this module, in CI and locally
import pytest

import wove
from tests.integration.queue_support import ROOT, WorkerProcess, python_command, start_worker, wait_for
from tests.integration.remote_tasks import add
from tests.services.base import free_port
from tests.services.redis import RedisServer
from tests.services.slurm import SlurmCluster
from wove import weave
from wove.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: Redis databases of this module: Celery's broker, RQ's queues.
CELERY_DB, RQ_DB = 13, 14
#: What the doctor waits for a ping; a passing ping takes milliseconds, a failing one all of it.
TIMEOUT = 3.0


def write_config(folder: Path, environments: dict[str, Any]) -> Path:
    path = folder / "wove_config.py"
    path.write_text(f"WOVE_CONFIG = {{'environments': {{'default': {{}}, **{environments!r}}}}}\n")
    return path


def doctor(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str]:
    status = main(["doctor", "--config", str(config), "--timeout", str(TIMEOUT), *args])  # a later --timeout wins
    out, _ = capsys.readouterr()
    return status, out


def lines(out: str, environment: str) -> dict[str, tuple[str, str]]:
    """One environment's check lines, by check name: ``{"ping": ("ok", "worker ..."), "ping.fix": ("", "...")}``."""
    block = out.split(f"environment {environment!r}", 1)[1].split("\n\n", 1)[0]
    found: dict[str, tuple[str, str]] = {}
    for line in block.splitlines()[1:]:
        match = re.match(r"  (ok|FAIL|skip) +(\w+) +(.*)$", line)
        if match:
            found[match.group(2)] = (match.group(1), match.group(3))
        else:
            fix = re.match(r" +fix: (.*)$", line)
            assert fix is not None, line
            found[f"{list(found)[-1]}.fix"] = ("", fix.group(1))
    return found


@pytest.fixture(autouse=True)
def _own_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The doctor puts the configuration's folder on ``sys.path``; keep that from leaking into other tests."""
    import sys

    monkeypatch.setattr(sys, "path", [*sys.path])


# -- the process backend --------------------------------------------------------------------------------------------


def test_doctor_passes_on_the_process_backend(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write_config(tmp_path, {"heavy": {"executor": "process", "executor_config": {"max_workers": 1}}})
    status, out = doctor(capsys, config)
    assert status == 0, out
    checks = lines(out, "heavy")
    assert list(checks) == ["installed", "backend", "callback", "submit", "ping", "versions"]
    assert all(status == "ok" for status, _ in checks.values())
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+ answers from a worker process", checks["callback"][1])
    assert re.match(r"worker \S+:\d+ ran it and its events reached http://127\.0\.0\.1:\d+", checks["ping"][1])
    assert out.rstrip().endswith("ok: 2 environment(s) checked")


def test_doctor_finds_a_callback_url_the_process_workers_cannot_reach(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    environment = {"executor": "process", "executor_config": {"max_workers": 1, "callback_url": dead}}
    status, out = doctor(capsys, write_config(tmp_path, {"heavy": environment}), "--environment", "heavy")
    assert status == 1
    checks = lines(out, "heavy")
    status_, detail = checks["callback"]
    assert status_ == "FAIL" and detail.startswith(f"{dead} does not answer from a worker process: ")
    assert "remove executor_config['callback_url']" in checks["callback.fix"][1]
    status_, detail = checks["ping"]
    assert status_ == "FAIL" and detail.startswith(f"no event from a worker within {TIMEOUT:g}s")
    assert f"so workers cannot reach {dead}" in detail
    assert "'default'" not in out  # --environment checks that one only


# -- Celery ---------------------------------------------------------------------------------------------------------


class CeleryWorker:
    def __init__(self, process: WorkerProcess, broker: str, queue: str) -> None:
        self.process, self.broker, self.queue = process, broker, queue

    def environment(self, **executor_config: Any) -> dict[str, Any]:
        return {
            "executor": "celery",
            "executor_config": {"broker_url": self.broker, "queue": self.queue, **executor_config},
        }


@pytest.fixture(scope="module")
def worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    """A Celery worker started the documented way: ``wove worker celery --broker ... --queue ...``, with options of
    Celery's own after ``--``."""
    broker, queue = redis_server.url(CELERY_DB), f"wove-doctor-{uuid.uuid4().hex[:6]}"
    command = python_command("wove", "worker", "celery", "--broker", broker, "--queue", queue, "--")
    command += ["-P", "prefork", "-c", "1", "-n", f"{queue}@%h", "--loglevel=INFO"]
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    log = tmp_path_factory.mktemp("celery") / "worker.log"
    process = start_worker(command, log, {}, " ready.", "wove worker celery")
    yield CeleryWorker(process, broker, queue)
    process.stop()


def test_wove_worker_celery_starts_a_worker_that_runs_wove_tasks(worker: CeleryWorker) -> None:
    log = worker.process.output()
    assert f".> {worker.queue} exchange=" in log and "\n  . wove.run_payload\n" in log  # -Q from --queue; wove's task
    wove.config(environments={"default": {}, "jobs": {**worker.environment(), "delivery_timeout": 30}})
    with weave() as w:

        @w.do(environment="jobs")
        def total() -> int:
            return add(2, 3)

    assert w.result.total == 5
    (record,) = w.result.records["total"]
    assert record.pid in worker.process.children()  # the worker the command started (exec kept its pid) ran it
    assert record.submission == record.run_id  # Celery's task id


def test_doctor_passes_on_celery_with_a_worker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, worker: CeleryWorker
) -> None:
    config = write_config(tmp_path, {"jobs": worker.environment()})
    status, out = doctor(capsys, config, "--environment", "jobs", "--json")
    assert status == 0, out
    report = json.loads(out)
    assert report["ok"] is True and report["config"] == str(config)
    (env,) = report["environments"]
    assert env["name"] == "jobs" and env["executor"] == "celery"
    assert env["callback_url"].startswith("http://127.0.0.1:")
    statuses = {check["name"]: check["status"] for check in env["checks"]}
    assert statuses == dict.fromkeys(("installed", "backend", "callback", "submit", "ping", "versions"), "ok")
    ping = next(check for check in env["checks"] if check["name"] == "ping")
    pid = int(re.search(r"worker \S+:(\d+) ran it", ping["detail"]).group(1))  # type: ignore[union-attr]
    assert pid in worker.process.children()
    submit = next(check for check in env["checks"] if check["name"] == "submit")
    assert re.fullmatch(r"the ping was submitted as [0-9a-f]{32}", submit["detail"])


def test_doctor_names_a_queue_no_worker_consumes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, worker: CeleryWorker
) -> None:
    environment = {"executor": "celery", "executor_config": {"broker_url": worker.broker, "queue": "nobody-here"}}
    status, out = doctor(capsys, write_config(tmp_path, {"jobs": environment}))
    assert status == 1
    checks = lines(out, "jobs")
    assert checks["submit"][0] == "ok"
    status_, detail = checks["ping"]
    assert status_ == "FAIL" and detail.startswith(f"no event from a worker within {TIMEOUT:g}s")
    assert f"Celery workers {worker.queue}@" in detail and "none consumes queue 'nobody-here'" in detail
    assert checks["ping.fix"][1] == "start a worker on the environment's queue: wove worker celery --environment jobs"
    assert out.rstrip().endswith("FAIL: 1 of 2 environment(s): jobs")


def test_doctor_finds_a_callback_url_celery_workers_cannot_reach(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, worker: CeleryWorker
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the worker's posts are refused
    config = write_config(tmp_path, {"jobs": worker.environment(callback_url=dead)})
    status, out = doctor(capsys, config, "--environment", "jobs")
    assert status == 1
    checks = lines(out, "jobs")
    status_, detail = checks["callback"]
    assert status_ == "FAIL" and detail.startswith(f"{dead} does not answer from this machine: ")
    status_, ping = checks["ping"]
    assert status_ == "FAIL"
    assert ping.startswith(f"no event from a worker within {TIMEOUT:g}s (callback URL in use: {dead})")
    assert f"Celery worker {worker.queue}@" in ping and "holds the ping (active)" in ping
    assert f"so workers cannot reach {dead}" in ping
    fix = checks["ping.fix"][1]
    assert fix.startswith(f"workers could not reach {dead}: set executor_config['callback_url'] to an address")
    assert "executor_config['callback_host'] = '0.0.0.0'" in fix


def test_doctor_json_report_of_a_failure(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    environment = {"executor": "celery", "executor_config": {"broker_url": f"redis://127.0.0.1:{free_port()}/0"}}
    status, out = doctor(capsys, write_config(tmp_path, {"jobs": environment}), "--json")
    assert status == 1
    report = json.loads(out)
    assert report["ok"] is False
    jobs = next(env for env in report["environments"] if env["name"] == "jobs")
    default = next(env for env in report["environments"] if env["name"] == "default")
    assert default["ok"] is True and jobs["ok"] is False
    backend = next(check for check in jobs["checks"] if check["name"] == "backend")
    assert backend["status"] == "FAIL" and backend["ok"] is False
    assert "BackendUnavailableError" in backend["detail"] and backend["fix"]
    assert [check["status"] for check in jobs["checks"]] == ["ok", "FAIL", "skip", "skip", "skip"]


# -- RQ -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rq_worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``wove worker rq`` (RQ's SimpleWorker on the queue); a worker that cannot post gives up after 3 s, not 120."""
    url, queue = redis_server.url(RQ_DB), f"wove-doctor-{uuid.uuid4().hex[:6]}"
    command = python_command("wove", "worker", "rq", "--url", url, "--queue", queue, "--", "-n", queue)
    log = tmp_path_factory.mktemp("rq") / "worker.log"
    process = start_worker(command, log, {"WOVE_POST_DEADLINE": "3"}, "Listening on", "wove worker rq")
    yield url, queue
    process.stop()


def rq_environment(url: str, queue: str, **executor_config: Any) -> dict[str, Any]:
    return {"executor": "rq", "executor_config": {"redis_url": url, "queue_name": queue, **executor_config}}


def test_doctor_passes_on_rq_with_a_worker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, rq_worker: tuple[str, str]
) -> None:
    status, out = doctor(capsys, write_config(tmp_path, {"jobs": rq_environment(*rq_worker)}), "--environment", "jobs")
    assert status == 0, out
    assert all(status_ == "ok" for status_, _ in lines(out, "jobs").values())


def test_doctor_sees_an_rq_job_no_worker_took(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, rq_worker: tuple[str, str]
) -> None:
    url, _ = rq_worker
    status, out = doctor(capsys, write_config(tmp_path, {"jobs": rq_environment(url, "nobody-here")}))
    assert status == 1
    checks = lines(out, "jobs")
    assert checks["ping"][0] == "FAIL"
    assert "the job is still queued and no RQ worker listens on queue 'nobody-here'" in checks["ping"][1]
    assert checks["ping.fix"][1] == "start a worker on the environment's queue: wove worker rq --environment jobs"


def test_doctor_sees_an_rq_worker_that_cannot_post(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, rq_worker: tuple[str, str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path, {"jobs": rq_environment(*rq_worker, callback_url=dead)})
    status, out = doctor(capsys, config, "--environment", "jobs")
    assert status == 1
    status_, ping = lines(out, "jobs")["ping"]
    assert status_ == "FAIL" and "an RQ worker took the job (status: started)" in ping
    assert f"so workers cannot reach {dead}" in ping


# -- Slurm ----------------------------------------------------------------------------------------------------------


def test_doctor_passes_on_slurm(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, slurm_cluster: SlurmCluster
) -> None:
    """The ping is a real batch job: sbatch, slurmd starting ``python -m wove.backend_worker``, events back."""
    environment = {
        "executor": "slurm",
        "executor_config": {"output_dir": str(tmp_path), "env": {"PYTHONPATH": str(ROOT)}},
    }
    status, out = doctor(
        capsys, write_config(tmp_path, {"hpc": environment}), "--environment", "hpc", "--timeout", "30"
    )
    assert status == 0, out
    checks = lines(out, "hpc")
    assert all(status_ == "ok" for status_, _ in checks.values())
    job_id = re.fullmatch(r"the ping was submitted as (\S+)", checks["submit"][1])
    assert job_id is not None
    wait_for(lambda: slurm_cluster.state(job_id.group(1)) == "COMPLETED", 20, "Slurm shows the ping's job completed")
