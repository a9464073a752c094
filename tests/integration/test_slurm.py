"""The ``slurm`` backend against a real single-node Slurm cluster (slurmctld, slurmd, munged; ``slurm_cluster``).

Every run is a real batch job: ``sbatch`` gets the script, slurmd starts ``python -m wove.backend_worker`` on this
host, and the worker posts back to the weave's callback server. Jobs import ``tests.integration.*`` task functions
through ``PYTHONPATH`` (set with the adapter's ``env``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import wove
from tests.integration.queue_support import ROOT, await_for, gone, run_doc_example, wait_for
from tests.integration.remote_tasks import add, hold
from tests.integration.scenarios import BackendScenarios, Engine, release, run_held, started
from tests.services.slurm import SlurmCluster
from wove import weave
from wove.errors import BackendUnavailableError, DeliveryLostError, RunCancelledError, SubmitError
from wove.integrations import get_adapter_class
from wove.integrations.slurm import SlurmAdapter, SlurmJob
from wove.result import RunRecord

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

#: Far beyond any test's duration: a run that waited for it would fail the test by pytest's timeout instead.
NEVER = 600.0


class SlurmEngine(Engine):
    """The cluster as the shared scenarios see it: jobs, their states, and the batch scripts Slurm keeps."""

    lost_message = r"ended FAILED \(reason \w+, signal 9 \(SIGKILL\)\) without an outcome from its worker"

    def __init__(self, cluster: SlurmCluster, output_dir: Path) -> None:
        self.cluster, self.output_dir = cluster, output_dir

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"output_dir": str(self.output_dir), "env": {"PYTHONPATH": str(ROOT)}, **extra}

    def configure(self, **settings: Any) -> None:
        config = self.config(**settings.pop("executor_config", {}))
        wove.config(environments={"default": {}, "jobs": {"executor": "slurm", "executor_config": config, **settings}})

    def ended(self, job_id: str, state: str) -> None:
        wait_for(lambda: self.cluster.state(job_id) == state, 20, f"Slurm shows job {job_id} {state}")

    def check_ran(self, record: RunRecord, pid: int) -> None:
        job_id = str(record.submission)  # the run's submission is its Slurm job id
        self.ended(job_id, "COMPLETED")
        name, _ = self.cluster.jobs()[job_id]
        assert name == f"wove-remote-{record.run_id}"
        assert (self.output_dir / f"{name}.out").exists()

    def check_mapped(self, records: list[RunRecord], pids: set[int]) -> None:
        job_ids = {str(r.submission) for r in records}
        assert len(job_ids) == len(records) == len(pids)  # one job, and one process, per run
        for job_id in job_ids:
            self.ended(job_id, "COMPLETED")

    def check_failed(self, record: RunRecord) -> None:
        job_id = str(record.submission)
        self.ended(job_id, "FAILED")  # the worker exits 1 after delivering the task's exception
        name, _ = self.cluster.jobs()[job_id]
        assert "InventoryError: sku-9 is out of stock" in (self.output_dir / f"{name}.out").read_text()

    def check_started(self, pids: list[int]) -> None:
        for pid in pids:  # each task runs in a job slurmd started
            assert "SLURM_JOB_ID=" in Path(f"/proc/{pid}/environ").read_text(errors="replace")

    async def saw_cancel(self, records: list[RunRecord], pids: list[int]) -> None:
        job_ids = [str(record.submission) for record in records]

        def cancelled() -> bool:
            return {self.cluster.state(job_id) for job_id in job_ids} == {"CANCELLED"}

        await await_for(cancelled, 20, f"Slurm shows jobs {job_ids} CANCELLED")
        await await_for(lambda: all(gone(pid) for pid in pids), 20, f"workers {pids} ended")

    async def after_loss(self, folder: Path) -> None:
        states = {state for name, state in self.cluster.jobs().values() if name.startswith("wove-hold-")}
        assert "FAILED" in states

    async def carried_while_running(self, carried: list[int]) -> None:
        jobs = self.cluster.jobs().items()
        (job_id,) = [i for i, (name, state) in jobs if name.startswith("wove-tail-") and state == "RUNNING"]
        carried.append(len(self.cluster.command("scontrol", "write", "batch_script", job_id, "-")))


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slurm-output")


@pytest.fixture
def engine(slurm_cluster: SlurmCluster, output_dir: Path) -> SlurmEngine:
    """The ``jobs`` environment on the cluster."""
    engine = SlurmEngine(slurm_cluster, output_dir)
    engine.configure()
    return engine


@pytest.fixture
def victim(engine: SlurmEngine) -> SlurmEngine:
    """A killed worker ends its job FAILED; the adapter's squeue poll reports it (no heartbeat is configured)."""
    return engine


