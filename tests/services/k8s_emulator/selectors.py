"""Label and field selectors, as the API server parses and applies them (``app=web,tier in (a,b),!legacy``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from tests.services.k8s_emulator.status import ApiError

Matcher = Callable[[Mapping[str, Any]], bool]

_SET = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*(?:(notin|in)\s*\(([^)]*)\))?\s*$")
_EQUALITY = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(==|=|!=)\s*([A-Za-z0-9_.-]*)\s*$")


def _split(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part for part in parts if part.strip()]


def label_matcher(selector: str | None) -> Matcher:
    """A predicate on an object's labels; a malformed selector is a 400 like the API server's."""
    requirements: list[Callable[[Mapping[str, str]], bool]] = []
    for part in _split(selector or ""):
        equality = _EQUALITY.match(part)
        if equality:
            key, op, value = equality.groups()
            if op == "!=":
                requirements.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                requirements.append(lambda labels, k=key, v=value: labels.get(k) == v)
            continue
        match = _SET.match(part)
        if not match:
            raise ApiError(400, f"unable to parse requirement: found '{part.strip()}', expected: label selector")
        negate, key, op, values = match.groups()
        if op:
            if negate:
                raise ApiError(400, f"unable to parse requirement: '{part.strip()}'")
            chosen = {v.strip() for v in values.split(",") if v.strip()}
            if op == "in":
                requirements.append(lambda labels, k=key, c=chosen: labels.get(k) in c)
            else:
                requirements.append(lambda labels, k=key, c=chosen: labels.get(k) not in c)
        elif negate:
            requirements.append(lambda labels, k=key: k not in labels)
        else:
            requirements.append(lambda labels, k=key: k in labels)

    def matches(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(requirement(labels) for requirement in requirements)

    return matches


#: Fields a field selector may name, per resource plural, and how to read each.
_FIELDS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "metadata.name": lambda obj: obj["metadata"].get("name"),
    "metadata.namespace": lambda obj: obj["metadata"].get("namespace"),
}
_EXTRA_FIELDS: dict[str, dict[str, Callable[[Mapping[str, Any]], Any]]] = {
    "pods": {
        "status.phase": lambda obj: (obj.get("status") or {}).get("phase"),
        "spec.nodeName": lambda obj: (obj.get("spec") or {}).get("nodeName"),
    },
    "jobs": {"status.successful": lambda obj: str((obj.get("status") or {}).get("succeeded", 0))},
    "secrets": {"type": lambda obj: obj.get("type")},
}


def field_matcher(plural: str, selector: str | None) -> Matcher:
    """A predicate on the fields the API server lets one select on for ``plural``."""
    readers = {**_FIELDS, **_EXTRA_FIELDS.get(plural, {})}
    requirements: list[Matcher] = []
    for part in _split(selector or ""):
        match = _EQUALITY.match(part)
        if not match:
            raise ApiError(400, f"invalid field selector: {part.strip()!r}")
        key, op, value = match.groups()
        if key not in readers:
            raise ApiError(400, f"field label not supported: {key}")
        reader = readers[key]
        if op == "!=":
            requirements.append(lambda obj, r=reader, v=value: str(r(obj) or "") != v)
        else:
            requirements.append(lambda obj, r=reader, v=value: str(r(obj) or "") == v)
    return lambda obj: all(requirement(obj) for requirement in requirements)
