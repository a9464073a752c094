"""The executor runtime: exactly-once resolution and every delivery policy, frame by frame."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

import pytest

import wove
from wove import (
    BackendUnavailableError,
    ConfigError,
    DeliveryLostError,
    DeliveryTimeoutError,
    OrphanedRunError,
    RunCancelledError,
    SubmitError,
    weave,
)
from wove.environment import get_runtime

from .scripted_executor import Emit, NowaitScriptedExecutor, ScriptedExecutor


def use(executor: Any, **settings: Any) -> None:
    wove.config(environments={"default": {}, "remote": {"executor": executor, **settings}})


def one_remote_task(func: Any = None, **options: Any) -> Any:
    with weave() as w:

        @w.do(environment="remote", **options)
        def task() -> str:
            return "done"

    return w


def test_local_executor_results_and_original_exceptions() -> None:
    wove.config(environments={"default": {}, "side": {"executor": "local"}})
    with weave(x=4, error_mode="return") as w:

        @w.do(environment="side")
        def sync_side(x: int) -> int:
            return x + 1

        @w.do(environment="side")
        async def async_side(sync_side: int) -> tuple[int, str]:
            return sync_side * 2, threading.current_thread().name

        @w.do(environment="side")
        def broken() -> None:
            raise LookupError("original type survives")

    assert w.result.sync_side == 5
    assert w.result.async_side == (10, "wove-runtime")
    assert isinstance(w.result.errors["broken"], LookupError)
    record = w.result.records["sync_side"][0]
    assert record.pid == os.getpid() and record.run_id and record.status == "succeeded"
    assert record.submitted_at is not None and record.started_at is not None and record.finished_at is not None


def test_an_environment_starts_once_for_many_weaves_and_threads() -> None:
    class Counting(ScriptedExecutor):
        starts = 0

    use(Counting)
    results: list[str] = []

    def run() -> None:
        results.append(one_remote_task().result.task)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run()
    assert results == ["done"] * 9
    assert Counting.starts == 1
    assert get_runtime().started_environments == ("remote",)


def test_delivery_timeout_raises_and_cancels_the_run() -> None:
    async def silent(frame: Any, emit: Emit) -> None:
        await asyncio.sleep(60)

    executor = ScriptedExecutor(silent)
    use(executor, delivery_timeout=0.2)
    with pytest.raises(DeliveryTimeoutError, match="delivery_timeout=0.2"):
        one_remote_task()
    assert len(executor.sent("cancel_task")) == 1
    assert executor.sent("cancel_task")[0]["run_id"] == executor.sent("run_task")[0]["run_id"]


def test_heartbeat_silence_means_the_worker_is_lost() -> None:
    async def dies_after_start(frame: Any, emit: Emit) -> None:
        emit({"type": "task_started", "run_id": frame["run_id"]})

    executor = ScriptedExecutor(dies_after_start)
    use(executor, delivery_heartbeat_seconds=0.2)
    started = time.monotonic()
    with pytest.raises(DeliveryLostError, match="presumed lost"):
        one_remote_task()
    assert time.monotonic() - started < 2.0  # far below any hang; the window is 0.2 s
    # the executor is told to release the run (nobody waits for it), and it is not cancelled
    assert executor.forgotten == [executor.sent("run_task")[0]["run_id"]] and executor.sent("cancel_task") == []


def test_a_lost_run_under_the_cancel_policy_is_cancelled_not_forgotten() -> None:
    async def dies_after_start(frame: Any, emit: Emit) -> None:
        emit({"type": "task_started", "run_id": frame["run_id"]})

    executor = ScriptedExecutor(dies_after_start, ack_cancel=False)
    use(executor, delivery_heartbeat_seconds=0.1, delivery_orphan_policy="cancel")
    with pytest.raises(DeliveryLostError):
        one_remote_task()
    assert len(executor.sent("cancel_task")) == 1 and executor.forgotten == []


def test_heartbeats_keep_a_long_run_alive() -> None:
    async def slow_but_alive(frame: Any, emit: Emit) -> None:
        emit({"type": "task_started", "run_id": frame["run_id"]})
        for _ in range(8):
            await asyncio.sleep(0.05)
            emit({"type": "heartbeat", "run_id": frame["run_id"]})
        emit({"type": "task_result", "run_id": frame["run_id"], "result": "survived"})

    use(ScriptedExecutor(slow_but_alive), delivery_heartbeat_seconds=0.2)
    assert one_remote_task().result.task == "survived"


def test_queued_runs_are_not_lost_before_they_start() -> None:
    async def queued_then_runs(frame: Any, emit: Emit) -> None:
        await asyncio.sleep(0.5)  # waiting in the backend's queue: no heartbeats yet
        emit({"type": "task_started", "run_id": frame["run_id"]})
        emit({"type": "task_result", "run_id": frame["run_id"], "result": "late start"})

    use(ScriptedExecutor(queued_then_runs), delivery_heartbeat_seconds=0.1)
    assert one_remote_task().result.task == "late start"


def test_first_terminal_frame_wins_and_duplicates_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    async def at_least_once(frame: Any, emit: Emit) -> None:
        run_id = frame["run_id"]
        emit({"type": "task_result", "run_id": run_id, "result": "first"})  # result before started
        emit({"type": "task_started", "run_id": run_id})
        emit({"type": "task_result", "run_id": run_id, "result": "second"})
        emit({"type": "task_error", "run_id": run_id, "error": {"kind": "X", "message": "late"}})
        emit({"type": "heartbeat", "run_id": run_id})

    use(ScriptedExecutor(at_least_once))
    with caplog.at_level(logging.DEBUG, logger="wove.runtime"):
        first = one_remote_task()
        second = one_remote_task()
    assert first.result.task == "first" and second.result.task == "first"
    assert "duplicate" in caplog.text


def test_malformed_frames_never_kill_the_receiver(caplog: pytest.LogCaptureFixture) -> None:
    async def noisy(frame: Any, emit: Emit) -> None:
        for junk in [
            "text",
            42,
            {},
            {"type": "task_result"},
            {"type": "bogus", "run_id": frame["run_id"]},
            {"type": "task_result", "run_id": 7},
            {"type": "task_result", "run_id": "not-a-run"},
        ]:
            emit(junk)
        emit({"type": "task_result", "run_id": frame["run_id"], "result": "still fine"})

    use(ScriptedExecutor(noisy))
    with caplog.at_level(logging.WARNING, logger="wove.runtime"):
        assert one_remote_task().result.task == "still fine"
        assert one_remote_task().result.task == "still fine"
    assert "malformed" in caplog.text and "unknown run" in caplog.text


@pytest.mark.parametrize("nowait", [False, True], ids=["task-path", "send-nowait"])
def test_max_in_flight_bounds_the_backlog(nowait: bool) -> None:
    live = {"now": 0, "peak": 0}

    async def counted(frame: Any, emit: Emit) -> None:
        live["now"] += 1
        live["peak"] = max(live["peak"], live["now"])
        await asyncio.sleep(0.01)
        live["now"] -= 1
        emit({"type": "task_result", "run_id": frame["run_id"], "result": frame["args"].get("item", "done")})

    if nowait:  # started first: the first three runs take send_nowait, the rest wait for a slot on the task path
        executor = started(NowaitScriptedExecutor(counted), delivery_max_in_flight=3)
    else:
        use(ScriptedExecutor(counted), delivery_max_in_flight=3)
    with weave() as w:

        @w.do(range(30), environment="remote")
        def each(item: int) -> int:
            return item

    assert w.result.each == list(range(30))
    assert live["peak"] == 3
    if nowait:
        assert 3 <= executor.nowait_runs <= 30


@pytest.mark.parametrize("mode", ["best_effort", "require_ack"])
@pytest.mark.parametrize("nowait", [False, True], ids=["task-path", "send-nowait"])
async def test_cancelling_the_weave_cancels_remote_runs(mode: str, nowait: bool) -> None:
    async def forever(frame: Any, emit: Emit) -> None:
        if frame["task_name"] == "task":  # the run that starts the environment first
            await answer_now(frame, emit)
            return
        emit({"type": "task_started", "run_id": frame["run_id"]})
        await asyncio.sleep(60)

    executor = NowaitScriptedExecutor(forever) if nowait else ScriptedExecutor(forever)
    if isinstance(executor, NowaitScriptedExecutor):  # started: its runs then skip the per-run task
        await asyncio.to_thread(started, executor, delivery_cancel_mode=mode)
    else:
        use(executor, delivery_cancel_mode=mode)

    async def run() -> None:
        async with weave() as w:

            @w.do(range(5), environment="remote")
            def each(item: int) -> int:
                return item

    task = asyncio.ensure_future(run())
    while len(executor.sent("run_task")) < 5:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancels = [c["run_id"] for c in executor.sent("cancel_task")]
    assert sorted(cancels) == sorted(c["run_id"] for c in executor.sent("run_task"))  # each once
    assert len(get_runtime()._runs) == 0
    if isinstance(executor, NowaitScriptedExecutor):
        assert executor.nowait_runs == 5


def test_a_backend_side_cancel_is_an_error_naming_the_run() -> None:
    async def operator_cancels(frame: Any, emit: Emit) -> None:
        emit({"type": "task_cancelled", "run_id": frame["run_id"]})

    use(ScriptedExecutor(operator_cancels))
    with pytest.raises(RunCancelledError, match="backend cancelled"):
        one_remote_task()


def test_submission_failure_is_a_clear_error_and_retries_apply() -> None:
    executor = ScriptedExecutor(fail_send=True)
    use(executor)
    with pytest.raises(SubmitError, match="'remote'.*ConnectionRefusedError: broker down"):
        one_remote_task(retries=2)
    assert len(executor.sent("run_task")) == 3


def test_start_failure_names_the_environment_and_is_retried_next_time() -> None:
    class FailsOnce(ScriptedExecutor):
        failures = 0

        async def start(self, **kwargs: Any) -> None:
            if FailsOnce.failures == 0:
                FailsOnce.failures += 1
                raise OSError("address in use")
            await super().start(**kwargs)

    use(FailsOnce)
    with pytest.raises(BackendUnavailableError, match="'remote' failed to start: OSError: address in use"):
        one_remote_task()
    assert one_remote_task().result.task == "done"


def test_bad_executor_setting_is_a_config_error() -> None:
    use(lambda: "not an executor")
    with pytest.raises(ConfigError, match="executor must be"):
        one_remote_task()


def run_with_crash(policy: str, retries: int = 0) -> tuple[ScriptedExecutor, Any]:
    """Start a run, then make the executor's receive side fail while it is pending."""
    made: list[ScriptedExecutor] = []

    async def never(frame: Any, emit: Emit) -> None:
        emit({"type": "task_started", "run_id": frame["run_id"]})
        if len(made) == 1:
            made[0].crash(ConnectionResetError("connection to backend lost"))
            await asyncio.sleep(60)
        emit({"type": "task_result", "run_id": frame["run_id"], "result": f"run on executor {len(made)}"})

    def factory() -> ScriptedExecutor:
        made.append(ScriptedExecutor(never, ack_cancel=False))
        return made[-1]

    use(factory, delivery_orphan_policy=policy)
    outcome: Any
    try:
        outcome = one_remote_task(retries=retries).result.task
    except Exception as exc:
        outcome = exc
    return made[0], outcome


