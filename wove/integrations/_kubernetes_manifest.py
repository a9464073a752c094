"""What the ``kubernetes_jobs`` adapter sends to the API server: settings, names, labels, Job and Secret bodies.

Pure functions over plain dicts in the manifest's own field names (``restartPolicy``, ``backoffLimit``), so user
overrides read like the YAML they would write, and every rule here is unit-tested without a cluster.

Names. A Job name is a DNS-1123 label of at most 63 characters (its pods carry it in the ``job-name`` label, whose
values stop at 63). It is ``<prefix><task>-<run>``: ``<run>`` is the run id itself (wove's run ids are 32 lowercase
hex digits, unique per attempt) or, for any other run id, the first 32 hex digits of its SHA-256; ``<task>`` is the
task name lowercased, with every other character turned into ``-``, cut to what is left of the 63. Only the
readable part is ever shortened, so two runs never share a name, whatever their task names.
"""

from __future__ import annotations

import copy
import hashlib
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wove.errors import ConfigError

__all__ = [
    "CONTAINER_NAME",
    "MANAGED_BY",
    "PAYLOAD_ENV",
    "RUN_LABEL",
    "JobSettings",
    "build_job",
    "build_secret",
    "describe_failure",
    "describe_waiting",
    "finished_condition",
    "job_name",
    "label_value",
    "owner_reference",
    "parse_settings",
    "run_labels",
]

#: The environment variable the worker reads its payload from (``python -m wove.backend_worker``).
PAYLOAD_ENV = "WOVE_BACKEND_PAYLOAD"
#: The one container wove runs in each Job's pod.
CONTAINER_NAME = "wove"
#: Key of the payload in a payload Secret.
SECRET_KEY = "payload"
#: Recommended label naming the tool that manages an object; wove's watch selects on it.
MANAGED_BY = "app.kubernetes.io/managed-by"
#: Labels wove sets on every Job and its pods (unprefixed keys: private to the namespace's users, no domain claimed).
RUN_LABEL = "wove-run-id"
TASK_LABEL = "wove-task"
ENVIRONMENT_LABEL = "wove-environment"
#: One value per started environment: the watch sees only this environment's Jobs and pods.
INSTANCE_LABEL = "wove-instance"
#: Annotations carrying what a label cannot (any length, any character).
TASK_ANNOTATION = "wove-task-name"

#: Longest Job name: its pods carry it in the ``job-name`` label, and label values stop at 63 characters.
MAX_NAME = 63
#: Characters of the run part of a name: a wove run id, or a SHA-256 prefix of any other run id.
RUN_PART = 32
MAX_PREFIX = 24
DEFAULT_PREFIX = "wove-"
#: Seconds a finished Job (and its pod and logs) stays for inspection before Kubernetes deletes it.
DEFAULT_TTL = 600
#: Lines of a failed pod's log quoted in the error.
DEFAULT_LOG_LINES = 20

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9]*)?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NOT_DNS = re.compile(r"[^a-z0-9]+")
_NOT_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")

#: Keys of the overrides that wove fills itself, with the key to use instead.
_RESERVED: dict[str, dict[str, str | None]] = {
    "job_spec": {"template": "pod_spec / container", "selector": None, "manualSelector": None},
    "pod_spec": {"containers": "container"},
    "container": {"name": None, "image": "image", "command": "python", "args": None},
}


@dataclass(frozen=True)
class JobSettings:
    """The adapter's ``executor_config``, checked once when the environment starts."""

    image: str
    namespace: str | None = None
    python: tuple[str, ...] = ("python",)
    job_name_prefix: str = DEFAULT_PREFIX
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    job_spec: Mapping[str, Any] = field(default_factory=dict)
    pod_spec: Mapping[str, Any] = field(default_factory=dict)
    container: Mapping[str, Any] = field(default_factory=dict)
    backoff_limit: int = 0
    ttl_seconds_after_finished: int | None = DEFAULT_TTL
    active_deadline_seconds: int | None = None
    payload_secret: bool = False
    log_tail_lines: int = DEFAULT_LOG_LINES


