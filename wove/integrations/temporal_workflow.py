"""The Temporal workflow that runs one wove run: it schedules one activity and ends the way that activity ends.

This module is imported inside Temporal's workflow sandbox, so it holds no state and has no side effects at import:
only the standard library and ``temporalio`` are imported. The activity itself lives in
``wove.integrations.temporal_worker`` and is referred to here by name only.

The workflow takes two arguments, both JSON-safe: the wove payload and the activity options the adapter built
(durations in seconds, the retry policy as a dict, the cancellation type by name), turned into
``workflow.execute_activity`` keyword arguments by :func:`activity_kwargs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

__all__ = ["ACTIVITY_NAME", "DURATION_OPTIONS", "WORKFLOW_NAME", "WoveRunWorkflow", "activity_kwargs"]

#: The workflow type every wove run starts.
WORKFLOW_NAME = "WoveRun"
#: The activity type that runs a payload; registered by ``wove.integrations.temporal_worker``.
ACTIVITY_NAME = "wove_run_payload"
#: Activity options given in seconds.
DURATION_OPTIONS = (
    "start_to_close_timeout",
    "schedule_to_close_timeout",
    "schedule_to_start_timeout",
    "heartbeat_timeout",
)
#: ``RetryPolicy`` fields given in seconds.
RETRY_DURATIONS = ("initial_interval", "maximum_interval")


def activity_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """``workflow.execute_activity`` keyword arguments from the JSON-safe options the adapter put in the input."""
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in DURATION_OPTIONS:
            kwargs[key] = timedelta(seconds=float(value))
        elif key == "retry_policy":
            policy = dict(value)
            for field in RETRY_DURATIONS:
                if policy.get(field) is not None:
                    policy[field] = timedelta(seconds=float(policy[field]))
            if policy.get("non_retryable_error_types") is not None:
                policy["non_retryable_error_types"] = list(policy["non_retryable_error_types"])
            kwargs[key] = RetryPolicy(**policy)
        elif key == "cancellation_type":
            kwargs[key] = workflow.ActivityCancellationType[str(value)]
        elif key in ("task_queue", "summary"):
            kwargs[key] = str(value)
        else:
            raise ValueError(f"unknown activity option {key!r}")
    return kwargs


@workflow.defn(name=WORKFLOW_NAME)
class WoveRunWorkflow:
    """One wove run: execute the payload in one activity; fail, or end cancelled, as that activity does."""

    @workflow.run
    async def run(self, payload: dict[str, Any], options: dict[str, Any]) -> None:
        try:
            kwargs = activity_kwargs(options)
        except (
            KeyError,
            TypeError,
            ValueError,
        ) as exc:  # fail the workflow; a failed workflow task would retry forever
            raise ApplicationError(f"invalid wove activity options: {exc!r}", non_retryable=True) from None
        await workflow.execute_activity(ACTIVITY_NAME, payload, **kwargs)
