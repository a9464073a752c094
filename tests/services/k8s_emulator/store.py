"""``Store``: the emulator's etcd. Objects by resource, namespace and name; one resource version counter; a bounded
history of changes for watches; listeners (controllers, watch streams) told of every change as it happens.

Stored objects are never changed in place: every write stores a new dict, so a change in the history and an object
handed to a watch stay as they were.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tests.services.k8s_emulator.selectors import Matcher
from tests.services.k8s_emulator.status import ApiError, conflict, not_found

logger = logging.getLogger("k8s_emulator")


@dataclass(frozen=True)
class Resource:
    """A resource the emulator serves."""

    kind: str
    plural: str
    group: str
    version: str
    namespaced: bool = True
    has_status: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``jobs.batch`` / ``pods``: how the API server names the resource in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


JOBS = Resource("Job", "jobs", "batch", "v1", has_status=True)
PODS = Resource("Pod", "pods", "", "v1", has_status=True)
SECRETS = Resource("Secret", "secrets", "", "v1")
NAMESPACES = Resource("Namespace", "namespaces", "", "v1", namespaced=False, has_status=True)
RESOURCES = {(r.group, r.version, r.plural): r for r in (JOBS, PODS, SECRETS, NAMESPACES)}


@dataclass(frozen=True)
class Change:
    """One write: ``type`` is ADDED, MODIFIED or DELETED; ``old`` is the object before it (None when added)."""

    version: int
    resource: Resource
    type: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


Listener = Callable[[Change], None]


def now() -> str:
    """A timestamp as the API server writes it (RFC 3339, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Store:
    """Every object of the emulated cluster."""

    def __init__(self, history: int = 10_000) -> None:
        self.version = 1000
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.history: deque[Change] = deque(maxlen=history)
        self._listeners: list[Listener] = []
        self._pending: deque[Change] = deque()
        self._emitting = False

    # -- reading ------------------------------------------------------------------------------------------------------

    def peek(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored object itself (do not change it), or None."""
        return self._objects.get((resource.plural, namespace if resource.namespaced else "", name))

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any]:
        """A copy of the object; 404 when there is none."""
        obj = self.peek(resource, namespace, name)
        if obj is None:
            raise not_found(resource.qualified, name)
        return copy.deepcopy(obj)

    def select(self, resource: Resource, namespace: str | None, *matchers: Matcher) -> Iterator[dict[str, Any]]:
        """Stored objects (do not change them) of ``resource`` in ``namespace`` (None: all) that every matcher accepts,
        in namespace and name order."""
        for (plural, ns, _), obj in sorted(self._objects.items(), key=lambda item: item[0]):
            if plural == resource.plural and (namespace is None or ns == namespace) and all(m(obj) for m in matchers):
                yield obj

    def oldest_version(self) -> int:
        """The oldest resource version a watch can still resume from."""
        return self.history[0].version - 1 if self.history else self.version

    # -- writing ------------------------------------------------------------------------------------------------------

    def create(self, resource: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a new object, filling the metadata the server owns; 409 when the name is taken."""
        meta = obj.setdefault("metadata", {})
        key = (resource.plural, meta.get("namespace", "") if resource.namespaced else "", meta["name"])
        if key in self._objects:
            raise ApiError(409, f'{resource.qualified} "{meta["name"]}" already exists', details={"name": meta["name"]})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta["creationTimestamp"] = now()
        if resource.kind == "Job":
            meta.setdefault("generation", 1)
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        return self._write(resource, key, obj, "ADDED", None)

    def replace(self, resource: Resource, obj: dict[str, Any], *, expect: str | None = None) -> dict[str, Any]:
        """Store a new version of an existing object; 409 when ``expect`` (a resourceVersion) is not the current one."""
        meta = obj["metadata"]
        key = (resource.plural, meta.get("namespace", "") if resource.namespaced else "", meta["name"])
        old = self._objects.get(key)
        if old is None:
            raise not_found(resource.qualified, meta["name"])
        if expect and expect != old["metadata"]["resourceVersion"]:
            raise conflict(resource.qualified, meta["name"])
        for owned in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds"):
            if owned in old["metadata"]:
                meta[owned] = old["metadata"][owned]
            else:
                meta.pop(owned, None)
        if "generation" in old["metadata"]:
            changed = obj.get("spec") != old.get("spec")
            meta["generation"] = int(old["metadata"]["generation"]) + (1 if changed else 0)
        else:
            meta.pop("generation", None)
        if obj == old:
            return copy.deepcopy(old)  # nothing changed: no new version, no event
        return self._write(resource, key, obj, "MODIFIED", old)

    def mark_deleting(self, resource: Resource, obj: dict[str, Any], grace: int | None) -> dict[str, Any]:
        """Set ``deletionTimestamp`` (the object stays until whoever holds it lets go)."""
        meta = obj["metadata"]
        key = (resource.plural, meta.get("namespace", "") if resource.namespaced else "", meta["name"])
        old = self._objects[key]
        meta["deletionTimestamp"] = now()
        if grace is not None:
            meta["deletionGracePeriodSeconds"] = grace
        return self._write(resource, key, obj, "MODIFIED", old)

    def remove(self, resource: Resource, namespace: str, name: str) -> dict[str, Any]:
        """Delete the object now; its last state (with a new resource version) goes to the DELETED event."""
        key = (resource.plural, namespace if resource.namespaced else "", name)
        old = self._objects.get(key)
        if old is None:
            raise not_found(resource.qualified, name)
        final = copy.deepcopy(old)
        del self._objects[key]
        self.version += 1
        final["metadata"]["resourceVersion"] = str(self.version)
        self._emit(Change(self.version, resource, "DELETED", final, old))
        return copy.deepcopy(final)

    def _write(
        self, resource: Resource, key: tuple[str, str, str], obj: dict[str, Any], kind: str, old: dict[str, Any] | None
    ) -> dict[str, Any]:
        self.version += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self.version)
        stored["apiVersion"], stored["kind"] = resource.api_version, resource.kind
        self._objects[key] = stored
        self._emit(Change(self.version, resource, kind, stored, old))
        return copy.deepcopy(stored)

    # -- listening ----------------------------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, change: Change) -> None:
        """Tell every listener, in resource version order: a write a listener makes while being told is queued and
        told once every listener heard of the change before it."""
        self.history.append(change)
        self._pending.append(change)
        if self._emitting:
            return
        self._emitting = True
        try:
            while self._pending:
                current = self._pending.popleft()
                for listener in list(self._listeners):
                    try:
                        listener(current)
                    except Exception:
                        logger.exception(
                            "a listener failed on %s %s", current.type, current.obj["metadata"].get("name")
                        )
        finally:
            self._emitting = False
