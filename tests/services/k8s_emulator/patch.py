"""The three patch formats the API server accepts for built-in types: JSON patch, JSON merge patch, strategic merge.

Strategic merge is the JSON merge patch plus Kubernetes' list rules: lists of objects with a merge key (``name`` for
containers, env vars, ports, volumes; ``uid`` for ownerReferences; ``type`` for conditions) merge item by item, and
``$patch: delete`` removes an item. Other lists are replaced, as the API server does for lists without a merge key.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.services.k8s_emulator.status import ApiError

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

#: List field name -> the key its items merge on in a strategic merge patch.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "ports": "containerPort",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ownerReferences": "uid",
    "conditions": "type",
    "imagePullSecrets": "name",
}


def apply_patch(content_type: str, current: dict[str, Any], patch: Any) -> dict[str, Any]:
    """``current`` with ``patch`` applied; 415 for a patch type this server does not take, 422/400 for bad patches."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == JSON_PATCH:
        return _json_patch(current, patch)
    if kind == MERGE_PATCH:
        return _merge(current, patch, strategic=False)
    if kind == STRATEGIC_MERGE_PATCH:
        return _merge(current, patch, strategic=True)
    if kind.startswith("application/apply-patch"):
        raise ApiError(415, "the emulated API server does not implement server-side apply")
    raise ApiError(
        415,
        f"the body of the request was in an unknown format - accepted media types include: {JSON_PATCH},"
        f" {MERGE_PATCH}, {STRATEGIC_MERGE_PATCH}, {APPLY_PATCH}",
    )


def _merge(target: Any, patch: Any, *, strategic: bool, field: str = "") -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif strategic and isinstance(value, list) and MERGE_KEYS.get(key) and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, MERGE_KEYS[key] or "")
        else:
            result[key] = _merge(result.get(key), value, strategic=strategic, field=key)
    return result


def _merge_list(current: list[Any], patch: list[Any], key: str) -> list[Any]:
    merged = copy.deepcopy(current)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise ApiError(422, f"strategic merge patch: list items need their merge key {key!r}")
        position = next(
            (i for i, old in enumerate(merged) if isinstance(old, dict) and old.get(key) == item[key]), None
        )
        if item.get("$patch") == "delete":
            if position is not None:
                del merged[position]
        elif position is None:
            merged.append(copy.deepcopy(item))
        else:
            merged[position] = _merge(merged[position], item, strategic=True)
    return merged


def _json_patch(current: dict[str, Any], operations: Any) -> dict[str, Any]:
    if not isinstance(operations, list):
        raise ApiError(400, "json patch: the body must be a list of operations")
    document = copy.deepcopy(current)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise ApiError(400, f"json patch: invalid operation {operation!r}")
        op, path = operation["op"], _pointer(operation["path"])
        if op in ("add", "replace"):
            _set(document, path, copy.deepcopy(operation.get("value")), insert=op == "add")
        elif op == "remove":
            parent, last = _parent(document, path)
            try:
                del parent[int(last) if isinstance(parent, list) else last]
            except (KeyError, IndexError, ValueError) as exc:
                raise ApiError(422, f"json patch: cannot remove {operation['path']}: {exc}") from None
        elif op == "test":
            parent, last = _parent(document, path)
            actual = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if actual != operation.get("value"):
                raise ApiError(422, f"json patch: test failed at {operation['path']}")
        else:
            raise ApiError(400, f"json patch: unsupported operation {op!r}")
    return document


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(400, f"json patch: invalid path {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(document: Any, path: list[str]) -> tuple[Any, str]:
    if not path:
        raise ApiError(422, "json patch: cannot operate on the whole document")
    node = document
    for part in path[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError):
            raise ApiError(422, f"json patch: path /{'/'.join(path)} does not exist") from None
    return node, path[-1]


def _set(document: Any, path: list[str], value: Any, *, insert: bool) -> None:
    parent, last = _parent(document, path)
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if insert:
            parent.insert(index, value)
        else:
            parent[index] = value
    elif isinstance(parent, dict):
        if not insert and last not in parent:
            raise ApiError(422, f"json patch: replace of missing path /{'/'.join(path)}")
        parent[last] = value
    else:
        raise ApiError(422, f"json patch: cannot set inside a {type(parent).__name__}")
