"""AwsBatchAdapter's pure logic: job names, configuration, the SubmitJob request and its size, DescribeJobs parsing."""

from __future__ import annotations

import json
import os
import random
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wove.backend.codec import build_backend_payload_for_run, payload_from_b64
from wove.errors import ConfigError
from wove.integrations.aws_batch import (
    ECS_OVERRIDES_LIMIT,
    MAX_JOB_NAME,
    MAX_OVERRIDES_CHARS,
    PAYLOAD_ENV,
    AwsBatchAdapter,
    AwsBatchSubmission,
    job_end,
    job_name,
)

#: What AWS Batch accepts as a job name.
VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
BASE = {"job_queue": "queue", "job_definition": "worker:3"}


def make(**config: Any) -> AwsBatchAdapter:
    return AwsBatchAdapter(name="jobs", config={**BASE, **config}, callback_url="http://127.0.0.1:1", run_config={})


class StubRegistry:
    """Stands in for the callback server: run URLs as long as real ones, blobs kept in memory."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def open_run(self, run_id: str) -> str:
        return f"https://weave-host.example.internal:43210/wove/runs/{run_id}/{'c' * 43}"

    def put_blob(self, run_id: str, data: bytes) -> str:
        ref = uuid.uuid4().hex
        self.blobs[ref] = data
        return ref


def frame_for(func: Callable[..., Any], task_name: str = "task", **args: Any) -> dict[str, Any]:
    return {
        "type": "run_task",
        "run_id": uuid.uuid4().hex,
        "task_id": "t-1",
        "task_name": task_name,
        "callable": func,
        "args": args,
        "delivery": {"delivery_timeout": 30.0, "delivery_heartbeat_seconds": 10.0, "idempotency_key": "order-1234"},
    }


def overrides_for(adapter: AwsBatchAdapter, frame: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The containerOverrides of ``frame``'s job, built as the executor and adapter build them; and their JSON."""
    limit = AwsBatchAdapter.inline_payload_limit
    assert limit is not None
    payload = build_backend_payload_for_run(frame, server=StubRegistry(), adapter="aws_batch", inline_limit=limit)
    overrides = adapter.request(payload, frame)["containerOverrides"]
    return overrides, json.dumps(overrides, separators=(",", ":"))


# -- job names ---------------------------------------------------------------------------------------------------------


def test_a_job_name_keeps_the_task_and_the_whole_run_id() -> None:
    run_id = uuid.uuid4().hex
    assert job_name("wove-", "price", run_id) == f"wove-price-{run_id}"


@given(prefix=st.sampled_from(["", "wove-", "nightly_", "P" * 48]), task=st.text(max_size=300))
def test_job_names_are_always_valid_and_keep_the_run_id(prefix: str, task: str) -> None:
    run_id = uuid.uuid4().hex
    name = job_name(prefix, task, run_id)
    assert VALID_NAME.fullmatch(name), name
    assert len(name) <= MAX_JOB_NAME
    assert name.startswith(prefix) and name.endswith(f"-{run_id}")


def test_long_task_names_never_make_two_runs_collide() -> None:
    task = "a_very_long_task_name_" * 10
    names = {job_name("wove-", task, uuid.uuid4().hex) for _ in range(100)}
    assert len(names) == 100 and all(MAX_JOB_NAME - 1 <= len(name) <= MAX_JOB_NAME for name in names)


def test_a_run_id_aws_would_refuse_is_replaced_by_its_digest() -> None:
    first, second = job_name("wove-", "t", "run/1: x"), job_name("wove-", "t", "run/2: x")
    assert VALID_NAME.fullmatch(first) and first != second
    assert first == job_name("wove-", "t", "run/1: x")  # stable


def test_the_submission_shows_as_the_job_id() -> None:
    assert str(AwsBatchSubmission("6c2f-11", "wove-x-1")) == "6c2f-11"


