"""The ``kubernetes_jobs`` backend, emulated: the official ``kubernetes`` client over real HTTP against the loopback
emulator of the API server, Job controller and kubelet in ``tests/services/k8s_emulator`` (no real API server can run
on the test machines). Every body wove submits is validated there by ``kubernetes-validate`` (Kubernetes 1.31), and
each Job's container runs as a local process.

With ``KUBECONFIG`` pointing at a real cluster (and the ``WOVE_K8S_TEST_*`` variables of
``tests/services/kubernetes.py`` set), the same tests run against that cluster; the few checks only the emulator can
make (the container's process, its request statistics) are then left out.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import wove
from tests.services.kubernetes import EMULATED_IMAGE, ROOT, KubernetesCluster
from wove import weave
from wove.errors import BackendUnavailableError, DeliveryLostError, RunCancelledError, SubmitError
from wove.integrations import get_adapter_class
from wove.integrations.kubernetes_jobs import KubernetesJobsAdapter

try:
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException
except ImportError:  # pragma: no cover - CI installs it; a missing client must fail there
    if os.environ.get("CI"):
        raise
    pytest.skip("kubernetes is not installed: pip install 'wove[kubernetes_jobs]'", allow_module_level=True)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

#: Long enough that a run which only ends by its delivery timeout fails the test by the test's own timeout.
NEVER = 600.0


def configure(cluster: KubernetesCluster, **settings: Any) -> None:
    environment_keys = {"delivery_timeout", "delivery_heartbeat_seconds", "retries"}
    environment = {key: settings.pop(key) for key in list(settings) if key in environment_keys}
    wove.config(
        environments={
            "default": {},
            "jobs": {
                "executor": "kubernetes_jobs",
                "executor_config": cluster.executor_config(**settings),
                **environment,
            },
        }
    )


@pytest.fixture
def api(kubernetes_cluster: KubernetesCluster) -> Iterator[Any]:
    client = kubernetes_cluster.api_client()
    try:
        yield client
    finally:
        client.close()


def job_of(record: Any) -> str:
    """The Job name of a run, from its record's ``submission`` (``namespace/name``)."""
    return str(record.submission).split("/", 1)[1]