def parse_settings(config: Mapping[str, Any]) -> JobSettings:
    """Check the Job-related keys of ``executor_config``; every error names the key and what it accepts."""
    image = config.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ConfigError(
            "the kubernetes_jobs backend needs executor_config['image']: a container image with wove installed"
            " (pip install 'wove[dispatch]'), e.g. 'registry.example.com/team/app:1.4'"
        )
    namespace = config.get("namespace")
    if namespace is not None and not _is_dns_label(namespace):
        raise ConfigError(
            f"executor_config['namespace'] must be a namespace name (a DNS-1123 label), got {namespace!r}"
        )
    prefix = config.get("job_name_prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str) or len(prefix) > MAX_PREFIX or (prefix and not _PREFIX.fullmatch(prefix)):
        raise ConfigError(
            f"executor_config['job_name_prefix'] must be at most {MAX_PREFIX} lowercase letters, digits and '-',"
            f" starting with a letter or digit, got {prefix!r}"
        )
    overrides = {key: _mapping(config, key) for key in _RESERVED}
    for key, given in overrides.items():
        for reserved, instead in _RESERVED[key].items():
            if reserved in given:
                hint = f"; use executor_config[{instead!r}]" if instead else ""
                raise ConfigError(f"executor_config[{key!r}] may not set {reserved!r}: wove sets it{hint}")
    _env(overrides["container"].get("env"))
    labels = _strings(config, "labels")
    taken = sorted(set(labels) & {MANAGED_BY, RUN_LABEL, TASK_LABEL, ENVIRONMENT_LABEL, INSTANCE_LABEL})
    if taken:
        raise ConfigError(f"executor_config['labels'] may not set {', '.join(taken)}: wove sets it")
    return JobSettings(
        image=image.strip(),
        namespace=namespace,
        python=_command(config.get("python", "python")),
        job_name_prefix=prefix,
        labels=labels,
        annotations=_strings(config, "annotations"),
        job_spec=overrides["job_spec"],
        pod_spec=overrides["pod_spec"],
        container=overrides["container"],
        backoff_limit=_count(config, "backoff_limit", 0, minimum=0),
        ttl_seconds_after_finished=_optional_count(config, "ttl_seconds_after_finished", DEFAULT_TTL, minimum=0),
        active_deadline_seconds=_optional_count(config, "active_deadline_seconds", None, minimum=1),
        payload_secret=_flag(config, "payload_secret"),
        log_tail_lines=_count(config, "log_tail_lines", DEFAULT_LOG_LINES, minimum=0),
    )


# -- names and labels --------------------------------------------------------------------------------------------------


def job_name(prefix: str, task_name: str, run_id: str) -> str:
    """``<prefix><task>-<run>``: a DNS-1123 label of at most 63 characters, unique per run (see the module doc)."""
    run = run_id if _RUN_ID.fullmatch(run_id) else hashlib.sha256(run_id.encode()).hexdigest()[:RUN_PART]
    room = MAX_NAME - len(prefix) - len(run) - 1
    task = _NOT_DNS.sub("-", task_name.lower()).strip("-")[: max(room, 0)].strip("-")
    return f"{prefix}{task}-{run}" if task else f"{prefix}{run}"


def label_value(text: str) -> str:
    """``text`` as a valid label value: allowed characters only, at most 63, starting and ending alphanumeric."""
    value = _NOT_LABEL.sub("-", text).strip("-_.")[:MAX_NAME].rstrip("-_.")
    return value or "unnamed"


def run_labels(*, instance: str, environment: str, task_name: str, run_id: str) -> dict[str, str]:
    """The labels wove puts on a run's Job, pod and Secret."""
    run = run_id if _RUN_ID.fullmatch(run_id) else hashlib.sha256(run_id.encode()).hexdigest()[:RUN_PART]
    return {
        MANAGED_BY: "wove",
        INSTANCE_LABEL: instance,
        ENVIRONMENT_LABEL: label_value(environment),
        TASK_LABEL: label_value(task_name),
        RUN_LABEL: run,
    }


# -- bodies ------------------------------------------------------------------------------------------------------------


def build_job(
    settings: JobSettings,
    *,
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    task_name: str,
    payload: str | None = None,
    secret: str | None = None,
) -> dict[str, Any]:
    """The ``batch/v1`` Job for one run: one pod, one container running ``python -m wove.backend_worker``.

    The payload goes in ``WOVE_BACKEND_PAYLOAD``, as the value itself or (``secret``) read from that Secret.
    """
    if (payload is None) == (secret is None):
        raise ValueError("build_job needs exactly one of payload and secret")
    all_labels = {**settings.labels, **labels}
    annotations = {**settings.annotations, TASK_ANNOTATION: task_name}
    if secret is not None:
        source: dict[str, Any] = {"valueFrom": {"secretKeyRef": {"name": secret, "key": SECRET_KEY}}}
    else:
        source = {"value": payload}
    container = _merge(
        {
            "name": CONTAINER_NAME,
            "image": settings.image,
            "command": [*settings.python, "-m", "wove.backend_worker"],
            # A failed worker's last output lands in the pod status too, readable without log access.
            "terminationMessagePolicy": "FallbackToLogsOnError",
        },
        {key: value for key, value in settings.container.items() if key != "env"},
    )
    container["env"] = [{"name": PAYLOAD_ENV, **source}, *_env(settings.container.get("env"))]
    pod_spec = _merge(
        {
            "restartPolicy": "Never",  # each attempt is a new run with a new Job: wove owns retries
            "automountServiceAccountToken": False,  # the worker talks to wove, not to the API server
        },
        settings.pod_spec,
    )
    pod_spec["containers"] = [container]
    spec: dict[str, Any] = {"backoffLimit": settings.backoff_limit}
    if settings.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = settings.ttl_seconds_after_finished
    if settings.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = settings.active_deadline_seconds
    spec = _merge(spec, settings.job_spec)
    spec["template"] = {"metadata": {"labels": all_labels, "annotations": annotations}, "spec": pod_spec}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": all_labels, "annotations": annotations},
        "spec": spec,
    }