# -- configuration -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"job_queue": None}, r"needs executor_config\['job_queue'\]"),
        ({"job_definition": ""}, r"needs executor_config\['job_definition'\]"),
        ({"job_name_prefix": "-x"}, r"job_name_prefix'\] must be empty or start with a letter or digit"),
        ({"job_name_prefix": "a b"}, "job_name_prefix"),
        ({"job_name_prefix": "p" * 49}, "at most 48"),
        ({"python": ""}, r"executor_config\['python'\] must be the interpreter"),
        ({"python": ["python", 3]}, r"executor_config\['python'\]"),
        ({"container_overrides": {"command": ["x"]}}, "may not set 'command'"),
        ({"container_overrides": {"environment": {PAYLOAD_ENV: "x"}}}, f"may not set {PAYLOAD_ENV}"),
        ({"container_overrides": {"environment": [{"name": "A"}]}}, "must be a dict of strings or a list"),
        ({"container_overrides": ["vcpus"]}, r"container_overrides'\] must be a dict"),
        ({"submit_options": {"jobName": "x"}}, r"may not set 'jobName'; use executor_config\['job_name_prefix'\]"),
        ({"submit_options": {"containerOverrides": {}}}, r"use executor_config\['container_overrides'\]"),
        ({"submit_options": {"arrayProperties": {"size": 2}}}, "a mapped task"),
        ({"poll_interval": 0}, r"poll_interval'\] must be seconds > 0"),
        ({"finish_grace": -1}, r"finish_grace'\] must be seconds >= 0"),
        ({"log_tail_lines": 2.5}, r"log_tail_lines'\] must be an integer >= 0"),
        ({"client": object()}, r"executor_config\['client'\] must be a boto3 client"),
        ({"logs_client": "logs"}, r"executor_config\['logs_client'\] must be a boto3 client"),
        ({"client_options": "fast"}, r"client_options'\] must be a dict"),
    ],
)
def test_bad_configuration_names_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make(**config)


def test_a_python_command_may_be_a_list() -> None:
    adapter = make(python=["/opt/venv/bin/python", "-X", "utf8"])
    assert adapter.command == ["/opt/venv/bin/python", "-X", "utf8", "-m", "wove.backend_worker"]


# -- the SubmitJob request ---------------------------------------------------------------------------------------------


def test_the_request_runs_the_worker_with_the_payload_in_the_environment() -> None:
    adapter = make(
        container_overrides={
            "environment": {"STAGE": "prod"},
            "resourceRequirements": [{"type": "VCPU", "value": "2"}],
        },
        submit_options={"tags": {"team": "data"}, "shareIdentifier": "a"},
    )
    frame = frame_for(len, task_name="price")
    payload = build_backend_payload_for_run(frame, server=StubRegistry(), adapter="aws_batch")
    request = adapter.request(payload, frame)
    assert request["jobName"] == f"wove-price-{frame['run_id']}"
    assert request["jobQueue"] == "queue" and request["jobDefinition"] == "worker:3"
    assert request["retryStrategy"] == {"attempts": 1}  # wove's retries decide
    assert request["tags"] == {"team": "data"} and request["shareIdentifier"] == "a"
    overrides = request["containerOverrides"]
    assert overrides["command"] == ["python", "-m", "wove.backend_worker"]
    assert overrides["resourceRequirements"] == [{"type": "VCPU", "value": "2"}]
    assert [item["name"] for item in overrides["environment"]] == ["STAGE", PAYLOAD_ENV]
    assert payload_from_b64(overrides["environment"][1]["value"]) == payload
    assert adapter.overrides["environment"] == [{"name": "STAGE", "value": "prod"}]  # the config is not mutated


def test_a_retry_strategy_of_your_own_is_kept() -> None:
    adapter = make(submit_options={"retryStrategy": {"attempts": 3}})
    frame = frame_for(len)
    payload = build_backend_payload_for_run(frame, server=StubRegistry(), adapter="aws_batch")
    assert adapter.request(payload, frame)["retryStrategy"] == {"attempts": 3}


def big_task() -> Callable[[bytes], int]:
    """A closure pickled by value, as tasks defined inside a weave are: code, constants and a captured table."""
    table = {f"sku-{i}": random.random() for i in range(150)}

    def price(blob: bytes) -> int:
        total = sum(table.values())
        for key, value in sorted(table.items()):
            if key.endswith("7") and value > 0.5:
                total += len(key) * value
        return int(total) + len(blob)

    return price