class TestScenarios(BackendScenarios):
    """The shared scenarios on Slurm."""


# -- jobs that end without the worker's outcome ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["output_dir", "slurm default"])
def test_a_job_failing_before_the_worker_runs_carries_slurms_reason(
    engine: SlurmEngine, tmp_path: Path, where: str
) -> None:
    """A bad interpreter: the job fails at once and the error quotes Slurm and the job's output, long before
    ``delivery_timeout``. Without ``output_dir`` the output file is the one ``scontrol`` names (``slurm-<id>.out``)."""
    config: dict[str, Any] = {"python": "/nonexistent/python3"}
    if where == "slurm default":
        config.update(output_dir=None, sbatch_options={"chdir": str(tmp_path)})
    engine.configure(executor_config=config, delivery_timeout=NEVER)
    with pytest.raises(DeliveryLostError) as info, weave() as w:

        @w.do(environment="jobs")
        def doomed() -> int:
            return 1

    message = str(info.value)
    assert "ended FAILED (reason NonZeroExitCode, exit code 127) without an outcome from its worker" in message
    assert "/nonexistent/python3: not found" in message  # the tail of the job's output
    (record,) = w.result.records["doomed"]
    assert record.status == "failed" and engine.cluster.state(str(record.submission)) == "FAILED"
    if where == "slurm default":
        assert str(tmp_path / f"slurm-{record.submission}.out") in message


def test_a_job_completing_without_an_outcome_ends_the_run(engine: SlurmEngine) -> None:
    """``true`` instead of Python: the job COMPLETES with exit code 0, but no worker ever reported."""
    engine.configure(executor_config={"python": "true"}, delivery_timeout=NEVER)
    with pytest.raises(DeliveryLostError, match=r"ended COMPLETED \(exit code 0\) without an outcome"), weave() as w:

        @w.do(environment="jobs")
        def hollow() -> int:
            return 1


async def test_a_job_cancelled_by_an_operator_ends_the_run(engine: SlurmEngine) -> None:
    engine.configure(executor_config={"sbatch_options": {"hold": True}}, delivery_timeout=NEVER)

    async def run() -> None:
        async with weave() as w:

            @w.do(environment="jobs")
            def held() -> int:
                return 1

    running = asyncio.ensure_future(run())
    try:
        await await_for(lambda: held_jobs(engine.cluster), 20, "the job is pending, held")
        (job_id,) = held_jobs(engine.cluster)
        engine.cluster.command("scancel", job_id)
        with pytest.raises(RunCancelledError, match=r"ended CANCELLED \(reason JobHeldUser"):
            await asyncio.wait_for(running, 30)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_running_job_cancelled_by_an_operator_ends_the_run(engine: SlurmEngine, tmp_path: Path) -> None:
    """The worker turns Slurm's SIGTERM into ``task_cancelled``: the weave hears it from the worker itself."""
    engine.configure(delivery_timeout=NEVER)
    running = asyncio.ensure_future(run_held(tmp_path, hold, 1, []))
    try:
        (pid,) = await started(tmp_path, 1)
        job_id = Path(f"/proc/{pid}/environ").read_text().split("SLURM_JOB_ID=")[1].split("\0")[0]
        engine.cluster.command("scancel", job_id)
        with pytest.raises(RunCancelledError, match="the backend cancelled run"):
            await asyncio.wait_for(running, 30)
        engine.ended(job_id, "CANCELLED")
    finally:
        await release(tmp_path, running)
    assert not (tmp_path / "finished-0").exists()


def held_jobs(cluster: SlurmCluster) -> list[str]:
    return [i for i, (name, state) in cluster.jobs().items() if name.startswith("wove-held-") and state == "PENDING"]


# -- what the job is made of -------------------------------------------------------------------------------------------


