"""Pure logic of the ``temporal`` backend: workflow ids, option parsing, how a workflow's end is reported.

The live behaviour (workflows, workers, cancellation) is in ``tests/integration/test_temporal.py``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    TerminatedError,
    TimeoutError,
    TimeoutType,
)
from temporalio.workflow import ActivityCancellationType

from wove._types import Frame
from wove.errors import ConfigError, DeliveryLostError
from wove.integrations import temporal_worker, temporal_workflow
from wove.integrations.temporal import (
    DEFAULT_ACTIVITY_OPTIONS,
    TASK_NAME_CHARS,
    TemporalAdapter,
    _Followed,
    activity_options,
    failure_text,
    start_workflow_options,
    workflow_id,
)
from wove.integrations.temporal_workflow import activity_kwargs

RUN_ID = "0123456789abcdef0123456789abcdef"


def adapter(frames: list[Frame] | None = None, **config: Any) -> TemporalAdapter:
    sink = frames.append if frames is not None else None
    return TemporalAdapter(name="jobs", config=config, callback_url="http://127.0.0.1:1", run_config={}, on_event=sink)


# -- workflow ids ------------------------------------------------------------------------------------------------------


def test_workflow_id_is_prefix_task_name_and_run_id() -> None:
    assert workflow_id("wove-", "price", RUN_ID) == f"wove-price-{RUN_ID}"


@pytest.mark.parametrize(
    ("task_name", "expected"),
    [("load data/2024: ünïcode", "load-data-2024-n-code"), ("", "task"), (None, "task"), ("///", "task")],
)
def test_workflow_id_makes_the_task_name_safe(task_name: Any, expected: str) -> None:
    assert workflow_id("wove-", task_name, RUN_ID) == f"wove-{expected}-{RUN_ID}"


def test_long_task_names_are_cut_but_the_run_id_stays_whole() -> None:
    name = "x" * 500
    first, second = workflow_id("p-", name, RUN_ID), workflow_id("p-", name, RUN_ID[::-1])
    assert first == f"p-{'x' * TASK_NAME_CHARS}-{RUN_ID}"
    assert first != second  # same truncated name, different runs: never a collision


def test_a_bad_prefix_is_refused() -> None:
    with pytest.raises(ConfigError, match="workflow_id_prefix"):
        adapter(workflow_id_prefix="has space")


# -- activity options --------------------------------------------------------------------------------------------------


def test_activity_options_default_to_one_attempt_and_waiting_cancellation() -> None:
    options = activity_options(None)
    assert options == DEFAULT_ACTIVITY_OPTIONS
    kwargs = activity_kwargs(options)
    assert kwargs["retry_policy"] == RetryPolicy(maximum_attempts=1)
    assert kwargs["cancellation_type"] is ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
    assert kwargs["start_to_close_timeout"] == timedelta(hours=24)
    assert kwargs["heartbeat_timeout"] == timedelta(seconds=30)


def test_activity_options_merge_over_the_defaults() -> None:
    options = activity_options(
        {
            "heartbeat_timeout": timedelta(seconds=5),
            "schedule_to_start_timeout": 60,
            "retry_policy": {"initial_interval": timedelta(seconds=2), "non_retryable_error_types": ("KeyError",)},
            "cancellation_type": ActivityCancellationType.TRY_CANCEL,
            "task_queue": "gpu",
        }
    )
    assert options["heartbeat_timeout"] == 5.0 and options["schedule_to_start_timeout"] == 60.0
    assert options["retry_policy"] == {
        "maximum_attempts": 1,
        "initial_interval": 2.0,
        "non_retryable_error_types": ["KeyError"],
    }
    assert options["cancellation_type"] == "TRY_CANCEL" and options["task_queue"] == "gpu"
    kwargs = activity_kwargs(options)
    assert kwargs["retry_policy"] == RetryPolicy(
        initial_interval=timedelta(seconds=2), maximum_attempts=1, non_retryable_error_types=["KeyError"]
    )
    assert kwargs["schedule_to_start_timeout"] == timedelta(minutes=1)


def test_none_removes_a_default_and_a_retry_policy_object_is_accepted() -> None:
    options = activity_options({"heartbeat_timeout": None, "retry_policy": RetryPolicy(maximum_attempts=3)})
    assert "heartbeat_timeout" not in options
    assert activity_kwargs(options)["retry_policy"] == RetryPolicy(maximum_attempts=3)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"heartbeat_timeout": 0}, "must be seconds > 0"),
        ({"heartbeat_timeout": "10s"}, "must be seconds > 0"),
        ({"start_to_close_timeout": None}, "needs start_to_close_timeout or schedule_to_close_timeout"),
        ({"cancellation_type": "SOMETIMES"}, "is invalid"),
        ({"retry_policy": {"maximum_tries": 2}}, "is invalid"),
        ({"retry_policy": 3}, "must be a dict or a temporalio.common.RetryPolicy"),
        ({"start_to_close": 10}, "unknown activity option 'start_to_close'"),
        ([("heartbeat_timeout", 1)], "must be a dict"),
    ],
)
def test_bad_activity_options_fail_clearly(given: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        activity_options(given)


# -- start_workflow options --------------------------------------------------------------------------------------------


def test_start_workflow_options_turn_seconds_into_timedeltas() -> None:
    options = start_workflow_options(
        {"execution_timeout": 3600, "task_timeout": timedelta(seconds=5), "memo": {"a": 1}}
    )
    assert options == {
        "execution_timeout": timedelta(hours=1),
        "task_timeout": timedelta(seconds=5),
        "memo": {"a": 1},
    }


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"id": "mine"}, "may not set id"),
        ({"retry_policy": RetryPolicy()}, "may not set retry_policy"),
        ({"cron_schedule": "* * * * *"}, "may not set cron_schedule"),
        ({"execution_timout": 5}, "does not know: execution_timout"),
        ({"execution_timeout": -1}, "must be seconds > 0"),
    ],
)
def test_bad_start_workflow_options_fail_clearly(given: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        start_workflow_options(given)


# -- client configuration ----------------------------------------------------------------------------------------------


def test_connection_settings() -> None:
    made = adapter(
        target_host="temporal:7233", namespace="prod", tls=True, api_key="k", connect_options={"identity": "me"}
    )
    assert (made.target_host, made.namespace, made.task_queue) == ("temporal:7233", "prod", "wove")
    assert made.connect_options == {"identity": "me", "tls": True, "api_key": "k"}
    assert made.client is None  # connected in start()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"client": object()}, "must be a temporalio.client.Client"),
        ({"task_queue": ""}, r"\['task_queue'\] must be a non-empty string"),
        ({"namespace": 3}, r"\['namespace'\] must be a non-empty string"),
        ({"connect_options": {"namespace": "x"}}, "may not set namespace"),
        ({"connect_options": {"tls_config": True}}, "does not know: tls_config"),
    ],
)
def test_bad_configuration_fails_clearly(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        adapter(**config)


# -- reporting a workflow's end ----------------------------------------------------------------------------------------


@dataclass
class StubHandle:
    """Stands in for a ``WorkflowHandle``: reporting only reads its id."""

    id: str = f"wove-price-{RUN_ID}"


def heartbeat_failure() -> ActivityError:
    failure = ActivityError(
        "Activity task timed out",
        scheduled_event_id=5,
        started_event_id=6,
        identity="worker",
        activity_type="wove_run_payload",
        activity_id="1",
        retry_state=None,
    )
    failure.__cause__ = TimeoutError(
        "activity Heartbeat timeout", type=TimeoutType.HEARTBEAT, last_heartbeat_details=[]
    )
    return failure


def test_failure_text_follows_the_cause_chain() -> None:
    assert failure_text(heartbeat_failure()) == "Activity task timed out: activity Heartbeat timeout (HEARTBEAT)"
    assert failure_text(ApplicationError("boom", type="KeyError")) == "boom (KeyError)"


@pytest.mark.parametrize(
    ("cause", "kind", "message"),
    [
        (TerminatedError("operator says no"), "WorkflowTerminated", "was terminated: operator says no"),
        (TerminatedError(""), "WorkflowTerminated", "was terminated: no reason given"),
        (
            TimeoutError("Workflow timed out", type=TimeoutType.START_TO_CLOSE, last_heartbeat_details=[]),
            "WorkflowTimedOut",
            "timed out: Workflow timed out (START_TO_CLOSE)",
        ),
        (heartbeat_failure(), "WorkflowFailed", "failed: Activity task timed out: activity Heartbeat timeout"),
        (None, "NoOutcome", "completed but its worker reported no outcome"),
    ],
)
def test_a_workflow_that_ended_without_an_outcome_is_reported_lost(
    cause: BaseException | None, kind: str, message: str
) -> None:
    frames: list[Frame] = []
    run = _Followed(RUN_ID, "task-1", StubHandle())  # type: ignore[arg-type]
    adapter(frames)._report(run, cause)
    (frame,) = frames
    assert frame["type"] == "task_error" and frame["run_id"] == RUN_ID and frame["task_id"] == "task-1"
    assert frame["error"]["kind"] == kind and frame["error"]["source"] == "backend"
    assert isinstance(frame["exception"], DeliveryLostError)
    assert f"Temporal workflow wove-price-{RUN_ID} {message}" in str(frame["exception"])


def test_a_workflow_cancelled_outside_wove_cancels_the_run() -> None:
    frames: list[Frame] = []
    adapter(frames)._report(_Followed(RUN_ID, "task-1", StubHandle()), CancelledError())  # type: ignore[arg-type]
    assert [frame["type"] for frame in frames] == ["task_cancelled"]


# -- the worker side ---------------------------------------------------------------------------------------------------


def test_the_workflow_module_imports_only_what_the_sandbox_allows() -> None:
    """Temporal re-imports workflow modules in its sandbox: standard library and temporalio only, no side effects."""
    tree = ast.parse(Path(temporal_workflow.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported}
    assert roots <= set(sys.stdlib_module_names) | {"temporalio", "__future__"}, roots
    top_level = {type(node) for node in tree.body}
    assert top_level <= {ast.Expr, ast.ImportFrom, ast.Import, ast.Assign, ast.AnnAssign, ast.FunctionDef, ast.ClassDef}


def test_worker_command_defaults_come_from_temporal_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", "temporal.internal:7233")
    monkeypatch.setenv("TEMPORAL_NAMESPACE", "prod")
    args = temporal_worker.build_parser().parse_args(["--task-queue", "gpu", "--max-concurrent-activities", "4"])
    assert (args.target_host, args.namespace, args.task_queue) == ("temporal.internal:7233", "prod", "gpu")
    assert args.max_concurrent_activities == 4 and args.heartbeat_throttle == temporal_worker.DEFAULT_HEARTBEAT_THROTTLE


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--heartbeat-throttle", "-1"], 2, "must be > 0"),
        (["--tls-cert", "cert.pem"], 2, "--tls-cert and --tls-key go together"),
        (["--no-such-option"], 2, "unrecognized arguments"),
    ],
)
def test_worker_command_usage_errors(
    argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert temporal_worker.main(argv) == code
    assert message in capsys.readouterr().err
