"""``Admission``: what the API server does to a body before storing it: decode, default, validate.

Decoding: a value of the wrong type is a 400 (the server's JSON decoder refuses it); unknown fields follow
``fieldValidation``: ``Strict`` refuses them (400 "strict decoding error"), ``Warn`` (the default) drops them and
answers with a ``Warning`` header, ``Ignore`` drops them silently. Both come from ``kubernetes-validate``: its strict
schemas flag unknown fields, its plain ones wrong types.

Validation: the defaulted object must satisfy ``kubernetes-validate``'s schema for the configured Kubernetes version
and the semantic rules below, which a schema cannot express; a violation is the API server's 422 ``Invalid``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import random
import re
import uuid
from collections import Counter
from typing import Any

import kubernetes_validate

from tests.services.k8s_emulator.status import ApiError, Invalid
from tests.services.k8s_emulator.store import JOBS, NAMESPACES, PODS, SECRETS, Resource

__all__ = ["Admission", "Cause", "generated_name"]

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")

DNS_LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end"
    " with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is"
    " '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
DNS_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start"
    " and end with an alphanumeric character (e.g. 'example.com', regex used for validation is"
    " '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_VALUE_MESSAGE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start"
    " and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation"
    " is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
LABEL_NAME_MESSAGE = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric"
    " character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is"
    " '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
ENV_NAME_MESSAGE = (
    "a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.', and must not"
    " start with a digit (e.g. 'my.env-name',  or 'MY_ENV.NAME',  or 'MyEnvName1', regex used for validation is"
    " '[-._a-zA-Z][-._a-zA-Z0-9]*')"
)
SECRET_KEY_MESSAGE = (
    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME', "
    " or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
)
#: Largest total size of an object's annotations, and of a Secret's data.
MAX_ANNOTATIONS = 256 * 1024
MAX_SECRET = 1024 * 1024
#: Labels the Job controller's selector uses (set on the Job's pod template).
CONTROLLER_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
_NAME_SUFFIX = "bcdfghjklmnpqrstvwxz2456789"

Cause = tuple[str, str, str]


def generated_name(base: str) -> str:
    """``generateName`` + 5 random characters, the base cut so the result stays within 63 characters."""
    return base[:58] + "".join(random.choices(_NAME_SUFFIX, k=5))


class Admission:
    """Decodes, defaults and validates bodies for one Kubernetes version; counts what it saw."""

    def __init__(self, version: str) -> None:
        self.version = version
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}, version)
        self.validated: Counter[str] = Counter()
        self.rejected = 0

    # -- entry points -------------------------------------------------------------------------------------------------

    def create(
        self, resource: Resource, body: Any, namespace: str, field_validation: str | None
    ) -> tuple[dict[str, Any], list[str]]:
        """The object to store for a POST of ``body``, and the warnings to answer with."""
        try:
            obj, warnings = self._decode(resource, body, field_validation)
            meta = obj.setdefault("metadata", {})
            if resource.namespaced:
                if meta.get("namespace") not in (None, "", namespace):
                    raise ApiError(
                        400, "the namespace of the provided object does not match the namespace sent on the request"
                    )
                meta["namespace"] = namespace
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = generated_name(str(meta["generateName"]))
            meta["uid"] = str(uuid.uuid4())
            for owned in (
                "resourceVersion",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ):
                meta.pop(owned, None)
            if resource.has_status:
                obj.pop("status", None)
            self._default(resource, obj)
            self._validate(resource, obj, None)
        except ApiError:
            self.rejected += 1
            raise
        return obj, warnings

    def update(
        self, resource: Resource, new: Any, old: dict[str, Any], field_validation: str | None, *, status: bool
    ) -> tuple[dict[str, Any], list[str]]:
        """The object to store for a PUT or PATCH: the resource keeps its old status, ``/status`` all but status."""
        try:
            obj, warnings = self._decode(resource, new, field_validation)
            if obj.get("metadata", {}).get("name") != old["metadata"]["name"]:
                raise ApiError(400, "the name of the object does not match the name on the URL")
            if resource.has_status:
                if status:
                    obj = {**copy.deepcopy(old), "status": obj.get("status") or {}}
                else:
                    obj["status"] = copy.deepcopy(old.get("status") or {})
            obj["metadata"]["namespace"] = old["metadata"].get("namespace")
            self._default(resource, obj)
            self._validate(resource, obj, old)
        except ApiError:
            self.rejected += 1
            raise
        return obj, warnings

    # -- decoding -----------------------------------------------------------------------------------------------------

    def _decode(self, resource: Resource, body: Any, field_validation: str | None) -> tuple[dict[str, Any], list[str]]:
        if not isinstance(body, dict):
            raise ApiError(400, f"the body of the request is not a {resource.kind} object")
        mode = field_validation or "Warn"
        if mode not in ("Strict", "Warn", "Ignore"):
            raise ApiError(
                400, f'fieldValidation: Unsupported value: "{mode}": supported values: "Ignore", "Strict", "Warn"'
            )
        for key, expected in (("apiVersion", resource.api_version), ("kind", resource.kind)):
            if body.get(key) not in (None, expected):
                raise ApiError(
                    400, f"the {key} in the data ({body.get(key)}) does not match the expected {key} ({expected})"
                )
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        unknown: list[str] = []
        while True:  # the strict schema refuses unknown fields; the plain one used in validation does not
            try:
                kubernetes_validate.validate(obj, self.version, strict=True)
                break
            except kubernetes_validate.ValidationError as exc:
                if exc.validator == "type":
                    raise ApiError(
                        400,
                        f"json: cannot unmarshal {_type_name(exc.instance)} into Go struct field"
                        f" {resource.kind}.{_field(exc.path)} of type {_go_type(exc.validator_value)}",
                    ) from None
                if exc.validator != "additionalProperties" or not isinstance(exc.instance, dict):
                    break  # not an unknown field: validation proper reports it
                known = set((exc.schema.get("properties") or {}).keys())
                for extra in sorted(set(exc.instance) - known):
                    unknown.append(".".join(filter(None, [_field(exc.path), extra])))
                    _drop(obj, list(exc.path), extra)
        if unknown and mode == "Strict":
            listed = ", ".join(f'unknown field "{field}"' for field in unknown)
            raise ApiError(400, f"strict decoding error: {listed}")
        warnings = [f'unknown field "{field}"' for field in unknown] if mode == "Warn" else []
        return obj, warnings

    # -- defaults -----------------------------------------------------------------------------------------------------

    def _default(self, resource: Resource, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        if resource is JOBS:
            spec = obj.setdefault("spec", {})
            if spec.get("completions") is None and spec.get("parallelism") is None:
                spec["completions"] = spec["parallelism"] = 1
            spec.setdefault("parallelism", 1)
            spec.setdefault("backoffLimit", 6)
            spec.setdefault("completionMode", "NonIndexed")
            spec.setdefault("suspend", False)
            if "podFailurePolicy" not in spec:
                spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
            template = spec.setdefault("template", {})
            template_meta = template.setdefault("metadata", {})
            if not spec.get("manualSelector"):
                uid = meta["uid"]
                labels = template_meta.setdefault("labels", {})
                for key in CONTROLLER_LABELS:
                    labels[key] = uid
                for key in JOB_NAME_LABELS:
                    labels[key] = meta["name"]
                spec["selector"] = {"matchLabels": {CONTROLLER_LABELS[0]: uid}}
            if not meta.get("labels"):
                meta["labels"] = dict(template_meta.get("labels") or {})
            self._default_pod_spec(template.setdefault("spec", {}))
        elif resource is PODS:
            self._default_pod_spec(obj.setdefault("spec", {}))
        elif resource is SECRETS:
            obj.setdefault("type", "Opaque")
            given = obj.pop("stringData", None) or {}
            if given:
                data = obj.setdefault("data", {}) or {}
                for key, value in given.items():
                    data[key] = base64.b64encode(str(value).encode()).decode()
                obj["data"] = data
        elif resource is NAMESPACES:
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj.setdefault("status", {}).setdefault("phase", "Active")

    @staticmethod
    def _default_pod_spec(spec: dict[str, Any]) -> None:
        for key, value in (
            ("restartPolicy", "Always"),
            ("terminationGracePeriodSeconds", 30),
            ("dnsPolicy", "ClusterFirst"),
            ("securityContext", {}),
            ("schedulerName", "default-scheduler"),
            ("enableServiceLinks", True),
            ("preemptionPolicy", "PreemptLowerPriority"),
            ("priority", 0),
            ("serviceAccountName", "default"),
        ):
            spec.setdefault(key, copy.deepcopy(value))
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        for container in [*(spec.get("initContainers") or ()), *(spec.get("containers") or ())]:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            container.setdefault("resources", {})
            image = str(container.get("image") or "")
            tag = image.rsplit("/", 1)[-1]
            latest = "@" not in tag and (":" not in tag or tag.endswith(":latest"))
            container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
            for env in container.get("env") or ():
                field_ref = (env.get("valueFrom") or {}).get("fieldRef")
                if field_ref is not None:
                    field_ref.setdefault("apiVersion", "v1")

    # -- validation ---------------------------------------------------------------------------------------------------

    def _validate(self, resource: Resource, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        name = str(obj["metadata"].get("name") or "")
        try:
            kubernetes_validate.validate(obj, self.version, strict=False)
        except kubernetes_validate.ValidationError as exc:
            reason, message = _schema_problem(exc)
            raise Invalid(resource.kind, resource.group, name, [(_field(exc.path), reason, message)]) from None
        causes = self._semantic(resource, obj, old)
        if causes:
            raise Invalid(resource.kind, resource.group, name, causes)
        self.validated[resource.kind] += 1

    def _semantic(self, resource: Resource, obj: dict[str, Any], old: dict[str, Any] | None) -> list[Cause]:
        causes: list[Cause] = []
        meta = obj["metadata"]
        name = meta.get("name")
        if not name:
            causes.append(("metadata.name", "FieldValueRequired", "Required value: name or generateName is required"))
        elif resource is NAMESPACES:
            if len(name) > 63 or not _DNS_LABEL.fullmatch(name):
                causes.append(("metadata.name", "FieldValueInvalid", f'Invalid value: "{name}": {DNS_LABEL_MESSAGE}'))
        elif len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            causes.append(("metadata.name", "FieldValueInvalid", f'Invalid value: "{name}": {DNS_SUBDOMAIN_MESSAGE}'))
        causes += _labels("metadata.labels", meta.get("labels") or {})
        causes += _annotations("metadata.annotations", meta.get("annotations") or {})
        if resource is JOBS:
            causes += _job(obj["spec"], old)
        elif resource is PODS:
            causes += _pod_spec("spec", obj["spec"])
            if old is not None and _pod_spec_frozen(obj["spec"]) != _pod_spec_frozen(old["spec"]):
                causes.append(
                    (
                        "spec",
                        "FieldValueForbidden",
                        "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,"
                        " `spec.activeDeadlineSeconds` or `spec.tolerations`",
                    )
                )
        elif resource is SECRETS:
            causes += _secret(obj, old)
        return causes


# -- the rules -------------------------------------------------------------------------------------------------------


def _labels(where: str, labels: dict[str, Any]) -> list[Cause]:
    causes: list[Cause] = []
    for key, value in labels.items():
        causes += _qualified_name(where, key)
        if len(str(value)) > 63:
            causes.append((where, "FieldValueInvalid", f'Invalid value: "{value}": must be no more than 63 characters'))
        elif not _LABEL_VALUE.fullmatch(str(value)):
            causes.append((where, "FieldValueInvalid", f'Invalid value: "{value}": {LABEL_VALUE_MESSAGE}'))
    return causes


def _annotations(where: str, annotations: dict[str, Any]) -> list[Cause]:
    causes: list[Cause] = []
    for key in annotations:
        causes += _qualified_name(where, key)
    total = sum(len(k) + len(str(v)) for k, v in annotations.items())
    if total > MAX_ANNOTATIONS:
        causes.append((where, "FieldValueTooLong", f"Too long: must have at most {MAX_ANNOTATIONS} bytes"))
    return causes


def _qualified_name(where: str, key: str) -> list[Cause]:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return [(where, "FieldValueInvalid", f'Invalid value: "{key}": prefix part {DNS_SUBDOMAIN_MESSAGE}')]
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return [(where, "FieldValueInvalid", f'Invalid value: "{key}": {LABEL_NAME_MESSAGE}')]
    return []


def _job(spec: dict[str, Any], old: dict[str, Any] | None) -> list[Cause]:
    causes: list[Cause] = []
    for key, minimum in (("parallelism", 0), ("completions", 0), ("backoffLimit", 0), ("ttlSecondsAfterFinished", 0)):
        if spec.get(key) is not None and spec[key] < minimum:
            causes.append(
                (f"spec.{key}", "FieldValueInvalid", f"Invalid value: {spec[key]}: must be greater than or equal to 0")
            )
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        causes.append(
            (
                "spec.activeDeadlineSeconds",
                "FieldValueInvalid",
                f"Invalid value: {spec['activeDeadlineSeconds']}: must be greater than 0",
            )
        )
    template = spec.get("template") or {}
    causes += _labels("spec.template.labels", (template.get("metadata") or {}).get("labels") or {})
    causes += _annotations("spec.template.annotations", (template.get("metadata") or {}).get("annotations") or {})
    pod_spec = template.get("spec") or {}
    policy = pod_spec.get("restartPolicy")
    if policy not in ("OnFailure", "Never"):
        causes.append(
            (
                "spec.template.spec.restartPolicy",
                "FieldValueNotSupported",
                f'Unsupported value: "{policy}": supported values: "OnFailure", "Never"',
            )
        )
    causes += _pod_spec("spec.template.spec", pod_spec)
    if old is not None:
        for key in ("template", "selector", "completionMode"):
            if spec.get(key) != old["spec"].get(key) and not (key == "template" and old["spec"].get("suspend")):
                causes.append((f"spec.{key}", "FieldValueInvalid", "Invalid value: field is immutable"))
    return causes


def _pod_spec(where: str, spec: dict[str, Any]) -> list[Cause]:
    causes: list[Cause] = []
    containers = spec.get("containers") or []
    if not containers:
        causes.append((f"{where}.containers", "FieldValueRequired", "Required value"))
    seen: set[str] = set()
    for group in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(group) or ()):
            here = f"{where}.{group}[{index}]"
            name = container.get("name") or ""
            if not _DNS_LABEL.fullmatch(name) or len(name) > 63:
                causes.append((f"{here}.name", "FieldValueInvalid", f'Invalid value: "{name}": {DNS_LABEL_MESSAGE}'))
            elif name in seen:
                causes.append((f"{here}.name", "FieldValueDuplicate", f'Duplicate value: "{name}"'))
            seen.add(name)
            image = container.get("image")
            if not image:
                causes.append((f"{here}.image", "FieldValueRequired", "Required value"))
            elif image != image.strip():
                causes.append(
                    (
                        f"{here}.image",
                        "FieldValueInvalid",
                        f'Invalid value: "{image}": must not have leading or trailing whitespace',
                    )
                )
            policy = container.get("terminationMessagePolicy")
            if policy not in ("File", "FallbackToLogsOnError"):
                causes.append(
                    (
                        f"{here}.terminationMessagePolicy",
                        "FieldValueNotSupported",
                        f'Unsupported value: "{policy}": supported values: "File", "FallbackToLogsOnError"',
                    )
                )
            pull = container.get("imagePullPolicy")
            if pull not in ("Always", "IfNotPresent", "Never"):
                causes.append(
                    (
                        f"{here}.imagePullPolicy",
                        "FieldValueNotSupported",
                        f'Unsupported value: "{pull}": supported values: "Always", "IfNotPresent", "Never"',
                    )
                )
            for number, env in enumerate(container.get("env") or ()):
                causes += _env(f"{here}.env[{number}]", env)
    return causes


def _env(where: str, env: dict[str, Any]) -> list[Cause]:
    causes: list[Cause] = []
    name = env.get("name") or ""
    if not _ENV_NAME.fullmatch(name):
        causes.append((f"{where}.name", "FieldValueInvalid", f'Invalid value: "{name}": {ENV_NAME_MESSAGE}'))
    source = env.get("valueFrom")
    if source is not None:
        if env.get("value"):
            causes.append(
                (
                    f"{where}.valueFrom",
                    "FieldValueInvalid",
                    'Invalid value: "": may not be specified when `value` is not empty',
                )
            )
        chosen = [key for key in ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef") if source.get(key)]
        if len(chosen) != 1:
            causes.append(
                (
                    f"{where}.valueFrom",
                    "FieldValueInvalid",
                    'Invalid value: "": must specify one of: `fieldRef`, `resourceFieldRef`, `configMapKeyRef` or'
                    " `secretKeyRef`",
                )
            )
        for key in ("secretKeyRef", "configMapKeyRef"):
            ref = source.get(key)
            if ref is not None:
                for part in ("name", "key"):
                    if not ref.get(part):
                        causes.append((f"{where}.valueFrom.{key}.{part}", "FieldValueRequired", "Required value"))
    return causes


def _pod_spec_frozen(spec: dict[str, Any]) -> dict[str, Any]:
    frozen = copy.deepcopy(spec)
    frozen.pop("activeDeadlineSeconds", None)
    frozen.pop("tolerations", None)
    for container in frozen.get("containers") or ():
        container.pop("image", None)
    return frozen


def _secret(obj: dict[str, Any], old: dict[str, Any] | None) -> list[Cause]:
    causes: list[Cause] = []
    total = 0
    for key, value in (obj.get("data") or {}).items():
        if not _SECRET_KEY.fullmatch(key):
            causes.append(
                (
                    f"data[{key}]",
                    "FieldValueInvalid",
                    f'Invalid value: "{key}": {SECRET_KEY_MESSAGE}',
                )
            )
        try:
            total += len(base64.b64decode(str(value), validate=True))
        except (binascii.Error, ValueError):
            causes.append((f"data[{key}]", "FieldValueInvalid", "Invalid value: illegal base64 data"))
    if total > MAX_SECRET:
        causes.append(("data", "FieldValueTooLong", f"Too long: must have at most {MAX_SECRET} bytes"))
    if old is not None and old.get("immutable"):
        if obj.get("data") != old.get("data"):
            causes.append(("data", "FieldValueForbidden", "Forbidden: field is immutable when `immutable` is set"))
        if obj.get("immutable") is not True:
            causes.append(("immutable", "FieldValueForbidden", "Forbidden: field is immutable when `immutable` is set"))
    return causes


# -- helpers ---------------------------------------------------------------------------------------------------------


def _field(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _drop(obj: Any, path: list[Any], key: str) -> None:
    node = obj
    for part in path:
        node = node[part]
    node.pop(key, None)


def _schema_problem(exc: kubernetes_validate.ValidationError) -> tuple[str, str]:
    if exc.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", exc.message)
        return "FieldValueRequired", f"Required value: {missing[0] if missing else exc.message}"
    if exc.validator == "enum":
        allowed = ", ".join(f'"{v}"' for v in exc.validator_value if v is not None)
        return "FieldValueNotSupported", f'Unsupported value: "{exc.instance}": supported values: {allowed}'
    return "FieldValueInvalid", f"Invalid value: {exc.message}"


def _type_name(value: Any) -> str:
    return {str: "string", int: "number", float: "number", bool: "bool", list: "array", dict: "object"}.get(
        type(value), "value"
    )


def _go_type(expected: Any) -> str:
    names = [expected] if isinstance(expected, str) else [t for t in expected if t != "null"]
    return {
        "string": "string",
        "integer": "int32",
        "number": "float64",
        "boolean": "bool",
        "array": "[]",
        "object": "map",
    }.get(names[0] if names else "", "value")