def test_orphan_policy_fail() -> None:
    first, outcome = run_with_crash("fail")
    assert isinstance(outcome, OrphanedRunError) and "connection to backend lost" in str(outcome)
    assert first.sent("cancel_task") == []


def test_orphan_policy_cancel_tells_the_backend() -> None:
    first, outcome = run_with_crash("cancel")
    assert isinstance(outcome, OrphanedRunError)
    assert len(first.sent("cancel_task")) == 1


def test_orphan_policy_requeue_submits_again_within_retries() -> None:
    _, outcome = run_with_crash("requeue", retries=1)
    assert outcome == "run on executor 2"


def test_a_requeued_run_keeps_one_record_that_names_the_lost_run() -> None:
    seen: list[str] = []

    async def silent_first(frame: Any, emit: Emit) -> None:
        seen.append(frame["run_id"])
        emit({"type": "task_started", "run_id": frame["run_id"], "host": f"host-{len(seen)}", "pid": len(seen)})
        if len(seen) == 1:
            return  # no heartbeat, no outcome: presumed lost, then requeued
        emit({"type": "task_result", "run_id": frame["run_id"], "result": "second run"})

    use(ScriptedExecutor(silent_first), delivery_heartbeat_seconds=0.1, delivery_orphan_policy="requeue")
    w = one_remote_task(retries=1)
    (record,) = w.result.records["task"]
    assert w.result.task == "second run" and record.status == "succeeded"
    assert record.lost_runs == [seen[0]] and record.run_id == seen[1]
    assert (record.host, record.pid, record.error) == ("host-2", 2, None)  # nothing left over from the lost run
    assert record.to_dict()["lost_runs"] == [seen[0]]