def until(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def gone(read: Callable[[], Any]) -> bool:
    try:
        read()
    except ApiException as exc:
        return exc.status == 404
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# -- the weave -------------------------------------------------------------------------------------------------------


def test_registered_under_its_name() -> None:
    assert get_adapter_class("kubernetes_jobs") is KubernetesJobsAdapter


def test_emulated_local_remote_and_mapped_tasks(kubernetes_cluster: KubernetesCluster, api: Any) -> None:
    before = kubernetes_cluster.stats() if kubernetes_cluster.emulated else None
    configure(kubernetes_cluster, delivery_timeout=NEVER)
    with weave(n=5) as w:

        @w.do
        def items(n: int) -> list[int]:
            return list(range(n))

        @w.do(environment="jobs")
        def total(items: list[int]) -> tuple[int, int]:
            return sum(items), os.getpid()

        @w.do("items", environment="jobs")
        def squared(item: int) -> tuple[int, str]:
            return item * item, os.environ["HOSTNAME"]

        @w.do
        def summary(total: tuple[int, int], squared: list[tuple[int, str]]) -> tuple[int, int]:
            return total[0], sum(value for value, _ in squared)

    assert w.result.summary == (10, 30)
    assert w.result.total[1] != os.getpid()
    records = w.result.records["squared"]
    assert [r.status for r in records] == ["succeeded"] * 5
    names = [job_of(r) for r in records]
    assert len(set(names)) == 5 and all(name.startswith("wove-squared-") and len(name) <= 63 for name in names)
    batch = k8s.BatchV1Api(api)
    namespace = kubernetes_cluster.namespace

    def succeeded(name: str) -> Any:
        job = batch.read_namespaced_job(name, namespace)
        return job if job.status.succeeded else None

    for record, (_, hostname) in zip(records, w.result.squared, strict=True):
        # The worker posts its result, then exits: Kubernetes marks the Job succeeded a moment after the weave ended.
        job = until(lambda record=record: succeeded(job_of(record)))
        assert job.metadata.labels["wove-run-id"] == record.run_id
        assert job.spec.backoff_limit == 0 and job.spec.template.spec.restart_policy == "Never"
        assert hostname.startswith(job.metadata.name[:58])  # the pod, named after its Job, ran the task
    if before is not None:
        after = kubernetes_cluster.stats()
        assert after["validated"]["Job"] - before["validated"].get("Job", 0) == 6  # every Job passed validation
        assert after["rejected"] == before["rejected"]
        assert after["requests"].get("watch jobs", 0) >= 1 and after["requests"].get("watch pods", 0) >= 1


def test_emulated_remote_exception_keeps_its_type(kubernetes_cluster: KubernetesCluster) -> None:
    class StockError(Exception):
        """Raised by a task in a Job's pod; travels by value (the image need not have this module)."""

    configure(kubernetes_cluster, delivery_timeout=NEVER)
    with pytest.raises(StockError, match="out of pears"), weave() as w:

        @w.do(environment="jobs")
        def reserve() -> None:
            raise StockError("out of pears")

    assert w.result.records["reserve"][0].status == "failed"


async def running_job(task: str, core: Any, namespace: str) -> str:
    """The name of the Job whose pod runs ``task``, once it runs."""

    def running() -> str | None:
        pods = core.list_namespaced_pod(namespace, label_selector=f"wove-task={task}").items
        live = [pod for pod in pods if pod.status.phase == "Running" and not pod.metadata.deletion_timestamp]
        return str(live[0].metadata.labels["job-name"]) if live else None

    name: str = await asyncio.to_thread(until, running, 60)
    return name


async def test_emulated_cancel_deletes_the_job_and_stops_its_process(
    kubernetes_cluster: KubernetesCluster, api: Any, tmp_path: Path
) -> None:
    configure(kubernetes_cluster, delivery_timeout=NEVER)
    holder: dict[str, Any] = {}
    pid_file = tmp_path / "pid"

    async def run() -> None:
        async with weave(pid_file=str(pid_file)) as w:
            holder["w"] = w

            @w.do(environment="jobs")
            def sleeper(pid_file: str) -> None:
                Path(pid_file).write_text(str(os.getpid()))
                time.sleep(120)

    task = asyncio.ensure_future(run())
    batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    namespace = kubernetes_cluster.namespace
    name = await running_job("sleeper", core, namespace)
    if kubernetes_cluster.emulated:  # the container's process runs on this machine
        await asyncio.to_thread(until, pid_file.exists)
        pid = int(pid_file.read_text())
        assert alive(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (record,) = holder["w"].result.records["sleeper"]
    assert record.status == "cancelled" and job_of(record) == name
    await asyncio.to_thread(until, lambda: gone(lambda: batch.read_namespaced_job(name, namespace)))
    selector = f"wove-run-id={record.run_id}"
    await asyncio.to_thread(until, lambda: not core.list_namespaced_pod(namespace, label_selector=selector).items)
    if kubernetes_cluster.emulated:
        assert not alive(pid)  # the kubelet stopped the container's process before the pod went away
        deletions = [d for d in kubernetes_cluster.stats()["deletions"] if d["name"] == name]
        assert deletions == [
            {"resource": "jobs", "namespace": namespace, "name": name, "propagationPolicy": "Background"}
        ]


def test_emulated_bad_python_command_fails_fast_with_reason_and_output(kubernetes_cluster: KubernetesCluster) -> None:
    configure(kubernetes_cluster, python=["env", "python3-not-installed"], delivery_timeout=NEVER)
    with pytest.raises(DeliveryLostError) as info, weave() as w:

        @w.do(environment="jobs")
        def never_runs() -> int:
            return 1

    message = str(info.value)
    assert "failed before its worker reported an outcome" in message
    assert "BackoffLimitExceeded" in message and "exit code 127" in message
    assert "python3-not-installed" in message.split("--- last lines of the pod's output ---")[1]  # the log's tail
    assert w.result.records["never_runs"][0].status == "failed"


def test_emulated_missing_executable_is_a_start_error(kubernetes_cluster: KubernetesCluster) -> None:
    configure(kubernetes_cluster, python="/nonexistent/bin/python", delivery_timeout=NEVER)
    with pytest.raises(DeliveryLostError, match=r"exit code 12[78]") as info, weave() as w:

        @w.do(environment="jobs")
        def never_runs() -> int:
            return 1

    assert "/nonexistent/bin/python" in str(info.value)


def test_emulated_missing_image_fails_fast_and_deletes_the_job(kubernetes_cluster: KubernetesCluster, api: Any) -> None:
    configure(kubernetes_cluster, image="registry.example/wove/no-such-image:1", delivery_timeout=NEVER)
    with pytest.raises(DeliveryLostError, match="could not start its worker") as info, weave() as w:

        @w.do(environment="jobs")
        def never_runs() -> int:
            return 1

    assert re.search(r"(ErrImagePull|ImagePullBackOff).*no-such-image", str(info.value))
    name = job_of(w.result.records["never_runs"][0])
    until(lambda: gone(lambda: k8s.BatchV1Api(api).read_namespaced_job(name, kubernetes_cluster.namespace)))


def test_emulated_unschedulable_pod_fails_at_the_active_deadline(kubernetes_cluster: KubernetesCluster) -> None:
    configure(
        kubernetes_cluster,
        pod_spec={"nodeSelector": {"wove.test/no-such-node": "true"}},
        active_deadline_seconds=1,
        delivery_timeout=NEVER,
    )
    with (
        pytest.raises(DeliveryLostError, match="DeadlineExceeded: Job was active longer than specified deadline"),
        weave() as w,
    ):

        @w.do(environment="jobs")
        def never_runs() -> int:
            return 1


def test_emulated_completed_job_without_a_result_is_an_error(kubernetes_cluster: KubernetesCluster) -> None:
    configure(kubernetes_cluster, python="true", delivery_timeout=NEVER)  # exits 0 without running the worker
    with pytest.raises(DeliveryLostError, match="completed but its worker never reported an outcome"), weave() as w:

        @w.do(environment="jobs")
        def never_runs() -> int:
            return 1


async def test_emulated_job_deleted_by_someone_else_ends_the_run(
    kubernetes_cluster: KubernetesCluster, api: Any
) -> None:
    configure(kubernetes_cluster, delivery_timeout=NEVER)
    holder: dict[str, Any] = {}

    async def run() -> None:
        async with weave() as w:
            holder["w"] = w

            @w.do(environment="jobs")
            def victim() -> None:
                time.sleep(120)

    task = asyncio.ensure_future(run())
    namespace = kubernetes_cluster.namespace
    name = await running_job("victim", k8s.CoreV1Api(api), namespace)
    batch = k8s.BatchV1Api(api)
    await asyncio.to_thread(batch.delete_namespaced_job, name, namespace, propagation_policy="Background")
    with pytest.raises(RunCancelledError):
        await task
    assert [r.status for r in holder["w"].result.records["victim"]] == ["cancelled"]


def test_emulated_one_megabyte_argument_goes_by_reference(kubernetes_cluster: KubernetesCluster, api: Any) -> None:
    configure(kubernetes_cluster, delivery_timeout=NEVER)
    blob = os.urandom(1024 * 1024)
    with weave(blob=blob) as w:

        @w.do(environment="jobs")
        def echo(blob: bytes) -> tuple[int, bytes]:
            return len(blob), blob[-16:]

    assert w.result.echo == (len(blob), blob[-16:])
    job = k8s.BatchV1Api(api).read_namespaced_job(job_of(w.result.records["echo"][0]), kubernetes_cluster.namespace)
    (payload,) = [env.value for env in job.spec.template.spec.containers[0].env if env.name == "WOVE_BACKEND_PAYLOAD"]
    assert len(payload) < 16 * 1024  # the megabyte stayed on the callback server; the worker fetched it


def test_emulated_payload_in_a_secret_owned_by_the_job(kubernetes_cluster: KubernetesCluster, api: Any) -> None:
    before = kubernetes_cluster.stats() if kubernetes_cluster.emulated else None
    configure(kubernetes_cluster, payload_secret=True, delivery_timeout=NEVER)
    with weave(word="pear") as w:

        @w.do(environment="jobs")
        def shout(word: str) -> str:
            return word.upper()

    assert w.result.shout == "PEAR"
    name, namespace = job_of(w.result.records["shout"][0]), kubernetes_cluster.namespace
    batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    job = batch.read_namespaced_job(name, namespace)
    (env,) = [env for env in job.spec.template.spec.containers[0].env if env.name == "WOVE_BACKEND_PAYLOAD"]
    assert env.value is None and env.value_from.secret_key_ref.name == name
    secret = core.read_namespaced_secret(name, namespace)
    assert secret.immutable and [(o.kind, o.name, o.uid) for o in secret.metadata.owner_references] == [
        ("Job", name, job.metadata.uid)
    ]
    if before is not None:  # the Secret as created, then as patched with its owner: both passed validation
        after = kubernetes_cluster.stats()
        assert after["validated"]["Secret"] - before["validated"].get("Secret", 0) == 2
        assert after["rejected"] == before["rejected"]
    batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
    until(lambda: gone(lambda: core.read_namespaced_secret(name, namespace)))  # the garbage collector took it along


# -- what the API server refuses -------------------------------------------------------------------------------------


def test_emulated_api_server_refuses_an_invalid_job_with_422(kubernetes_cluster: KubernetesCluster, api: Any) -> None:
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "wove-invalid-restart-policy"},
        "spec": {"template": {"spec": {"containers": [{"name": "main", "image": kubernetes_cluster.image}]}}},
    }
    with pytest.raises(ApiException) as info:
        k8s.BatchV1Api(api).create_namespaced_job(kubernetes_cluster.namespace, body)
    assert info.value.status == 422
    status = json.loads(info.value.body)
    assert status["reason"] == "Invalid"
    assert "spec.template.spec.restartPolicy" in status["message"]


