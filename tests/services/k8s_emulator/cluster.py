"""``Cluster``: deletion as the API server and the garbage collector do it, shared by the API and the controllers.

* Pods bound to a node are deleted gracefully: ``deletionTimestamp`` is set and the kubelet removes the pod once its
  containers stopped. Other objects go at once.
* ``propagationPolicy``: ``Background`` deletes the owner now and its dependents (objects whose ``ownerReferences``
  name it) right after; ``Foreground`` keeps the owner, marked ``foregroundDeletion``, until its dependents are gone;
  ``Orphan`` takes the owner out of the dependents' ``ownerReferences`` and leaves them. Without a policy, Jobs orphan
  their pods (the ``batch/v1`` default that makes ``kubectl`` pass ``Background``); everything else is Background.
* A dependent whose owners are all gone is deleted, also when it named an owner that never existed.
* A namespace being deleted takes everything in it along.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

from tests.services.k8s_emulator.status import ApiError, success
from tests.services.k8s_emulator.store import JOBS, NAMESPACES, PODS, RESOURCES, Change, Resource, Store

FOREGROUND = "foregroundDeletion"
POLICIES = ("Background", "Foreground", "Orphan")


class Cluster:
    """The store plus the rules of deleting; subscribes its garbage collector to the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.subscribe(self._collect)

    def delete(
        self, resource: Resource, namespace: str, name: str, *, policy: str | None = None, grace: int | None = None
    ) -> dict[str, Any]:
        """Delete one object; returns what the API answers (the object still being deleted, or a Success Status)."""
        obj = self.store.get(resource, namespace, name)
        if policy is not None and policy not in POLICIES:
            raise ApiError(
                422,
                f'propagationPolicy: Unsupported value: "{policy}": supported values: "Foreground", "Background",'
                ' "Orphan"',
            )
        if policy is None:
            policy = "Orphan" if resource is JOBS else "Background"
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return obj  # already on its way out
        if resource is NAMESPACES:
            obj.setdefault("status", {})["phase"] = "Terminating"
            marked = self.store.mark_deleting(resource, obj, 0)
            self._empty_namespace(name)
            return marked
        if policy == "Orphan":
            self._orphan(namespace, meta["uid"])
        if policy == "Foreground" and self._dependents(namespace, meta["uid"]):
            meta["finalizers"] = [*(meta.get("finalizers") or []), FOREGROUND]
            marked = self.store.mark_deleting(resource, obj, 0)
            for kind, dependent in self._dependents(namespace, meta["uid"]):
                self.delete(kind, namespace, dependent["metadata"]["name"], policy="Background")
            return marked
        if resource is PODS:
            phase = (obj.get("status") or {}).get("phase")
            if grace is None:
                grace = int(obj["spec"].get("terminationGracePeriodSeconds", 30))
            if obj["spec"].get("nodeName") and phase not in ("Succeeded", "Failed") and grace > 0:
                return self.store.mark_deleting(resource, obj, grace)  # the kubelet stops it, then removes it
        final = self.store.remove(resource, namespace, name)
        return success(
            {"name": name, "group": resource.group, "kind": resource.plural, "uid": final["metadata"]["uid"]}
        )

    # -- garbage collection -------------------------------------------------------------------------------------------

    def _dependents(self, namespace: str, uid: str) -> list[tuple[Resource, dict[str, Any]]]:
        found = []
        for resource in RESOURCES.values():
            if not resource.namespaced:
                continue
            for obj in self.store.select(resource, namespace):
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or ()):
                    found.append((resource, obj))
        return found

    def _orphan(self, namespace: str, uid: str) -> None:
        for resource, dependent in self._dependents(namespace, uid):
            changed = copy.deepcopy(dependent)
            refs = [ref for ref in changed["metadata"].get("ownerReferences") or () if ref.get("uid") != uid]
            if refs:
                changed["metadata"]["ownerReferences"] = refs
            else:
                changed["metadata"].pop("ownerReferences", None)
            self.store.replace(resource, changed)

    def _owners_gone(self, namespace: str, obj: dict[str, Any]) -> bool:
        refs = obj["metadata"].get("ownerReferences") or []
        if not refs:
            return False
        alive = {
            o["metadata"]["uid"]
            for resource in RESOURCES.values()
            if resource.namespaced
            for o in self.store.select(resource, namespace)
            if FOREGROUND not in (o["metadata"].get("finalizers") or ())
        }
        return not any(ref.get("uid") in alive for ref in refs)

    def _collect(self, change: Change) -> None:
        """React to a change as the garbage collector would."""
        meta = change.obj["metadata"]
        namespace = meta.get("namespace", "")
        if change.type == "DELETED" and change.resource.namespaced:
            for resource, dependent in self._dependents(namespace, meta["uid"]):
                if self._owners_gone(namespace, dependent):
                    self._quietly_delete(resource, namespace, dependent["metadata"]["name"])
            self._finish_foreground(namespace, meta.get("ownerReferences") or [])
            namespace_obj = self.store.peek(NAMESPACES, "", namespace)
            if namespace_obj is not None and namespace_obj["metadata"].get("deletionTimestamp"):
                self._empty_namespace(namespace)
        elif change.type == "ADDED" and change.resource.namespaced and self._owners_gone(namespace, change.obj):
            self._quietly_delete(change.resource, namespace, meta["name"])  # it names owners that do not exist

    def _finish_foreground(self, namespace: str, refs: list[dict[str, Any]]) -> None:
        for ref in refs:
            for resource in RESOURCES.values():
                if not resource.namespaced:
                    continue
                for owner in list(self.store.select(resource, namespace)):
                    waiting = FOREGROUND in (owner["metadata"].get("finalizers") or ())
                    if (
                        owner["metadata"]["uid"] == ref.get("uid")
                        and waiting
                        and not self._dependents(namespace, ref["uid"])
                    ):
                        self.store.remove(resource, namespace, owner["metadata"]["name"])

    def _empty_namespace(self, namespace: str) -> None:
        left = [(r, o) for r in RESOURCES.values() if r.namespaced for o in self.store.select(r, namespace)]
        for resource, obj in left:
            if not obj["metadata"].get("deletionTimestamp"):
                self._quietly_delete(resource, namespace, obj["metadata"]["name"])
        empty = not any(True for r in RESOURCES.values() if r.namespaced for _ in self.store.select(r, namespace))
        if empty and self.store.peek(NAMESPACES, "", namespace) is not None:
            self.store.remove(NAMESPACES, "", namespace)

    def _quietly_delete(self, resource: Resource, namespace: str, name: str) -> None:
        with contextlib.suppress(ApiError):  # gone meanwhile
            self.delete(resource, namespace, name, policy="Background")
