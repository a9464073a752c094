"""``KubernetesJobsAdapter``: runs each payload as its own Kubernetes Job (``batch/v1``), one pod, one container.

The container runs ``python -m wove.backend_worker`` in the configured image with the payload in the environment
variable ``WOVE_BACKEND_PAYLOAD`` (or, with ``payload_secret``, read from a Secret the Job owns). The worker posts
its events straight to wove's callback server, so a Job's status is only read to learn what the worker cannot say:
one watch on Jobs and one on pods per environment (label ``wove-instance=<id>``) catch a Job that fails before or
around its worker (image pull errors, a bad command, ``activeDeadlineSeconds``, a crash, deletion by someone else)
within moments, and the run ends with ``DeliveryLostError`` carrying Kubernetes' reason and the pod's last log lines.

Cancelling deletes the Job with ``propagationPolicy=Background``: Kubernetes deletes its pod, the kubelet stops the
container (SIGTERM, then SIGKILL after the pod's grace period) and the garbage collector removes a payload Secret.

All client calls run in worker threads (``run_blocking``); the client is created once, in ``start``. The keys of
``executor_config`` are described in ``docs/backends/kubernetes_jobs.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import uuid
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from wove._types import Frame
from wove.errors import BackendUnavailableError, ConfigError, PayloadError, SubmitError, WoveError
from wove.integrations._kubernetes_manifest import (
    CONTAINER_NAME,
    INSTANCE_LABEL,
    MANAGED_BY,
    PAYLOAD_ENV,
    RUN_LABEL,
    build_job,
    build_secret,
    describe_failure,
    describe_waiting,
    finished_condition,
    job_name,
    owner_reference,
    parse_settings,
    run_labels,
)
from wove.integrations._kubernetes_watch import ObjectWatch
from wove.integrations.base import BackendAdapter

__all__ = ["KubernetesJob", "KubernetesJobsAdapter"]

logger = logging.getLogger("wove.integrations.kubernetes_jobs")

#: Largest payload text an environment variable holds: Linux caps one ``NAME=value`` string at 128 KiB.
ENV_VALUE_LIMIT = 128 * 1024 - len(PAYLOAD_ENV) - 2
#: Largest payload a Secret holds (the API server refuses Secrets over 1 MiB).
SECRET_VALUE_LIMIT = 1024 * 1024 - 1024
#: Container states that mean the worker will not start without someone changing something; the Job is deleted and
#: the run fails at once rather than waiting in back-off. ``ErrImagePull`` can be a passing registry outage: the
#: task's ``retries`` decide whether to try again.
FATAL_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
#: Seconds a Job reported ``Complete`` may wait for its worker's result before the run fails. The worker posts its
#: result before it exits, so the result is normally in long before Kubernetes reports the Job complete.
RESULT_GRACE = 2.0
#: Seconds for one API call.
REQUEST_TIMEOUT = (10.0, 30.0)
#: Bytes of a failed pod's log read back.
LOG_BYTES = 16 * 1024
#: Where a pod finds its own namespace (``in_cluster``).
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: The client's connection keys; ``api_client`` excludes the rest.
CONNECTION_KEYS = ("kubeconfig", "context", "in_cluster")


@dataclass(frozen=True)
class KubernetesJob:
    """One run's Job; the weave's records show it as ``namespace/name`` (the run's ``submission``)."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(eq=False)
class _Run:
    run_id: str
    task_id: Any
    name: str
    selector: str  # the label selector of its pod
    job: dict[str, Any] | None = field(default=None, repr=False)  # the latest Job object seen
    pod: dict[str, Any] | None = field(default=None, repr=False)  # the latest pod object seen
    ended: bool = False  # it has its outcome, was cancelled, or the end Kubernetes saw is being reported


class KubernetesJobsAdapter(BackendAdapter):
    """Creates one Kubernetes Job per payload with the official ``kubernetes`` client; deletes it to cancel."""

    backend: ClassVar[str] = "kubernetes_jobs"
    required_modules: ClassVar[tuple[str, ...]] = ("kubernetes",)
    install_hint: ClassVar[str] = "pip install 'wove[kubernetes_jobs]'"
    #: The payload travels in an environment variable (at most 128 KiB on Linux) inside a Job object anyone who may
    #: read Jobs can see. 64 KiB of pickles keeps it well inside that; larger bodies are fetched by the worker.
    inline_payload_limit: ClassVar[int | None] = 64 * 1024

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = parse_settings(self.config)
        self._given_client: Any = self.config.get("api_client")
        if self._given_client is not None:
            if not callable(getattr(self._given_client, "call_api", None)):
                raise ConfigError(
                    f"executor_config['api_client'] must be a kubernetes.client.ApiClient, got {self._given_client!r}"
                )
            clash = [key for key in CONNECTION_KEYS if self.config.get(key)]
            if clash:
                raise ConfigError(
                    f"executor_config['api_client'] excludes {', '.join(clash)}: the client is used as is"
                )
        in_cluster = self.config.get("in_cluster", False)
        if not isinstance(in_cluster, bool):
            raise ConfigError(f"executor_config['in_cluster'] must be True or False, got {in_cluster!r}")
        if in_cluster and (self.config.get("kubeconfig") or self.config.get("context")):
            raise ConfigError("executor_config['in_cluster'] excludes 'kubeconfig' and 'context'")
        for key in ("kubeconfig", "context"):
            if self.config.get(key) is not None and not isinstance(self.config[key], (str, Path)):
                raise ConfigError(f"executor_config[{key!r}] must be a string, got {self.config[key]!r}")
        self.in_cluster = in_cluster
        #: Labels this environment's Jobs carry, and so the selector of its watches.
        self.instance = uuid.uuid4().hex[:12]
        self.selector = f"{MANAGED_BY}=wove,{INSTANCE_LABEL}={self.instance}"
        self.namespace = self.settings.namespace or "default"
        self.api_client: Any = None
        self.batch: Any = None
        self.core: Any = None
        self._runs: dict[str, _Run] = {}  # runs still waiting for an outcome, by Job name
        self._by_run: dict[str, _Run] = {}  # the same, by run id
        self._watches: list[ObjectWatch] = []
        self._reports: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- adapter contract ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the client, check it may list Jobs and pods in the namespace, then start watching both."""
        self.api_client, self.namespace = await self._connect()
        client: Any = importlib.import_module("kubernetes.client")
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        with self._unavailable("listing Jobs and pods"):
            for lister in (self.batch.list_namespaced_job, self.core.list_namespaced_pod):
                await self.run_blocking(
                    lister,
                    self.namespace,
                    label_selector=self.selector,
                    limit=1,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
        loop = asyncio.get_running_loop()
        for lister, handler, what in (
            (self.batch.list_namespaced_job, self._on_job, "jobs"),
            (self.core.list_namespaced_pod, self._on_pod, "pods"),
        ):
            watch = ObjectWatch(
                lister, namespace=self.namespace, label_selector=self.selector, loop=loop, handler=handler, what=what
            )
            watch.start()
            self._watches.append(watch)

    async def submit(self, payload: Frame, frame: Frame) -> KubernetesJob:
        """Create the run's Job (and first its payload Secret, with ``payload_secret``); returns once it exists."""
        from wove.backend import payload_to_b64

        run_id, task_name = str(frame["run_id"]), str(frame.get("task_name") or "task")
        if self._closed:
            raise SubmitError("the kubernetes_jobs adapter is closed", environment=self.name, run_id=run_id)
        text = payload_to_b64(payload)
        self._check_size(text, run_id)
        name = job_name(self.settings.job_name_prefix, task_name, run_id)
        labels = run_labels(instance=self.instance, environment=self.name, task_name=task_name, run_id=run_id)
        run = _Run(run_id, frame.get("task_id"), name, f"{self.selector},{RUN_LABEL}={labels[RUN_LABEL]}")
        self._runs[name] = self._by_run[run_id] = run  # before the Job exists: its events may beat create's answer
        secret = self.settings.payload_secret
        created_secret = False
        try:
            with self._api_errors("creating the Job", run_id):
                if secret:
                    body = build_secret(name=name, namespace=self.namespace, labels=labels, payload=text)
                    await self.run_blocking(self._create, self.core.create_namespaced_secret, body)
                    created_secret = True
                job = build_job(
                    self.settings,
                    name=name,
                    namespace=self.namespace,
                    labels=labels,
                    task_name=task_name,
                    **({"secret": name} if secret else {"payload": text}),
                )
                created = await self.run_blocking(self._create, self.batch.create_namespaced_job, job)
        except asyncio.CancelledError:
            raise  # the Job may exist: it stays tracked, and runs or fails on its own
        except BaseException:
            self._forget(run)
            if created_secret:
                await self._quietly(f"deleting Secret {name}", self.core.delete_namespaced_secret, name, self.namespace)
            raise
        if secret:
            uid = created["metadata"]["uid"]
            patch = {"metadata": {"ownerReferences": [owner_reference(name, uid)]}}
            await self._quietly(
                f"making Job {name} the owner of its payload Secret",
                self.core.patch_namespaced_secret,
                name,
                self.namespace,
                patch,
                _content_type="application/merge-patch+json",
            )
        return KubernetesJob(self.namespace, name)

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """Delete the run's Job with background propagation: its pod is deleted and its container stopped."""
        if not isinstance(submission, KubernetesJob):
            return  # never created
        run = self._runs.get(submission.name)
        if run is not None:
            self._forget(run)
        with self._api_errors(f"deleting Job {submission}", run_id):
            await self.run_blocking(self._delete_job, submission.name)

    async def close(self) -> None:
        """Stop watching and close the client wove created. Jobs still running are left to their orphan policy."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(self.run_blocking(watch.stop) for watch in self._watches), return_exceptions=True)
        for task in list(self._reports):
            task.cancel()
        await asyncio.gather(*self._reports, return_exceptions=True)
        self._runs.clear()
        self._by_run.clear()
        if self.api_client is not None and self._given_client is None:
            await self._quietly("closing the client", self.api_client.close)

    def run_ended(self, run_id: str) -> None:
        """The run has its outcome (normally from its worker): stop following its Job and pod."""
        run = self._by_run.get(run_id)
        if run is not None:
            self._forget(run)

    # -- what the watches report (on the runtime loop) -----------------------------------------------------------------

    def _on_job(self, kind: str, job: dict[str, Any]) -> None:
        run = self._runs.get(str(job["metadata"]["name"]))
        if run is None or run.ended:
            return
        run.job = job
        condition = finished_condition(job)
        if condition is not None and condition["type"] == "Failed":
            self._end(run, self._report_failed(run))
        elif condition is not None:
            self._end(run, self._report_unanswered(run))
        elif kind == "DELETED":
            self._end(run, self._report_deleted(run))

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        labels = pod["metadata"].get("labels") or {}
        run = self._runs.get(str(labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")))
        if run is None or run.ended or kind == "DELETED":
            return
        run.pod = pod
        waiting = describe_waiting(pod, FATAL_WAITING)
        if waiting is not None:
            self._end(run, self._report_stuck(run, waiting))

    def _end(self, run: _Run, report: Coroutine[Any, Any, None]) -> None:
        """Report the end Kubernetes saw for a run its worker has not reported on (yet)."""
        run.ended = True
        task = asyncio.get_running_loop().create_task(report)
        self._reports.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._reports.discard(task)
            self._forget(run)

        task.add_done_callback(done)

    def _forget(self, run: _Run) -> None:
        run.ended = True
        if self._runs.get(run.name) is run:
            del self._runs[run.name]
        if self._by_run.get(run.run_id) is run:
            del self._by_run[run.run_id]

    async def _report_failed(self, run: _Run) -> None:
        pod = await self._latest_pod(run)
        tail = await self._log_tail(pod) if pod is not None else None
        what = f"Kubernetes Job {self.namespace}/{run.name} failed before its worker reported an outcome"
        self._lost(run, describe_failure(run.job, pod, tail, what=what))

    async def _report_stuck(self, run: _Run, waiting: str) -> None:
        await self._quietly(f"deleting Job {run.name}", self._delete_job, run.name)
        what = f"Kubernetes Job {self.namespace}/{run.name} could not start its worker ({waiting}); the Job was deleted"
        self._lost(run, describe_failure(run.job, None, None, what=what))

    async def _report_unanswered(self, run: _Run) -> None:
        await asyncio.sleep(RESULT_GRACE)  # an outcome still on its way wins
        what = (
            f"Kubernetes Job {self.namespace}/{run.name} completed but its worker never reported an outcome: does"
            " executor_config['python'] start the image's Python?"
        )
        self._lost(run, describe_failure(run.job, run.pod, None, what=what), retryable=False)

    async def _report_deleted(self, run: _Run) -> None:
        logger.warning("environment %r: Job %s/%s was deleted outside wove", self.name, self.namespace, run.name)
        self.emit({"type": "task_cancelled", "run_id": run.run_id, "task_id": run.task_id})

    def _lost(self, run: _Run, message: str, *, retryable: bool = True) -> None:
        if run.run_id not in self._by_run:
            return  # its worker's outcome arrived meanwhile
        logger.info("environment %r: %s", self.name, message)
        self.report_lost({"run_id": run.run_id, "task_id": run.task_id}, message, kind="JobFailed", retryable=retryable)

    async def _latest_pod(self, run: _Run) -> dict[str, Any] | None:
        """The run's pod as it is now (the pod watch may lag behind the Job's); the last one seen if that fails."""
        try:
            response = await self.run_blocking(
                self.core.list_namespaced_pod,
                self.namespace,
                label_selector=run.selector,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except Exception as exc:
            logger.debug("environment %r: could not list the pods of %s: %r", self.name, run.name, exc)
            return run.pod
        pods = json.loads(response.data).get("items") or []
        pods.sort(key=lambda pod: str(pod["metadata"].get("creationTimestamp", "")))
        return pods[-1] if pods else run.pod

    async def _log_tail(self, pod: Mapping[str, Any]) -> str | None:
        """The last ``log_tail_lines`` lines the worker container wrote, or ``None`` (no permission, pod gone)."""
        lines = self.settings.log_tail_lines
        if not lines:
            return None
        try:
            response = await self.run_blocking(
                self.core.read_namespaced_pod_log,
                pod["metadata"]["name"],
                self.namespace,
                container=CONTAINER_NAME,
                tail_lines=lines,
                limit_bytes=LOG_BYTES,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except Exception as exc:
            logger.debug("environment %r: could not read the log of %s: %r", self.name, pod["metadata"]["name"], exc)
            return None
        return bytes(response.data).decode("utf-8", errors="replace")

    # -- client calls (in worker threads) ------------------------------------------------------------------------------

    async def _connect(self) -> tuple[Any, str]:
        if self._given_client is not None:
            return self._given_client, self.settings.namespace or "default"
        with self._unavailable("loading the client configuration"):
            return await self.run_blocking(self._configure)

    def _configure(self) -> tuple[Any, str]:
        """A new ``ApiClient`` from the kubeconfig (or the pod's service account) and the namespace to use."""
        client: Any = importlib.import_module("kubernetes.client")
        config: Any = importlib.import_module("kubernetes.config")
        configuration = client.Configuration()
        namespace = self.settings.namespace
        if self.in_cluster:
            config.load_incluster_config(client_configuration=configuration)
            if namespace is None and SERVICE_ACCOUNT_NAMESPACE.exists():
                namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        else:
            path, context = self.config.get("kubeconfig"), self.config.get("context")
            path = str(path) if path is not None else None
            config.load_kube_config(
                config_file=path, context=context, client_configuration=configuration, persist_config=False
            )
            if namespace is None:
                contexts, active = config.list_kube_config_contexts(config_file=path)
                chosen = next((c for c in contexts if c.get("name") == context), active) if context else active
                namespace = ((chosen or {}).get("context") or {}).get("namespace")
        return client.ApiClient(configuration), namespace or "default"

    def _create(self, create: Any, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` with strict field validation (a misspelt override is refused, not dropped)."""
        response = create(
            self.namespace, body, field_validation="Strict", _preload_content=False, _request_timeout=REQUEST_TIMEOUT
        )
        created: dict[str, Any] = json.loads(response.data)
        return created

    def _delete_job(self, name: str) -> None:
        """Delete a Job and, in the background, its pods (the API's default for Jobs would leave them running)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(
                name,
                self.namespace,
                propagation_policy="Background",
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 404:  # already gone (finished and removed by its TTL, or deleted by someone)
                raise

    def _check_size(self, text: str, run_id: str) -> None:
        limit, where = (
            (SECRET_VALUE_LIMIT, "a Secret")
            if self.settings.payload_secret
            else (ENV_VALUE_LIMIT, "an environment variable")
        )
        if len(text) > limit:
            raise PayloadError(
                f"environment {self.name!r}: run {run_id}: the payload is {len(text)} bytes, more than {where} holds"
                f" ({limit}); keep inline_payload_limit at or below its default ({self.inline_payload_limit}) so"
                " large task bodies are fetched from the callback server"
            )

    async def _quietly(self, what: str, func: Any, *args: Any, **kwargs: Any) -> None:
        try:
            await self.run_blocking(func, *args, **kwargs)
        except Exception as exc:
            logger.warning("environment %r: %s failed: %s", self.name, what, _describe(exc))

    @contextlib.contextmanager
    def _api_errors(self, action: str, run_id: str) -> Iterator[None]:
        """API errors become ``SubmitError`` quoting the API server's own message."""
        try:
            yield
        except WoveError:
            raise
        except Exception as exc:
            message = f"environment {self.name!r} (kubernetes_jobs): {action} failed: {_describe(exc)}"
            raise SubmitError(message, environment=self.name, run_id=run_id) from exc

    @contextlib.contextmanager
    def _unavailable(self, action: str) -> Iterator[None]:
        try:
            yield
        except WoveError:
            raise
        except Exception as exc:
            where = getattr(getattr(self.api_client, "configuration", None), "host", None) or "the API server"
            message = (
                f"environment {self.name!r} (kubernetes_jobs): {action} in namespace {self.namespace!r} at {where}"
                f" failed: {_describe(exc)}{_hint(exc)}"
            )
            raise BackendUnavailableError(message, environment=self.name) from exc


def _describe(exc: BaseException) -> str:
    """An API error as ``HTTP 422 Invalid: <the server's message>``; anything else as ``Type: message``."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        body = getattr(exc, "body", None)
        try:
            detail = json.loads(body) if body else {}
        except ValueError:
            detail = {"message": str(body)[:500]}
        if not isinstance(detail, dict):
            detail = {}
        reason = detail.get("reason") or getattr(exc, "reason", "") or ""
        return f"HTTP {status} {reason}: {detail.get('message') or ''}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def _hint(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if status == 401:
        return "; the credentials were refused: check executor_config['kubeconfig'] / ['context']"
    if status == 403:
        return (
            "; the account needs get, list, watch, create and delete on jobs, and get, list and watch on pods and"
            " pods/log (see the RBAC Role in docs/backends/kubernetes_jobs.md)"
        )
    if type(exc).__name__ == "ConfigException":
        return (
            "; set executor_config['kubeconfig'] (and 'context'), or 'in_cluster': True inside a pod,"
            " or pass a ready kubernetes.client.ApiClient as 'api_client'"
        )
    return ""