def test_orphan_policy_requeue_without_retries_fails() -> None:
    _, outcome = run_with_crash("requeue", retries=0)
    assert isinstance(outcome, OrphanedRunError)


def test_orphan_policy_detach_keeps_listening(caplog: pytest.LogCaptureFixture) -> None:
    async def started_then_silent(frame: Any, emit: Emit) -> None:
        emit({"type": "task_started", "run_id": frame["run_id"]})
        await asyncio.sleep(0.5)
        emit({"type": "task_result", "run_id": frame["run_id"], "result": "late"})

    executor = ScriptedExecutor(started_then_silent)
    use(executor, delivery_orphan_policy="detach", delivery_heartbeat_seconds=0.1)
    with caplog.at_level(logging.INFO, logger="wove.runtime"):
        with pytest.raises(DeliveryLostError):
            one_remote_task()
        deadline = time.monotonic() + 5
        while "detached run" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "detached run" in caplog.text
    assert executor.forgotten == []  # still listening for how it ends


def test_shutdown_resolves_pending_runs_by_their_orphan_policy() -> None:
    async def forever(frame: Any, emit: Emit) -> None:
        emit({"type": "task_started", "run_id": frame["run_id"]})
        await asyncio.sleep(60)

    executor = ScriptedExecutor(forever)
    use(executor)
    outcome: list[Any] = []

    def run() -> None:
        try:
            one_remote_task()
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    while not executor.sent("run_task"):
        time.sleep(0.01)
    wove.shutdown()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(outcome[0], OrphanedRunError) and "shut down" in str(outcome[0])
    assert executor.stopped