def test_options_environment_setup_and_names_reach_the_job(
    engine: SlurmEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUBMITTER_ONLY", "secret")  # --export=NONE keeps it out of the job
    engine.configure(
        executor_config={
            "sbatch_options": {"time": "5", "comment": "wove-test", "partition": "debug", "export": "NONE"},
            "env": {"PYTHONPATH": str(ROOT), "GREETING": "it's a 'quoted' $value"},
            "setup": ["export SETUP_RAN=yes"],
            "job_name_prefix": "site.wove",
        }
    )
    with weave() as w:

        @w.do(environment="jobs")
        def a_task_whose_name_is_far_longer_than_any_job_name_part_should_be() -> tuple[str | None, ...]:
            env = os.environ
            return env.get("GREETING"), env.get("SETUP_RAN"), env.get("SLURM_JOB_ID"), env.get("SUBMITTER_ONLY")

    (record,) = w.result.records["a_task_whose_name_is_far_longer_than_any_job_name_part_should_be"]
    job_id = str(record.submission)
    assert w.result.final == ("it's a 'quoted' $value", "yes", job_id, None)
    fields = engine.cluster.job_fields(job_id)
    assert fields["TimeLimit"] == "00:05:00" and fields["Comment"] == "wove-test" and fields["Partition"] == "debug"
    assert fields["JobName"] == f"site.wove-a_task_whose_name_is_far_longer_than_any_job_nam-{record.run_id}"


async def test_a_payload_too_big_for_an_environment_variable_goes_through_the_script(
    engine: SlurmEngine, tmp_path: Path
) -> None:
    """With references off, a 300 kB argument travels inside the batch script, fed to the worker's stdin."""
    engine.configure(executor_config={"inline_payload_limit": None})
    blob = os.urandom(300 * 1024)
    carried: list[int] = []

    async def run() -> Any:
        async with weave(blob=blob, folder=str(tmp_path)) as w:
            from tests.integration.remote_tasks import tail

            w.do(environment="jobs")(tail)
        return w

    running = asyncio.ensure_future(run())
    try:
        await started(tmp_path, 1)
        await engine.carried_while_running(carried)
    finally:
        await release(tmp_path)
    w = await asyncio.wait_for(running, 30)
    assert w.result.tail == (len(blob), blob[-16:])
    assert carried[0] > len(blob)  # the whole argument was in the job description


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_custom_submit_callable_submits_the_job(engine: SlurmEngine, kind: str) -> None:
    seen: list[SlurmJob] = []

    def submit(job: SlurmJob) -> str:  # a site's wrapper: here, sbatch with one more option
        seen.append(job)
        argv = [*job.argv, "--comment=site-wrapper"]
        return subprocess.run(argv, input=job.script, capture_output=True, text=True, check=True).stdout

    async def submit_async(job: SlurmJob) -> str:
        return await asyncio.to_thread(submit, job)

    engine.configure(executor_config={"submit": submit if kind == "sync" else submit_async})
    with weave() as w:

        @w.do(environment="jobs")
        def total() -> int:
            return add(2, 3)

    assert w.result.total == 5
    (job,) = seen
    (record,) = w.result.records["total"]
    assert job.run_id == record.run_id and job.task_name == "total" and job.name == f"wove-total-{record.run_id}"
    assert job.argv[:2] == ("sbatch", "--parsable") and f"--job-name={job.name}" in job.options
    assert "WOVE_BACKEND_PAYLOAD=" in job.script
    assert engine.cluster.job_fields(str(record.submission))["Comment"] == "site-wrapper"


# -- errors before any job runs ----------------------------------------------------------------------------------------


def refuse(job: SlurmJob) -> str:
    raise PermissionError("site policy: no jobs today")


@pytest.mark.parametrize(
    ("submit", "match"),
    [
        (lambda job: "Submitted batch job 5", r"the submit callable returned no job id: expected a Slurm job id"),
        (refuse, r"the submit callable failed: PermissionError: site policy: no jobs today"),
    ],
)
def test_a_failing_custom_submit_is_a_submit_error(engine: SlurmEngine, submit: Any, match: str) -> None:
    engine.configure(executor_config={"submit": submit})
    with pytest.raises(SubmitError, match=match), weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1


def test_a_job_sbatch_refuses_is_a_submit_error(engine: SlurmEngine) -> None:
    engine.configure(executor_config={"sbatch_options": {"partition": "no-such-partition"}})
    with pytest.raises(SubmitError, match="sbatch refused the job .*invalid partition"), weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1


def test_missing_slurm_commands_are_reported_at_start(engine: SlurmEngine) -> None:
    engine.configure(executor_config={"sbatch": "/nonexistent/sbatch"})
    with pytest.raises(BackendUnavailableError, match=r"/nonexistent/sbatch not found on PATH"), weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1


def test_registered_under_its_name() -> None:
    assert get_adapter_class("slurm") is SlurmAdapter


def test_docs_example_runs(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    env = {"SLURM_CONF": str(slurm_cluster.conf)}
    done = run_doc_example(ROOT / "docs" / "backends" / "slurm.md", "wove.config", env, tmp_path)
    assert "total 15.0 priced by jobs" in done.stdout and "succeeded" in done.stdout


@pytest.fixture(autouse=True)
def _no_stray_output(slurm_cluster: SlurmCluster) -> Iterator[None]:
    """Jobs write their output where the tests say, never into the repository."""
    before = set(ROOT.glob("slurm-*.out"))
    yield
    assert set(ROOT.glob("slurm-*.out")) == before