@settings(max_examples=40, deadline=None)
@given(size=st.integers(min_value=0, max_value=40_000), task=st.text(min_size=1, max_size=200))
def test_a_real_task_never_puts_more_than_ecs_takes_into_the_overrides(size: int, task: str) -> None:
    adapter = make(container_overrides={"environment": {"STAGE": "production", "REGION": "eu-west-1"}})
    overrides, text = overrides_for(adapter, frame_for(big_task(), task_name=task, blob=os.urandom(size)))
    assert len(text) <= MAX_OVERRIDES_CHARS < ECS_OVERRIDES_LIMIT
    assert len(overrides["environment"][-1]["value"]) < 5 * 1024


def test_a_payload_just_under_the_inline_limit_fits_with_room_to_spare() -> None:
    """The worst case: incompressible arguments just below the limit, so everything stays inline."""
    adapter = make()
    limit = AwsBatchAdapter.inline_payload_limit
    assert limit is not None
    worst = 0
    for size in range(0, limit, 64):
        _, text = overrides_for(adapter, frame_for(len, blob=os.urandom(size)))
        worst = max(worst, len(text))
    assert worst <= MAX_OVERRIDES_CHARS - 2048  # room for variables of your own


def test_overrides_too_big_for_ecs_are_refused_naming_the_fix() -> None:
    adapter = make(container_overrides={"environment": {"CONFIG": "x" * 7000}})
    with pytest.raises(
        ConfigError, match=r"container overrides of \d+ characters \(ECS refuses more than 8192"
    ) as info:
        overrides_for(adapter, frame_for(len))
    assert "executor_config['inline_payload_limit'] (now 4096)" in str(info.value)


def test_a_request_too_big_for_submit_job_is_refused() -> None:
    adapter = make(submit_options={"tags": {f"k{i}": "v" * 250 for i in range(50)}, "parameters": {"p": "x" * 20000}})
    with pytest.raises(ConfigError, match=r"a SubmitJob request of \d+ bytes \(AWS Batch takes at most 30720\)"):
        overrides_for(adapter, frame_for(len))


# -- DescribeJobs ------------------------------------------------------------------------------------------------------


def test_a_failed_job_as_aws_batch_describes_it() -> None:
    job = {
        "jobName": "wove-price-1",
        "jobId": "a1",
        "status": "FAILED",
        "statusReason": "Essential container in task exited",
        "container": {
            "exitCode": 137,
            "reason": "OutOfMemoryError: Container killed due to memory usage",
            "logStreamName": "worker/default/0f1e",
            "logConfiguration": {"logDriver": "awslogs", "options": {"awslogs-group": "/teams/data"}},
        },
        "attempts": [{"container": {"exitCode": 137, "logStreamName": "worker/default/0f1e"}}],
    }
    end = job_end(job)
    assert end.ran and end.exit_code == 137 and end.log_group == "/teams/data"
    assert end.describe("before wove's worker reported an outcome") == (
        "AWS Batch job wove-price-1 (a1) FAILED before wove's worker reported an outcome: status reason: Essential "
        "container in task exited; container: OutOfMemoryError: Container killed due to memory usage; exit code 137; "
        "log stream worker/default/0f1e"
    )


def test_fields_missing_on_the_job_are_read_from_its_last_attempt() -> None:
    job = {
        "jobName": "n",
        "jobId": "b2",
        "status": "FAILED",
        "container": {"command": ["python"]},
        "attempts": [
            {"container": {"exitCode": 1}},
            {"container": {"reason": "CannotPullContainerError: not found"}, "statusReason": "Task failed to start"},
        ],
    }
    end = job_end(job)
    assert not end.ran and end.log_group is None
    assert end.status_reason == "Task failed to start"
    assert end.container_reason == "CannotPullContainerError: not found"
    assert end.describe("x") == (
        "AWS Batch job n (b2) FAILED x: status reason: Task failed to start; container: CannotPullContainerError: "
        "not found"
    )


def test_a_job_cancelled_before_it_started_has_only_a_reason() -> None:
    end = job_end({"jobName": "n", "jobId": "c3", "status": "FAILED", "statusReason": "cancelled by operator"})
    assert not end.ran and end.describe("x") == "AWS Batch job n (c3) FAILED x: status reason: cancelled by operator"