def test_changing_an_environment_restarts_it() -> None:
    made: list[ScriptedExecutor] = []

    def factory() -> ScriptedExecutor:
        made.append(ScriptedExecutor())
        return made[-1]

    use(factory)
    one_remote_task()
    use(factory, retries=1)  # a different definition
    deadline = time.monotonic() + 5
    while not made[0].stopped and time.monotonic() < deadline:
        time.sleep(0.01)
    one_remote_task()
    assert len(made) == 2 and made[0].stopped


@pytest.mark.parametrize(
    ("key", "expected"),
    [("order-{n}", "order-3"), (lambda n: f"fn-{n * 2}", "fn-6"), ("fixed", "fixed")],
)
def test_idempotency_key_travels_in_the_delivery_settings(key: Any, expected: str) -> None:
    executor = ScriptedExecutor()
    use(executor, delivery_idempotency_key=key)
    with weave(n=3) as w:

        @w.do(environment="remote")
        def task(n: int) -> int:
            return n

    assert w.result.task == 3
    delivery = executor.sent("run_task")[0]["delivery"]
    assert delivery["idempotency_key"] == expected
    assert set(delivery) == {
        "timeout",
        "heartbeat_seconds",
        "cancel_mode",
        "orphan_policy",
        "idempotency_key",
        "max_in_flight",
    }


