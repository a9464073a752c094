"""A worker killed (SIGKILL) or frozen (SIGSTOP) mid-task, on the ``process`` backend, Celery and Slurm.

What must hold: the weave learns of the loss (from the backend, or from ``delivery_heartbeat_seconds`` within twice
the interval); without a heartbeat ``delivery_timeout`` ends the wait; never a hang. Each orphan policy does what its
name says, and ``requeue`` submits a lost task again at most ``retries`` times. Each test counts what was submitted
(``run_task`` frames the runtime sent), started (task bodies that began), resolved, lost and duplicated, and records
how long the weave took to learn of the loss; the times go into docs/reliability.md, and the asserts on them are
only hang guards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

import wove
from tests.integration.queue_support import ROOT, WorkerProcess, kill_group
from tests.reliability.support import (
    HANG_GUARD,
    NEVER,
    SentFrames,
    eventually,
    pid_gone,
    record,
    revoked_on_workers,
    start_celery,
    unique_queue,
)
from tests.reliability.tasks import die_first, finishes, freeze_first, hold, starts
from tests.services.redis import RedisServer
from tests.services.slurm import SlurmCluster
from wove import weave
from wove.errors import DeliveryLostError, DeliveryTimeoutError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: Heartbeat windows: the process pool's workers are local and quick; Celery's and Slurm's go through more layers.
PROCESS_HEARTBEAT = 1.0
CELERY_HEARTBEAT = 2.0
SLURM_HEARTBEAT = 2.0
#: Redis database of this module's Celery workers (the integration tests use others).
CELERY_DB = 10


def configure(executor: str, executor_config: dict[str, Any], **settings: Any) -> None:
    """The ``jobs`` environment on ``executor``, with delivery settings such as ``delivery_heartbeat_seconds``."""
    jobs = {"executor": executor, "executor_config": executor_config, **settings}
    wove.config(environments={"default": {"executor": "local"}, "jobs": jobs})


def process_config() -> dict[str, Any]:
    return {"max_workers": 2}


class Running:
    """A weave running one remote task in the background; ``records`` are its runs' records once it ended."""

    def __init__(self, task: Callable[..., Any], folder: Path, **inputs: Any) -> None:
        self.task, self.folder = task, folder
        self.weaves: list[Any] = []
        self.future = asyncio.ensure_future(self._run(inputs))

    async def _run(self, inputs: dict[str, Any]) -> Any:
        async with weave(folder=str(self.folder), **inputs) as w:
            self.weaves.append(w)
            w.do(environment="jobs")(self.task)
        return w.result[self.task.__name__]

    @property
    def records(self) -> list[Any]:
        return list(self.weaves[0].result.records[self.task.__name__])

    async def started(self, count: int = 1) -> list[int]:
        """The pids of the first ``count`` starts, once they happened."""
        await eventually(lambda: len(starts(self.folder)) >= count, f"{count} start(s) of {self.task.__name__}")
        return starts(self.folder)[:count]

    async def outcome(self, timeout: float = HANG_GUARD) -> tuple[Any, BaseException | None, float]:
        """(value, error, seconds until the weave ended) with a hang guard."""
        began = time.monotonic()
        await asyncio.wait([self.future], timeout=timeout)
        seconds = time.monotonic() - began
        if not self.future.done():
            raise AssertionError(f"the weave still waits after {timeout}s: a hang")
        error = self.future.exception()
        return (None, error, seconds) if error is not None else (self.future.result(), None, seconds)

    async def close(self) -> None:
        (self.folder / "release").touch()
        if not self.future.done():
            self.future.cancel()
        await asyncio.gather(self.future, return_exceptions=True)


def counts(sent: SentFrames, task: str, folder: Path, error: BaseException | None) -> dict[str, Any]:
    """What the scenario's record says about its runs."""
    started, finished = starts(folder), finishes(folder)
    return {
        "submitted": sent.submissions(task),
        "started": len(started),
        "finished": len(finished),
        "resolved": 1,
        "lost": int(isinstance(error, DeliveryLostError)),
        "duplicated": max(0, len(finished) - 1),
        "cancels_sent": sent.cancels,
    }


# == the process backend ===============================================================================================


