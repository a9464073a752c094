"""``JobController``: keeps each Job's pods and status in line with its spec, as kube-controller-manager does.

For a Job that is neither suspended nor finished it creates pods from the template (``<job>-<5 chars>``, owned by the
Job, labelled with its ``controller-uid`` and ``job-name``) until ``min(parallelism, completions - succeeded)`` run,
counts succeeded and failed pods, and writes ``status``: ``active``, ``ready``, ``succeeded``, ``failed``,
``terminating``, ``startTime``, ``completionTime`` and the conditions:

* more failed pods than ``backoffLimit``: ``FailureTarget``, then (once no pod runs) ``Failed``, both with reason
  ``BackoffLimitExceeded`` and message "Job has reached the specified backoff limit";
* running longer than ``activeDeadlineSeconds``: its pods are deleted, then ``Failed`` with ``DeadlineExceeded``
  ("Job was active longer than specified deadline");
* ``completions`` pods succeeded: ``SuccessCriteriaMet`` and ``Complete`` (``CompletionsReached``, "Reached expected
  number of succeeded pods").

A replacement pod after a failure waits ``backoff * 2**(failures-1)`` seconds (10 s in Kubernetes, ``--backoff`` here).
A finished Job with ``ttlSecondsAfterFinished`` is deleted (background propagation) that many seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.services.k8s_emulator.admission import generated_name
from tests.services.k8s_emulator.cluster import Cluster
from tests.services.k8s_emulator.status import ApiError
from tests.services.k8s_emulator.store import JOBS, PODS, Change, now

logger = logging.getLogger("k8s_emulator.jobs")

TERMINAL = ("Succeeded", "Failed")


@dataclass
class _JobState:
    """What the controller remembers of one Job (by uid) between syncs."""

    succeeded: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    started: float | None = None  # monotonic time of startTime
    next_pod: float = 0.0  # monotonic time before which no replacement pod is created
    failures_seen: int = 0
    deadline: asyncio.TimerHandle | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    ttl_set: bool = False


class JobController:
    """Subscribes to the store and syncs a Job whenever it or one of its pods changes."""

    def __init__(self, cluster: Cluster, loop: asyncio.AbstractEventLoop, *, backoff: float = 0.5) -> None:
        self.cluster = cluster
        self.store = cluster.store
        self.loop = loop
        self.backoff = backoff
        self._queued: set[tuple[str, str]] = set()
        self._jobs: dict[str, _JobState] = {}
        self.store.subscribe(self._on_change)

    def _on_change(self, change: Change) -> None:
        meta = change.obj["metadata"]
        if change.resource is JOBS:
            if change.type == "DELETED":
                state = self._jobs.pop(meta["uid"], None)
                for timer in [*state.timers, state.deadline] if state else ():
                    if timer is not None:
                        timer.cancel()
            else:
                self._queue(meta["namespace"], meta["name"])
        elif change.resource is PODS:
            for ref in meta.get("ownerReferences") or ():
                if ref.get("kind") == "Job" and ref.get("controller"):
                    self._queue(meta["namespace"], ref["name"])

    def _queue(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if key not in self._queued:
            self._queued.add(key)
            self.loop.call_soon(self._sync, key)

    def _sync(self, key: tuple[str, str]) -> None:
        self._queued.discard(key)
        job = self.store.peek(JOBS, *key)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        try:
            self._reconcile(copy.deepcopy(job))
        except ApiError as exc:
            logger.warning("syncing Job %s/%s failed: %s", key[0], key[1], exc.message)

    def _later(self, state: _JobState, delay: float, namespace: str, name: str) -> None:
        state.timers.append(self.loop.call_later(max(delay, 0.0), self._queue, namespace, name))

    def _reconcile(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job["spec"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        state = self._jobs.setdefault(uid, _JobState())
        status = copy.deepcopy(job.get("status") or {})
        if _condition(status, "Complete") or _condition(status, "Failed"):
            self._expire(job, state)
            return
        pods = [
            pod
            for pod in self.store.select(PODS, namespace)
            if any(
                ref.get("uid") == uid and ref.get("controller") for ref in pod["metadata"].get("ownerReferences") or ()
            )
        ]
        for pod in pods:
            phase = (pod.get("status") or {}).get("phase")
            if phase == "Succeeded":
                state.succeeded.add(pod["metadata"]["uid"])
            elif phase == "Failed":
                state.failed.add(pod["metadata"]["uid"])
        if len(state.failed) > state.failures_seen:
            state.failures_seen = len(state.failed)
            state.next_pod = time.monotonic() + self.backoff * 2 ** (len(state.failed) - 1)
        active = [p for p in pods if _phase(p) not in TERMINAL and not p["metadata"].get("deletionTimestamp")]
        terminating = [p for p in pods if _phase(p) not in TERMINAL and p["metadata"].get("deletionTimestamp")]
        if spec.get("suspend"):
            for pod in active:
                self.cluster.delete(PODS, namespace, pod["metadata"]["name"], policy="Background")
            self._write(job, status, active=[], terminating=terminating + active, state=state)
            return
        if not status.get("startTime"):
            status["startTime"] = now()
        if state.started is None:
            state.started = time.monotonic()
        failure = _condition(status, "FailureTarget")
        failure_reason = (failure or {}).get("reason")
        if failure is None and len(state.failed) > int(spec.get("backoffLimit", 6)):
            failure_reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
            _set_condition(status, "FailureTarget", failure_reason, message)
        deadline = spec.get("activeDeadlineSeconds")
        if failure_reason is None and deadline is not None:
            remaining = state.started + float(deadline) - time.monotonic()
            if remaining <= 0:
                failure_reason, message = "DeadlineExceeded", "Job was active longer than specified deadline"
                _set_condition(status, "FailureTarget", failure_reason, message)
            elif state.deadline is None:
                state.deadline = self.loop.call_later(remaining + 0.01, self._queue, namespace, name)
        completions = spec.get("completions")
        if failure_reason is not None:
            for pod in active:
                self.cluster.delete(PODS, namespace, pod["metadata"]["name"], policy="Background")
            terminating += active
            active = []
            if not terminating:
                target = _condition(status, "FailureTarget") or {}
                _set_condition(status, "Failed", str(target.get("reason")), str(target.get("message")))
        elif completions is not None and len(state.succeeded) >= int(completions):
            for pod in active:
                self.cluster.delete(PODS, namespace, pod["metadata"]["name"], policy="Background")
            terminating += active
            active = []
            message = "Reached expected number of succeeded pods"
            _set_condition(status, "SuccessCriteriaMet", "CompletionsReached", message)
            if not terminating:
                _set_condition(status, "Complete", "CompletionsReached", message)
                status["completionTime"] = now()
        else:
            parallelism = int(spec.get("parallelism", 1))
            wanted = parallelism if completions is None else min(parallelism, int(completions) - len(state.succeeded))
            missing = wanted - len(active)
            if missing > 0:
                wait = state.next_pod - time.monotonic()
                if wait > 0:
                    self._later(state, wait, namespace, name)
                else:
                    for _ in range(missing):
                        active.append(self._create_pod(job))
        self._write(job, status, active=active, terminating=terminating, state=state)

    def _create_pod(self, job: dict[str, Any]) -> dict[str, Any]:
        meta, template = job["metadata"], job["spec"]["template"]
        logger.debug("Job %s/%s: creating a pod", meta["namespace"], meta["name"])
        base = f"{meta['name']}-"
        template_meta = template.get("metadata") or {}
        pod = {
            "metadata": {
                "name": generated_name(base),
                "generateName": base,
                "namespace": meta["namespace"],
                "uid": str(uuid.uuid4()),
                "labels": dict(template_meta.get("labels") or {}),
                "annotations": {**(template_meta.get("annotations") or {}), "batch.kubernetes.io/job-tracking": ""},
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": copy.deepcopy(template["spec"]),
            "status": {"phase": "Pending", "qosClass": "BestEffort"},
        }
        return self.store.create(PODS, pod)

    def _write(
        self,
        job: dict[str, Any],
        status: dict[str, Any],
        *,
        active: list[dict[str, Any]],
        terminating: list[dict[str, Any]],
        state: _JobState,
    ) -> None:
        status["active"] = len(active)
        status["ready"] = sum(1 for pod in active if _ready(pod))
        status["terminating"] = len(terminating)
        status["succeeded"] = len(state.succeeded)
        status["failed"] = len(state.failed)
        status["uncountedTerminatedPods"] = {}
        for key in ("active", "succeeded", "failed"):  # the API server leaves zero counts out
            if not status[key]:
                del status[key]
        if status != (job.get("status") or {}):
            job["status"] = status
            self.store.replace(JOBS, job)

    def _expire(self, job: dict[str, Any], state: _JobState) -> None:
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        if ttl is None or state.ttl_set:
            return
        state.ttl_set = True
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]

        def expire() -> None:
            with contextlib.suppress(ApiError):  # deleted meanwhile
                self.cluster.delete(JOBS, namespace, name, policy="Background")

        state.timers.append(self.loop.call_later(float(ttl), expire))


def _phase(pod: dict[str, Any]) -> str | None:
    return (pod.get("status") or {}).get("phase")


def _ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or ()
    )


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in status.get("conditions") or ():
        if condition.get("type") == kind and condition.get("status") == "True":
            return dict(condition)
    return None


def _set_condition(status: dict[str, Any], kind: str, reason: str, message: str) -> None:
    if _condition(status, kind) is not None:
        return
    stamp = now()
    condition = {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": stamp,
        "lastTransitionTime": stamp,
    }
    status["conditions"] = [*(status.get("conditions") or []), condition]