def test_emulated_jobs_deleted_without_a_policy_orphan_their_pods(
    kubernetes_cluster: KubernetesCluster, api: Any
) -> None:
    """Why wove deletes with ``propagationPolicy: Background``: the API's default for Jobs leaves their pods running."""
    batch, core, namespace = k8s.BatchV1Api(api), k8s.CoreV1Api(api), kubernetes_cluster.namespace
    name = f"wove-orphan-{os.getpid()}-{int(time.time())}"
    command = [kubernetes_cluster.python] if isinstance(kubernetes_cluster.python, str) else kubernetes_cluster.python
    container = {
        "name": "main",
        "image": kubernetes_cluster.image,
        "command": [*command, "-c", "import time; time.sleep(60)"],
    }
    template = {"spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [container]}}
    batch.create_namespaced_job(
        namespace, {"metadata": {"name": name}, "spec": {"backoffLimit": 0, "template": template}}
    )

    def running_pod() -> Any:
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        return pods[0] if pods and pods[0].status.phase == "Running" else None

    pod = until(running_pod, 60)
    assert [(ref.kind, ref.name, ref.controller) for ref in pod.metadata.owner_references] == [("Job", name, True)]
    batch.delete_namespaced_job(name, namespace)
    until(lambda: gone(lambda: batch.read_namespaced_job(name, namespace)))
    orphan = until(
        lambda: (p := core.read_namespaced_pod(pod.metadata.name, namespace)).metadata.owner_references is None and p
    )
    assert orphan.status.phase == "Running"
    core.delete_namespaced_pod(pod.metadata.name, namespace)
    until(lambda: gone(lambda: core.read_namespaced_pod(pod.metadata.name, namespace)))


def test_emulated_invalid_override_is_refused_with_the_servers_message(kubernetes_cluster: KubernetesCluster) -> None:
    configure(kubernetes_cluster, container={"env": [{"name": "1-not-a-name", "value": "x"}]})
    with (
        pytest.raises(SubmitError, match=r"HTTP 422 Invalid: .*env\[\d\]\.name: Invalid value: \"1-not-a-name\""),
        weave() as w,
    ):

        @w.do(environment="jobs")
        def never_runs() -> int:
            return 1


def test_emulated_misspelt_override_is_refused(kubernetes_cluster: KubernetesCluster) -> None:
    configure(kubernetes_cluster, container={"resourcez": {"limits": {"cpu": "1"}}})
    with pytest.raises(SubmitError, match="resourcez"), weave() as w:

        @w.do(environment="jobs")
        def never_runs() -> int:
            return 1


def test_emulated_wrong_credentials_are_reported_at_start(kubernetes_cluster: KubernetesCluster, api: Any) -> None:
    configuration = copy.copy(api.configuration)  # the cluster's address and CA, someone else's token
    configuration.cert_file = configuration.key_file = configuration.refresh_api_key_hook = None
    configuration.api_key = {"BearerToken": "not-the-token"}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    config = kubernetes_cluster.executor_config(api_client=k8s.ApiClient(configuration))
    config.pop("kubeconfig", None)
    config.pop("context", None)
    wove.config(environments={"default": {}, "jobs": {"executor": "kubernetes_jobs", "executor_config": config}})
    refused = "HTTP 401 Unauthorized.*credentials were refused"
    with pytest.raises(BackendUnavailableError, match=refused) as info, weave() as w:

        @w.do(environment="jobs")
        def never_runs() -> int:
            return 1

    assert "not-the-token" not in str(info.value)


def test_emulated_unreachable_api_server_is_reported_at_start(tmp_path: Path) -> None:
    from tests.services.base import free_port

    server = f"http://127.0.0.1:{free_port()}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "gone", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}],
        "current-context": "gone",
    }
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    wove.config(
        environments={
            "default": {},
            "jobs": {"executor": "kubernetes_jobs", "executor_config": {"image": "x:1", "kubeconfig": str(kubeconfig)}},
        }
    )
    with pytest.raises(BackendUnavailableError, match=f"namespace 'default' at {server}"), weave() as w:

        @w.do(environment="jobs")
        def never_runs() -> int:
            return 1