@pytest.mark.parametrize("heartbeat", [PROCESS_HEARTBEAT, None], ids=["heartbeat", "no-heartbeat"])
async def test_process_worker_sigkilled_mid_task(sent: SentFrames, tmp_path: Path, heartbeat: float | None) -> None:
    """The pool sees its worker's pipe close and reports the loss at once, heartbeat or not; ``delivery_timeout``
    (here far away) never has to end the wait."""
    configure("process", process_config(), delivery_heartbeat_seconds=heartbeat, delivery_timeout=NEVER)
    running = Running(hold, tmp_path)
    try:
        (pid,) = await running.started()
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _, error, _ = await running.outcome()
        learned = time.monotonic() - killed
    finally:
        await running.close()
    assert isinstance(error, DeliveryLostError) and f"worker process {pid} exited with code -9" in str(error)
    assert [r.status for r in running.records] == ["failed"]
    tally = counts(sent, "hold", tmp_path, error)
    assert tally["submitted"] == tally["started"] == 1 and tally["finished"] == 0 and tally["cancels_sent"] == 0
    record(
        "worker SIGKILL",
        backend="process",
        heartbeat=heartbeat,
        learned_after_s=round(learned, 3),
        detected_by="pool (worker exit)",
        **tally,
    )


async def test_process_worker_frozen_without_heartbeat_ends_at_delivery_timeout(
    sent: SentFrames, tmp_path: Path
) -> None:
    """A worker that stops answering without exiting (SIGSTOP: a hung host) is only noticed by the clock:
    ``delivery_timeout`` fails the run and cancels it, which kills the frozen worker."""
    timeout = 5.0  # room for a worker to start on a busy machine: the test needs the run to start first
    configure("process", process_config(), delivery_timeout=timeout)
    running = Running(freeze_first, tmp_path, kills=1)
    try:
        submitted = time.monotonic()
        (pid,) = await running.started()
        _, error, _ = await running.outcome()
        waited = time.monotonic() - submitted
        await eventually(lambda: pid_gone(pid), "the frozen worker was killed by the cancel")
    finally:
        await running.close()
    assert isinstance(error, DeliveryTimeoutError) and "delivery_timeout=5.0s" in str(error)
    assert [r.status for r in running.records] == ["timed out"]
    tally = counts(sent, "freeze_first", tmp_path, error)
    assert tally["submitted"] == tally["started"] == 1 and tally["finished"] == 0 and tally["cancels_sent"] == 1
    record(
        "worker frozen, no heartbeat",
        backend="process",
        delivery_timeout=timeout,
        ended_after_s=round(waited, 3),
        **tally,
    )