def build_secret(*, name: str, namespace: str, labels: Mapping[str, str], payload: str) -> dict[str, Any]:
    """The Secret holding one run's payload (``payload_secret``); immutable, and owned by its Job once it exists."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "type": "Opaque",
        "immutable": True,
        "stringData": {SECRET_KEY: payload},
    }


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """A reference to a Job: the garbage collector deletes the referring object together with the Job."""
    return {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid}


# -- reading status ----------------------------------------------------------------------------------------------------


def finished_condition(job: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The Job's ``Complete`` or ``Failed`` condition when it is true, else ``None``."""
    for condition in (job.get("status") or {}).get("conditions") or ():
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return dict(condition)
    return None


def describe_waiting(pod: Mapping[str, Any], reasons: frozenset[str]) -> str | None:
    """``"container wove is waiting: ImagePullBackOff: ..."`` when a container waits for one of ``reasons``."""
    for status in _container_statuses(pod):
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in reasons:
            message = f": {waiting['message']}" if waiting.get("message") else ""
            return f"container {status.get('name')} is waiting: {waiting['reason']}{message}"
    return None


def describe_failure(
    job: Mapping[str, Any] | None, pod: Mapping[str, Any] | None, log_tail: str | None, *, what: str
) -> str:
    """One message with everything Kubernetes says about a run's end: ``what`` happened, the Job's condition, how the
    pod and its container ended, and the last lines of its log (or its termination message)."""
    parts = [what]
    condition = finished_condition(job) if job is not None else None
    if condition is not None:
        reason = condition.get("reason") or condition.get("type")
        message = f": {condition['message']}" if condition.get("message") else ""
        parts.append(f"Job condition {condition.get('type')}, reason {reason}{message}")
    termination = ""
    if pod is not None:
        name = (pod.get("metadata") or {}).get("name")
        status = pod.get("status") or {}
        phase = status.get("phase") or "Unknown"
        pod_reason = f" ({status['reason']}: {status.get('message', '')})" if status.get("reason") else ""
        parts.append(f"pod {name} phase {phase}{pod_reason}")
        for container in _container_statuses(pod):
            state = container.get("state") or {}
            if state.get("terminated"):
                ended = state["terminated"]
                parts.append(
                    f"container {container.get('name')} terminated with exit code {ended.get('exitCode')}"
                    f" ({ended.get('reason') or 'no reason given'})"
                )
                termination = str(ended.get("message") or "").strip()
            elif state.get("waiting"):
                waiting = state["waiting"]
                message = f": {waiting['message']}" if waiting.get("message") else ""
                parts.append(f"container {container.get('name')} waiting: {waiting.get('reason')}{message}")
    tail = (log_tail or "").strip() or termination
    text = "; ".join(parts)
    if tail:
        text += "\n--- last lines of the pod's output ---\n" + tail
    return text


# -- helpers -----------------------------------------------------------------------------------------------------------


def _container_statuses(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or ()), *(status.get("containerStatuses") or ())]


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``: nested dicts merge key by key, anything else is replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _env(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(isinstance(e, Mapping) for e in value):
        raise ConfigError("executor_config['container']['env'] must be a list of {'name': ..., 'value': ...} dicts")
    if any(entry.get("name") == PAYLOAD_ENV for entry in value):
        raise ConfigError(f"executor_config['container']['env'] may not set {PAYLOAD_ENV}: wove sets it")
    return [copy.deepcopy(dict(entry)) for entry in value]


def _is_dns_label(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_NAME and bool(_DNS_LABEL.fullmatch(value))


def _mapping(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"executor_config[{key!r}] must be a dict in the manifest's field names, got {value!r}")
    return copy.deepcopy(dict(value))


def _strings(config: Mapping[str, Any], key: str) -> dict[str, str]:
    value = _mapping(config, key)
    if not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"executor_config[{key!r}] must map strings to strings, got {value!r}")
    return value


def _command(value: Any) -> tuple[str, ...]:
    parts = shlex.split(value) if isinstance(value, str) else value
    if (
        not isinstance(parts, Sequence)
        or isinstance(parts, str)
        or not parts
        or not all(isinstance(p, str) and p for p in parts)
    ):
        raise ConfigError(
            "executor_config['python'] must be the image's Python command, as a string or a list of strings,"
            f" e.g. 'python' or ['/opt/venv/bin/python', '-X', 'utf8'], got {value!r}"
        )
    return tuple(parts)


def _flag(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"executor_config[{key!r}] must be True or False, got {value!r}")
    return value


def _count(config: Mapping[str, Any], key: str, default: int, *, minimum: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"executor_config[{key!r}] must be an integer >= {minimum}, got {value!r}")
    return value


def _optional_count(config: Mapping[str, Any], key: str, default: int | None, *, minimum: int) -> int | None:
    if config.get(key, default) is None:
        return None
    return _count(config, key, default or 0, minimum=minimum)
