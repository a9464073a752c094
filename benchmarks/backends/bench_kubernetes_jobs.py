"""Kubernetes Jobs, emulated: a trivial function as a native Job and as a wove remote task, side by side.

No real API server runs on the test machines, so both sides use the emulated API server, Job controller and kubelet
of ``tests/services/k8s_emulator`` (containers run as local processes), through the official ``kubernetes`` client.

Native: ``create_namespaced_job`` for a Job whose container runs ``python -c "...echo(i)"``, then a watch on that Job
until it is ``Complete`` (Kubernetes has no result channel: a native caller knows only that the Job finished); ``N`` at
once: ``N`` Jobs created, then one watch until all are ``Complete``. Wove: a weave with one remote task on the
``kubernetes_jobs`` backend (the value comes back over the callback server), one after the other, then one weave
mapping ``N`` items. Native and wove calls alternate one by one (after 20 warm-up calls each), then three bursts each
way, so both sides meet the same load of a shared machine; medians are reported.

Run: python -m benchmarks.backends.bench_kubernetes_jobs [--sequential 20] [--concurrent 10]
"""

from __future__ import annotations

import importlib
import tempfile
import uuid
from pathlib import Path
from typing import Any

from benchmarks.backends._side_by_side import command_line, compare_interleaved, print_table

ENGINE = "kubernetes_jobs (emulated)"
#: Caps on the counts (each Job is a local process).
MAX_SEQUENTIAL, MAX_CONCURRENT = 50, 20


def echo(value: int) -> int:
    """The function both sides run."""
    return value


def _native_job(name: str, batch_label: str, value: int, cluster: Any) -> dict[str, Any]:
    code = f"from benchmarks.backends.bench_kubernetes_jobs import echo; echo({value})"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"bench-batch": batch_label}},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 30,
            "template": {
                "metadata": {"labels": {"bench-batch": batch_label}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": cluster.image,
                            "command": [cluster.python, "-c", code],
                            "env": cluster.container_env,
                        }
                    ],
                },
            },
        },
    }


class NativeJobs:
    """Kubernetes' own way: create Jobs with the official client, watch them until ``Complete``."""

    def __init__(self, cluster: Any, api: Any) -> None:
        from kubernetes import client

        self.cluster = cluster
        self.batch = client.BatchV1Api(api)

    def call(self, value: int) -> int:
        return self.burst_of([value])[0]

    def burst(self, n: int) -> list[int]:
        return self.burst_of(list(range(n)))

    def burst_of(self, values: list[int]) -> list[int]:
        import json

        from kubernetes import watch

        label = uuid.uuid4().hex[:12]
        versions = []
        for value in values:
            body = _native_job(f"native-{label}-{value}", label, value, self.cluster)
            created = self.batch.create_namespaced_job(self.cluster.namespace, body, _preload_content=False)
            versions.append(json.loads(created.data)["metadata"]["resourceVersion"])
        done: set[str] = set()
        stream = watch.Watch(return_type="object")
        for event in stream.stream(
            self.batch.list_namespaced_job,
            self.cluster.namespace,
            label_selector=f"bench-batch={label}",
            resource_version=versions[0],  # every later change of these Jobs comes after their first creation
            timeout_seconds=120,
        ):
            conditions = (event["object"].get("status") or {}).get("conditions") or ()
            if any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions):
                done.add(event["object"]["metadata"]["name"])
                if len(done) == len(values):
                    stream.stop()
        if len(done) != len(values):
            raise RuntimeError(f"only {len(done)} of {len(values)} native Jobs completed")
        return values


def run(sequential: int = 20, concurrent: int = 10) -> list[dict[str, Any]]:
    """One row: native Jobs against wove on Kubernetes Jobs, call by call, on an emulator started (and stopped) here.

    Every Job is a process on this machine, so at most ``MAX_SEQUENTIAL`` round trips and ``MAX_CONCURRENT`` Jobs at
    once are measured, whatever is asked (``python -m benchmarks.backends`` asks every engine for hundreds).
    """
    from tests.services.kubernetes import KubernetesEmulator

    sequential, concurrent = min(sequential, MAX_SEQUENTIAL), min(concurrent, MAX_CONCURRENT)
    # The function by its importable name, as a user's module function would be (also when run as a script).
    func = importlib.import_module("benchmarks.backends.bench_kubernetes_jobs").echo
    with tempfile.TemporaryDirectory(prefix="wove-bench-k8s-") as tmp:
        emulator = KubernetesEmulator(Path(tmp)).start()
        cluster = emulator.cluster()
        api = cluster.api_client()
        environment = {
            "executor": "kubernetes_jobs",
            "executor_config": cluster.executor_config(ttl_seconds_after_finished=30),
            "delivery_timeout": 120,
        }
        try:
            return [compare_interleaved(ENGINE, NativeJobs(cluster, api), environment, func, sequential, concurrent)]
        finally:
            api.close()
            emulator.stop()


if __name__ == "__main__":
    args = command_line(__doc__, sequential=20, concurrent=10).parse_args()
    rows = run(args.sequential, args.concurrent)
    print_table(
        rows,
        note="emulated API server, Job controller and kubelet on this machine; see docs/backends/kubernetes_jobs.md",
    )