@pytest.mark.parametrize("policy", ["fail", "cancel", "detach"])
async def test_process_frozen_worker_meets_its_orphan_policy(
    sent: SentFrames, tmp_path: Path, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The heartbeat finds a frozen worker within twice its interval; then ``fail`` sends nothing to the backend (the
    pool reclaims its slot), ``cancel`` sends a cancel (the worker is killed), ``detach`` leaves the worker alone: it
    finishes once it thaws, and its late result is only logged."""
    caplog.set_level(logging.INFO, logger="wove.runtime")
    configure(
        "process",
        process_config(),
        delivery_heartbeat_seconds=PROCESS_HEARTBEAT,
        delivery_orphan_policy=policy,
        delivery_timeout=NEVER,
    )
    running = Running(freeze_first, tmp_path, kills=1)
    try:
        (pid,) = await running.started()
        seen = time.monotonic()
        _, error, _ = await running.outcome()
        learned = time.monotonic() - seen
        if policy == "detach":
            assert psutil.Process(pid).status() == psutil.STATUS_STOPPED  # left alone
            os.kill(pid, signal.SIGCONT)
            await eventually(lambda: finishes(tmp_path) == [pid], "the thawed worker finished its run")
            run_id = running.records[0].run_id
            ended = f"detached run {run_id} of task 'freeze_first' ended with task_result"
            await eventually(lambda: ended in caplog.text, "the late result was logged")
        else:
            await eventually(lambda: pid_gone(pid), "the frozen worker was stopped")
    finally:
        await running.close()
    assert isinstance(error, DeliveryLostError) and "the worker is presumed lost" in str(error)
    assert [r.status for r in running.records] == ["lost"]
    tally = counts(sent, "freeze_first", tmp_path, error)
    assert tally["submitted"] == tally["started"] == 1
    assert tally["cancels_sent"] == (1 if policy == "cancel" else 0)
    assert tally["finished"] == (1 if policy == "detach" else 0)
    assert learned < 10 * PROCESS_HEARTBEAT  # a hang guard; the time itself goes to the report
    record(
        f"orphan policy {policy}",
        backend="process",
        fault="SIGSTOP",
        heartbeat=PROCESS_HEARTBEAT,
        learned_after_s=round(learned, 3),
        within_2x=learned <= 2 * PROCESS_HEARTBEAT,
        **tally,
    )


@pytest.mark.parametrize(
    ("fault", "kills", "retries"),
    [("SIGKILL", 1, 2), ("SIGKILL", 9, 2), ("SIGSTOP", 1, 2), ("SIGSTOP", 9, 1)],
    ids=["sigkill-once", "sigkill-always", "sigstop-once", "sigstop-always"],
)
async def test_process_requeue_submits_again_at_most_retries_times(
    sent: SentFrames, tmp_path: Path, fault: str, kills: int, retries: int
) -> None:
    """``requeue``: a lost run is submitted again as a new run, at most ``retries`` times, then the task fails.
    A SIGKILL is reported by the pool, a SIGSTOP found by the heartbeat; both count against the same budget."""
    configure(
        "process",
        process_config(),
        retries=retries,
        delivery_heartbeat_seconds=PROCESS_HEARTBEAT,
        delivery_orphan_policy="requeue",
        delivery_timeout=NEVER,
    )
    task = die_first if fault == "SIGKILL" else freeze_first
    running = Running(task, tmp_path, kills=kills)
    try:
        value, error, seconds = await running.outcome()
        lost = starts(tmp_path)[:kills]
        await eventually(lambda: all(pid_gone(pid) for pid in lost), "no lost worker is left holding a slot")
    finally:
        await running.close()
    expected = min(kills, retries) + 1  # the first submission, plus one per lost run while retries last
    assert len(starts(tmp_path)) == expected == sent.submissions(task.__name__)
    if kills <= retries:
        assert error is None and value == expected  # the last start is the one that finished
    else:
        assert isinstance(error, DeliveryLostError)
    tally = counts(sent, task.__name__, tmp_path, error)
    assert tally["duplicated"] == 0
    record(
        "orphan policy requeue",
        backend="process",
        fault=fault,
        retries=retries,
        kills=kills,
        weave_seconds=round(seconds, 3),
        outcome="result" if error is None else type(error).__name__,
        **tally,
    )


# == Celery ============================================================================================================


class CeleryWorker:
    """A prefork worker on a queue of its own, and where the adapter reaches it."""

    def __init__(self, process: WorkerProcess, broker: str, queue: str) -> None:
        self.process, self.broker, self.queue = process, broker, queue

    def config(self) -> dict[str, Any]:
        return {"broker_url": self.broker, "queue": self.queue}

    def output(self) -> str:
        return self.process.output()

    def children(self) -> set[int]:
        return self.process.children()


@pytest.fixture(scope="module")
def celery_worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    """One worker for the pool-child scenarios: Celery replaces a killed child, so the worker outlives them."""
    broker, queue = redis_server.url(CELERY_DB), unique_queue("faults")
    worker = start_celery(tmp_path_factory.mktemp("celery-faults"), broker, queue)
    try:
        yield CeleryWorker(worker, broker, queue)
    finally:
        worker.stop()


async def replaced(worker: CeleryWorker, pid: int) -> None:
    """Celery replaced the killed pool child, so the next scenario has both children again."""
    await eventually(lambda: pid not in worker.children() and len(worker.children()) == 2, "the pool was refilled")


@pytest.mark.parametrize("heartbeat", [CELERY_HEARTBEAT, None], ids=["heartbeat", "no-heartbeat"])
async def test_celery_pool_child_sigkilled_mid_task(
    celery_worker: CeleryWorker, sent: SentFrames, published: list[str], tmp_path: Path, heartbeat: float | None
) -> None:
    """Nobody tells the weave when a pool child dies (Celery only logs a WorkerLostError): the heartbeat finds it
    within twice its interval; without one, ``delivery_timeout`` ends the wait."""
    timeout = 6.0  # room for the task to start on a busy machine: the test kills it once it runs
    configure(
        "celery",
        celery_worker.config(),
        delivery_heartbeat_seconds=heartbeat,
        delivery_timeout=NEVER if heartbeat else timeout,
    )
    running = Running(hold, tmp_path)
    try:
        submitted = time.monotonic()
        (pid,) = await running.started()
        assert pid in celery_worker.children()
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _, error, _ = await running.outcome()
        learned, since_submit = time.monotonic() - killed, time.monotonic() - submitted
        await replaced(celery_worker, pid)
    finally:
        await running.close()
    run_id = running.records[0].run_id
    if heartbeat:
        assert isinstance(error, DeliveryLostError) and "the worker is presumed lost" in str(error)
        assert run_id not in revoked_on_workers(celery_worker.broker)  # "fail" sends nothing to the backend
    else:
        assert isinstance(error, DeliveryTimeoutError) and "delivery_timeout=6.0s" in str(error)
    assert learned < HANG_GUARD
    tally = counts(sent, "hold", tmp_path, error)
    assert tally["submitted"] == tally["started"] == len(published) == 1 and tally["finished"] == 0
    record(
        "worker SIGKILL",
        backend="celery",
        heartbeat=heartbeat,
        delivery_timeout=None if heartbeat else timeout,
        learned_after_s=round(learned, 3),
        since_submit_s=round(since_submit, 3),
        within_2x=learned <= 2 * heartbeat if heartbeat else None,
        detected_by="heartbeat" if heartbeat else "delivery_timeout",
        **tally,
    )


@pytest.mark.parametrize("policy", ["cancel", "detach"])
async def test_celery_lost_pool_child_meets_its_orphan_policy(
    celery_worker: CeleryWorker,
    sent: SentFrames,
    tmp_path: Path,
    policy: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``cancel`` revokes the lost run on the workers (the worker logs it); ``detach`` sends nothing and leaves the
    task alone: a frozen child that thaws finishes it, and the weave only logs the late result."""
    caplog.set_level(logging.INFO, logger="wove.runtime")
    configure(
        "celery",
        celery_worker.config(),
        delivery_heartbeat_seconds=CELERY_HEARTBEAT,
        delivery_orphan_policy=policy,
        delivery_timeout=NEVER,
    )
    task = freeze_first if policy == "detach" else die_first
    running = Running(task, tmp_path, kills=1)
    try:
        (pid,) = await running.started()
        seen = time.monotonic()
        _, error, _ = await running.outcome()
        learned = time.monotonic() - seen
        run_id = running.records[0].run_id
        if policy == "cancel":
            await eventually(lambda: run_id in revoked_on_workers(celery_worker.broker), "the worker got the revoke")
            await replaced(celery_worker, pid)
        else:
            assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
            os.kill(pid, signal.SIGCONT)
            await eventually(lambda: finishes(tmp_path) == [pid], "the thawed pool child finished the task")
            ended = f"detached run {run_id} of task 'freeze_first' ended with task_result"
            await eventually(lambda: ended in caplog.text, "the late result was logged")
            assert run_id not in revoked_on_workers(celery_worker.broker)
    finally:
        await running.close()
    assert isinstance(error, DeliveryLostError)
    tally = counts(sent, task.__name__, tmp_path, error)
    assert tally["submitted"] == tally["started"] == 1
    assert tally["cancels_sent"] == (1 if policy == "cancel" else 0)
    record(
        f"orphan policy {policy}",
        backend="celery",
        fault="SIGKILL" if policy == "cancel" else "SIGSTOP",
        heartbeat=CELERY_HEARTBEAT,
        learned_after_s=round(learned, 3),
        within_2x=learned <= 2 * CELERY_HEARTBEAT,
        **tally,
    )


@pytest.mark.parametrize(("kills", "retries"), [(1, 2), (9, 1)], ids=["once", "always"])
async def test_celery_requeue_submits_again_at_most_retries_times(
    celery_worker: CeleryWorker, sent: SentFrames, published: list[str], tmp_path: Path, kills: int, retries: int
) -> None:
    configure(
        "celery",
        celery_worker.config(),
        retries=retries,
        delivery_heartbeat_seconds=CELERY_HEARTBEAT,
        delivery_orphan_policy="requeue",
        delivery_timeout=NEVER,
    )
    running = Running(die_first, tmp_path, kills=kills)
    try:
        value, error, seconds = await running.outcome()
        for pid in starts(tmp_path)[:kills]:
            await replaced(celery_worker, pid)
    finally:
        await running.close()
    expected = min(kills, retries) + 1
    assert len(starts(tmp_path)) == expected == sent.submissions("die_first") == len(set(published))
    if kills <= retries:
        assert error is None and value == expected
    else:
        assert isinstance(error, DeliveryLostError)
    tally = counts(sent, "die_first", tmp_path, error)
    record(
        "orphan policy requeue",
        backend="celery",
        fault="SIGKILL",
        retries=retries,
        kills=kills,
        weave_seconds=round(seconds, 3),
        outcome="result" if error is None else type(error).__name__,
        published=len(published),
        **tally,
    )


async def test_celery_whole_worker_sigkilled(redis_server: RedisServer, sent: SentFrames, tmp_path: Path) -> None:
    """The worker and all its pool children die at once (a lost machine): the heartbeat ends the wait."""
    broker, queue = redis_server.url(CELERY_DB), unique_queue("machine")
    worker = start_celery(tmp_path, broker, queue, concurrency=1)
    configure(
        "celery",
        {"broker_url": broker, "queue": queue},
        delivery_heartbeat_seconds=CELERY_HEARTBEAT,
        delivery_timeout=NEVER,
    )
    folder = tmp_path / "tasks"
    folder.mkdir()
    running = Running(hold, folder)
    try:
        await running.started()
        killed = time.monotonic()
        kill_group(worker)
        _, error, _ = await running.outcome()
        learned = time.monotonic() - killed
    finally:
        await running.close()
        worker.stop()
    assert isinstance(error, DeliveryLostError)
    tally = counts(sent, "hold", folder, error)
    assert tally["submitted"] == tally["started"] == 1 and tally["finished"] == 0
    record(
        "worker SIGKILL (whole worker)",
        backend="celery",
        heartbeat=CELERY_HEARTBEAT,
        learned_after_s=round(learned, 3),
        within_2x=learned <= 2 * CELERY_HEARTBEAT,
        detected_by="heartbeat",
        **tally,
    )


# == Slurm =============================================================================================================


def configure_slurm(output_dir: Path, prefix: str = "wove", **settings: Any) -> None:
    config = {"output_dir": str(output_dir), "env": {"PYTHONPATH": str(ROOT)}, "job_name_prefix": prefix}
    configure("slurm", config, **settings)


def job_of(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_text().split("SLURM_JOB_ID=")[1].split("\0")[0]


@pytest.mark.parametrize("heartbeat", [SLURM_HEARTBEAT, None], ids=["heartbeat", "no-heartbeat"])
async def test_slurm_job_worker_sigkilled_mid_task(
    slurm_cluster: SlurmCluster, sent: SentFrames, tmp_path: Path, heartbeat: float | None
) -> None:
    """Killing the job's worker process fails the job; the adapter's squeue poll (or the heartbeat, whichever comes
    first) reports it, carrying Slurm's reason, long before ``delivery_timeout``."""
    configure_slurm(tmp_path / "out", delivery_heartbeat_seconds=heartbeat, delivery_timeout=NEVER)
    folder = tmp_path / "tasks"
    folder.mkdir()
    running = Running(hold, folder)
    try:
        (pid,) = await running.started()
        job_id = job_of(pid)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _, error, _ = await running.outcome()
        learned = time.monotonic() - killed
    finally:
        await running.close()
    assert isinstance(error, DeliveryLostError)
    by_poll = f"Slurm job {job_id}" in str(error)
    if not heartbeat:
        assert by_poll and "signal 9 (SIGKILL)" in str(error)
    tally = counts(sent, "hold", folder, error)
    assert tally["submitted"] == tally["started"] == 1 and tally["finished"] == 0
    record(
        "worker SIGKILL",
        backend="slurm",
        heartbeat=heartbeat,
        learned_after_s=round(learned, 3),
        within_2x=learned <= 2 * heartbeat if heartbeat else None,
        detected_by="squeue poll" if by_poll else "heartbeat",
        **tally,
    )


async def test_slurm_requeue_submits_a_new_job(slurm_cluster: SlurmCluster, sent: SentFrames, tmp_path: Path) -> None:
    """A job whose worker was killed is submitted again as a new job (a new run), once per retry."""
    prefix = unique_queue("requeue")
    configure_slurm(tmp_path / "out", prefix, retries=1, delivery_orphan_policy="requeue", delivery_timeout=NEVER)
    folder = tmp_path / "tasks"
    folder.mkdir()
    running = Running(die_first, folder, kills=1)
    try:
        value, error, seconds = await running.outcome()
    finally:
        await running.close()
    assert error is None and value == 2

    def states() -> list[str]:
        return sorted(state for name, state in slurm_cluster.jobs().values() if name.startswith(prefix))

    await eventually(lambda: states() == ["COMPLETED", "FAILED"], "Slurm shows the killed job and the new one")
    tally = counts(sent, "die_first", folder, error)
    assert tally["submitted"] == tally["started"] == 2 and tally["finished"] == 1
    record(
        "orphan policy requeue",
        backend="slurm",
        fault="SIGKILL",
        retries=1,
        kills=1,
        weave_seconds=round(seconds, 3),
        outcome="result",
        **tally,
    )