def test_bad_idempotency_format_names_the_task() -> None:
    use(ScriptedExecutor(), delivery_idempotency_key="order-{missing}")
    with pytest.raises(ConfigError, match="'task'.*order-\\{missing\\}"):
        one_remote_task()


def test_the_submission_id_is_recorded_from_any_frame() -> None:
    async def no_start_frame(frame: Any, emit: Emit) -> None:
        emit({"type": "task_result", "run_id": frame["run_id"], "result": 1, "submission": "job-7"})

    use(ScriptedExecutor(no_start_frame))
    w = one_remote_task()
    assert w.result.records["task"][0].submission == "job-7"


# -- runs on a started environment whose executor takes them synchronously (no task per run) ---------------------


def started(executor: NowaitScriptedExecutor, **settings: Any) -> NowaitScriptedExecutor:
    """Use ``executor`` and start its environment with one run, so the runs that follow take ``send_nowait``."""
    use(executor, **settings)
    one_remote_task()
    executor.commands.clear()
    executor.nowait_runs = 0
    return executor


async def answer_or_fail(frame: Any, emit: Emit) -> None:
    """Return the callable's result, or report the exception it raised (as a worker would)."""
    try:
        result = frame["callable"](**frame["args"])
    except Exception as exc:
        emit({"type": "task_error", "run_id": frame["run_id"], "exception": exc, "error": {"kind": "KeyError"}})
    else:
        emit({"type": "task_result", "run_id": frame["run_id"], "result": result})


def test_runs_on_a_started_environment_go_through_send_nowait() -> None:
    executor = started(NowaitScriptedExecutor(answer_or_fail))
    with weave() as w:

        @w.do(range(20), environment="remote")
        def each(item: int) -> int:
            return item * 2

    assert w.result.each == [i * 2 for i in range(20)]
    assert executor.nowait_runs == 20 and len(executor.sent("run_task")) == 20
    assert {r.status for r in w.result.records["each"]} == {"succeeded"}


def test_a_failing_run_taken_by_send_nowait_raises_the_original_exception() -> None:
    executor = started(NowaitScriptedExecutor(answer_or_fail))
    with pytest.raises(KeyError, match="seven"), weave() as w:

        @w.do(range(20), environment="remote")
        def each(item: int) -> int:
            if item == 7:
                raise KeyError("seven")
            return item

    assert executor.nowait_runs == 20
    assert len(get_runtime()._runs) == 0  # nothing left pending
    records = {r.item: r for r in w.result.records["each"]}
    assert records[7].status == "failed" and isinstance(records[7].error, KeyError)


async def answer_now(frame: Any, emit: Emit) -> None:
    emit({"type": "task_result", "run_id": frame["run_id"], "result": frame["callable"](**frame["args"])})


def test_a_run_taken_by_send_nowait_is_requeued_when_lost() -> None:
    seen: list[str] = []

    async def silent_second(frame: Any, emit: Emit) -> None:
        seen.append(frame["run_id"])
        emit({"type": "task_started", "run_id": frame["run_id"]})
        if len(seen) == 2:
            return  # the first run after the warm-up goes silent: presumed lost, then requeued
        emit({"type": "task_result", "run_id": frame["run_id"], "result": f"run {len(seen)}"})

    executor = started(
        NowaitScriptedExecutor(silent_second), delivery_heartbeat_seconds=0.1, delivery_orphan_policy="requeue"
    )
    w = one_remote_task(retries=1)
    (record,) = w.result.records["task"]
    assert w.result.task == "run 3" and record.lost_runs == [seen[1]] and record.run_id == seen[2]
    assert executor.nowait_runs == 1 and len(executor.sent("run_task")) == 2  # the requeue took the task path


def test_a_refused_send_nowait_is_a_submit_error_and_retries_apply() -> None:
    executor = started(NowaitScriptedExecutor())
    executor.fail_send = True
    with pytest.raises(SubmitError, match="'remote'.*ConnectionRefusedError: broker down"):
        one_remote_task(retries=2)
    assert len(executor.sent("run_task")) == 3 and executor.nowait_runs >= 1
    assert len(get_runtime()._runs) == 0
