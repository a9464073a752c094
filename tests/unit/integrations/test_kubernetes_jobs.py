"""Pure logic of the ``kubernetes_jobs`` adapter: settings, Job names and labels, the bodies it submits (checked with
``kubernetes-validate``'s strict schemas), and the failure messages it builds from Job and pod status."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wove.errors import ConfigError
from wove.integrations._kubernetes_manifest import (
    JobSettings,
    build_job,
    build_secret,
    describe_failure,
    describe_waiting,
    finished_condition,
    job_name,
    label_value,
    owner_reference,
    parse_settings,
    run_labels,
)
from wove.integrations.kubernetes_jobs import FATAL_WAITING, KubernetesJobsAdapter

kubernetes_validate = pytest.importorskip("kubernetes_validate")  # in wove[dev]; scripts/test installs it

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
#: The Kubernetes version whose schemas the emulator validates against (the oldest the adapter promises to work with).
VERSION = "1.31"


def labels(run_id: str = "0" * 32) -> dict[str, str]:
    return run_labels(instance="abc123def456", environment="k8s", task_name="price", run_id=run_id)


# -- names -----------------------------------------------------------------------------------------------------------


@given(task=st.text(max_size=300), prefix=st.sampled_from(["wove-", "", "batch-7-", "x" * 24]))
def test_job_names_are_dns_labels_that_keep_the_whole_run_id(task: str, prefix: str) -> None:
    run_id = uuid.uuid4().hex
    name = job_name(prefix, task, run_id)
    assert len(name) <= 63 and DNS_LABEL.fullmatch(name), name
    assert name.startswith(prefix) and name.endswith(run_id)


def test_long_task_names_never_make_two_runs_share_a_name() -> None:
    task = "a_really_long_task_name_" * 10
    names = {job_name("wove-", task, uuid.uuid4().hex) for _ in range(1000)}
    assert len(names) == 1000
    assert all(len(name) == 63 for name in names)


def test_job_name_shows_the_task() -> None:
    assert job_name("wove-", "Price_Per-SKU!", "0123456789abcdef0123456789abcdef") == (
        "wove-price-per-sku-0123456789abcdef0123456789abcdef"
    )
    assert job_name("wove-", "___", "0123456789abcdef0123456789abcdef") == "wove-0123456789abcdef0123456789abcdef"


def test_a_run_id_of_another_shape_is_hashed() -> None:
    odd = "Run/ID with spaces and UPPER " * 4
    name = job_name("wove-", "t", odd)
    assert DNS_LABEL.fullmatch(name) and len(name) <= 63
    assert name != job_name("wove-", "t", odd + "x")
    assert run_labels(instance="i", environment="e", task_name="t", run_id=odd)["wove-run-id"] == name[-32:]


@given(st.text(max_size=200))
def test_label_values_are_valid(text: str) -> None:
    value = label_value(text)
    assert len(value) <= 63 and LABEL_VALUE.fullmatch(value) and value


# -- settings --------------------------------------------------------------------------------------------------------


def test_image_is_required_and_the_error_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"executor_config\['image'\]"):
        parse_settings({})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"container": {"command": ["sh"]}}, r"\['container'\] may not set 'command'.*\['python'\]"),
        ({"container": {"image": "x"}}, r"may not set 'image'.*\['image'\]"),
        ({"pod_spec": {"containers": []}}, r"\['pod_spec'\] may not set 'containers'.*\['container'\]"),
        ({"job_spec": {"template": {}}}, r"\['job_spec'\] may not set 'template'"),
        ({"container": {"env": [{"name": "WOVE_BACKEND_PAYLOAD", "value": "x"}]}}, "may not set WOVE_BACKEND_PAYLOAD"),
        ({"container": {"env": {"A": "1"}}}, r"\['env'\] must be a list"),
        ({"labels": {"wove-run-id": "x"}}, r"\['labels'\] may not set wove-run-id"),
        ({"labels": {"team": 7}}, r"\['labels'\] must map strings to strings"),
        ({"job_name_prefix": "Wove_"}, "job_name_prefix"),
        ({"job_name_prefix": "w" * 25}, "job_name_prefix"),
        ({"namespace": "Not A Namespace"}, r"\['namespace'\]"),
        ({"python": ""}, r"\['python'\]"),
        ({"python": ["python", 3]}, r"\['python'\]"),
        ({"backoff_limit": -1}, r"\['backoff_limit'\] must be an integer >= 0"),
        ({"active_deadline_seconds": 0}, r"\['active_deadline_seconds'\] must be an integer >= 1"),
        ({"ttl_seconds_after_finished": "600"}, r"\['ttl_seconds_after_finished'\]"),
        ({"payload_secret": "yes"}, r"\['payload_secret'\] must be True or False"),
    ],
)
def test_bad_settings_name_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings({"image": "app:1", **config})


def test_settings_defaults_and_python_splitting() -> None:
    settings = parse_settings({"image": " app:1 ", "python": "/opt/venv/bin/python -X utf8"})
    assert settings.image == "app:1" and settings.python == ("/opt/venv/bin/python", "-X", "utf8")
    assert settings.backoff_limit == 0 and settings.ttl_seconds_after_finished == 600
    assert settings.namespace is None and not settings.payload_secret
    assert parse_settings({"image": "a:1", "ttl_seconds_after_finished": None}).ttl_seconds_after_finished is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"api_client": object()}, "must be a kubernetes.client.ApiClient"),
        ({"in_cluster": True, "kubeconfig": "/x"}, "in_cluster'\\] excludes"),
        ({"in_cluster": "yes"}, "in_cluster'\\] must be True or False"),
        ({"kubeconfig": 3}, "kubeconfig'\\] must be a string"),
    ],
)
def test_adapter_refuses_conflicting_connection_keys(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KubernetesJobsAdapter(name="k8s", config={"image": "a:1", **config}, callback_url="http://x", run_config={})


def test_a_given_client_excludes_kubeconfig() -> None:
    class Client:
        def call_api(self) -> None: ...

    with pytest.raises(ConfigError, match="excludes kubeconfig"):
        KubernetesJobsAdapter(
            name="k8s",
            config={"image": "a:1", "api_client": Client(), "kubeconfig": "/x"},
            callback_url="",
            run_config={},
        )


# -- bodies ----------------------------------------------------------------------------------------------------------


def job(settings: JobSettings, **options: Any) -> dict[str, Any]:
    options.setdefault("payload", "zPAYLOAD")
    return build_job(
        settings, name="wove-price-" + "0" * 32, namespace="team", labels=labels(), task_name="price", **options
    )


def test_the_job_runs_the_worker_with_the_payload_in_its_environment() -> None:
    body = job(parse_settings({"image": "app:1", "python": ["/venv/bin/python"]}))
    kubernetes_validate.validate(body, VERSION, strict=True)
    spec = body["spec"]
    assert spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] == 600 and "activeDeadlineSeconds" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["command"] == ["/venv/bin/python", "-m", "wove.backend_worker"]
    assert container["env"] == [{"name": "WOVE_BACKEND_PAYLOAD", "value": "zPAYLOAD"}]
    assert body["metadata"]["labels"] == spec["template"]["metadata"]["labels"] == labels()
    assert body["metadata"]["annotations"]["wove-task-name"] == "price"


def test_overrides_merge_into_the_job() -> None:
    settings = parse_settings(
        {
            "image": "app:1",
            "labels": {"team": "pricing"},
            "annotations": {"owner": "ops"},
            "container": {
                "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
                "env": [{"name": "MODE", "value": "fast"}],
                "securityContext": {"runAsNonRoot": True},
            },
            "pod_spec": {
                "serviceAccountName": "jobs",
                "nodeSelector": {"pool": "batch"},
                "automountServiceAccountToken": True,
            },
            "job_spec": {
                "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}]}
            },
            "backoff_limit": 2,
            "active_deadline_seconds": 300,
            "ttl_seconds_after_finished": None,
        }
    )
    body = job(settings)
    kubernetes_validate.validate(body, VERSION, strict=True)
    spec = body["spec"]
    assert spec["backoffLimit"] == 2 and spec["activeDeadlineSeconds"] == 300 and "ttlSecondsAfterFinished" not in spec
    assert spec["podFailurePolicy"]["rules"][0]["action"] == "FailJob"
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "jobs" and pod["nodeSelector"] == {"pool": "batch"}
    assert pod["automountServiceAccountToken"] is True
    container = pod["containers"][0]
    assert [env["name"] for env in container["env"]] == ["WOVE_BACKEND_PAYLOAD", "MODE"]
    assert container["resources"]["limits"]["memory"] == "1Gi" and container["securityContext"]["runAsNonRoot"]
    assert body["metadata"]["labels"]["team"] == "pricing" and body["metadata"]["annotations"]["owner"] == "ops"


def test_the_payload_secret_and_its_owner() -> None:
    settings = parse_settings({"image": "app:1", "payload_secret": True})
    body = job(settings, payload=None, secret="wove-price-x")
    kubernetes_validate.validate(body, VERSION, strict=True)
    (env,) = body["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env == {
        "name": "WOVE_BACKEND_PAYLOAD",
        "valueFrom": {"secretKeyRef": {"name": "wove-price-x", "key": "payload"}},
    }
    secret = build_secret(name="wove-price-x", namespace="team", labels=labels(), payload="zPAYLOAD")
    kubernetes_validate.validate(secret, VERSION, strict=True)
    assert secret["immutable"] is True and secret["stringData"] == {"payload": "zPAYLOAD"}
    patch = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "x", "ownerReferences": [owner_reference("wove-price-x", "uid-1")]},
    }
    kubernetes_validate.validate(patch, VERSION, strict=True)


def test_build_job_needs_exactly_one_payload_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        job(parse_settings({"image": "a:1"}), payload=None)


# -- reading status --------------------------------------------------------------------------------------------------

FAILED_JOB = {
    "metadata": {"name": "wove-x"},
    "status": {
        "conditions": [
            {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"},
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            },
        ]
    },
}
FAILED_POD = {
    "metadata": {"name": "wove-x-abcde"},
    "status": {
        "phase": "Failed",
        "containerStatuses": [
            {
                "name": "wove",
                "state": {"terminated": {"exitCode": 127, "reason": "Error", "message": "env: 'py': No such file"}},
            }
        ],
    },
}


def test_finished_condition() -> None:
    assert finished_condition(FAILED_JOB) == FAILED_JOB["status"]["conditions"][1]
    assert finished_condition({"status": {"conditions": [{"type": "Complete", "status": "False"}]}}) is None
    assert finished_condition({}) is None


def test_failure_message_has_the_reason_exit_code_and_log_tail() -> None:
    message = describe_failure(FAILED_JOB, FAILED_POD, "line 1\nline 2\n", what="Job wove-x failed")
    assert message.startswith("Job wove-x failed; Job condition Failed, reason BackoffLimitExceeded: Job has reached")
    assert "pod wove-x-abcde phase Failed" in message and "exit code 127 (Error)" in message
    assert message.endswith("--- last lines of the pod's output ---\nline 1\nline 2")


def test_failure_message_falls_back_to_the_termination_message() -> None:
    message = describe_failure(FAILED_JOB, FAILED_POD, None, what="failed")
    assert message.endswith("env: 'py': No such file")


def test_a_waiting_reason_that_will_not_pass() -> None:
    pod = {
        "status": {
            "containerStatuses": [
                {
                    "name": "wove",
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}},
                }
            ]
        }
    }
    assert (
        describe_waiting(pod, FATAL_WAITING)
        == 'container wove is waiting: ImagePullBackOff: Back-off pulling image "x"'
    )
    creating = {
        "status": {"containerStatuses": [{"name": "wove", "state": {"waiting": {"reason": "ContainerCreating"}}}]}
    }
    assert describe_waiting(creating, FATAL_WAITING) is None