def test_emulated_documented_example_runs(kubernetes_cluster: KubernetesCluster, tmp_path: Path) -> None:
    if not kubernetes_cluster.emulated:
        pytest.skip("the example's weave listens on loopback, which a real cluster's pods cannot reach")
    page = (ROOT / "docs" / "backends" / "kubernetes_jobs.md").read_text()
    example = next(block for block in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "weave(" in block)
    script = tmp_path / "example.py"
    script.write_text(example)
    config = kubernetes_cluster.executor_config()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WOVE_IMAGE": config["image"],
        "WOVE_PYTHON": config["python"] if isinstance(config["python"], str) else " ".join(config["python"]),
    }
    if kubernetes_cluster.kubeconfig is not None:
        env["KUBECONFIG"] = str(kubernetes_cluster.kubeconfig)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=80, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    assert (
        "total 15.0" in done.stdout
        and f"Job of the first run: {kubernetes_cluster.namespace}/wove-price-" in done.stdout
    )
    assert "Error" not in done.stderr and "Traceback" not in done.stderr, done.stderr  # a clean exit


# -- the watch --------------------------------------------------------------------------------------------------------


async def test_emulated_watch_lists_again_when_its_version_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API server keeps one change of history here, and the follower's second watch is held back while Jobs are
    created and deleted: resuming is then refused (410 Gone), and the follower must list again and report every change
    it missed: the new Jobs as they ended, the deleted one as DELETED."""
    from tests.services.kubernetes import KubernetesEmulator
    from wove.integrations import _kubernetes_watch

    monkeypatch.setattr(_kubernetes_watch, "WATCH_SECONDS", 1)
    emulator = KubernetesEmulator(tmp_path, options=("--history", "1")).start()
    client = emulator.cluster().api_client()
    batch = k8s.BatchV1Api(client)
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    relists = 0
    hold, held, gate = threading.Event(), threading.Event(), threading.Event()
    relist, watch_from = _kubernetes_watch.ObjectWatch._relist, _kubernetes_watch.ObjectWatch._watch_from

    def counted_relist(self: Any) -> str:
        nonlocal relists
        relists += 1
        return relist(self)

    def gated_watch(self: Any, version: str) -> str:
        if hold.is_set() and not gate.is_set():
            held.set()
            gate.wait(30)
        return watch_from(self, version)

    monkeypatch.setattr(_kubernetes_watch.ObjectWatch, "_relist", counted_relist)
    monkeypatch.setattr(_kubernetes_watch.ObjectWatch, "_watch_from", gated_watch)
    follower = _kubernetes_watch.ObjectWatch(
        batch.list_namespaced_job,
        namespace="wove-tests",
        label_selector="suite=watch",
        loop=asyncio.get_running_loop(),
        handler=lambda kind, obj: seen.__setitem__(obj["metadata"]["name"], (kind, obj)),
        what="jobs",
    )

    def create(name: str) -> None:
        container = {"name": "main", "image": EMULATED_IMAGE, "command": ["true"]}
        template = {
            "metadata": {"labels": {"suite": "watch"}},
            "spec": {"restartPolicy": "Never", "containers": [container]},
        }
        body = {
            "metadata": {"name": name, "labels": {"suite": "watch"}},
            "spec": {"backoffLimit": 0, "template": template},
        }
        batch.create_namespaced_job("wove-tests", body)

    def complete(name: str) -> bool:
        kind, obj = seen.get(name, ("", {}))
        return kind != "DELETED" and any(
            c["type"] == "Complete" for c in (obj.get("status") or {}).get("conditions", ())
        )

    async def wait_for(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.02)

    try:
        follower.start()
        await asyncio.to_thread(create, "watched-first")
        await wait_for(lambda: complete("watched-first"))  # seen through a watch
        hold.set()
        await wait_for(held.is_set)  # that watch ended (after a second at most); the next one waits at the gate
        later = [f"watched-{index}" for index in range(3)]
        for name in later:
            await asyncio.to_thread(create, name)
        await asyncio.to_thread(
            batch.delete_namespaced_job, "watched-first", "wove-tests", propagation_policy="Background"
        )
        await asyncio.sleep(1)  # the new Jobs run and complete, unseen
        assert not any(name in seen for name in later)
        listed = relists
        gate.set()
        await wait_for(lambda: all(complete(name) for name in later) and seen["watched-first"][0] == "DELETED")
        assert relists == listed + 1  # the held-back watch was refused, and the follower listed again
    finally:
        gate.set()
        await asyncio.to_thread(follower.stop)
        client.close()
        emulator.stop()
