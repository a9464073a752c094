"""``ApiServer``: the Kubernetes REST API over aiohttp, for the resources in ``store.RESOURCES``.

Paths are the API server's: ``/api/v1/namespaces/{ns}/pods[/{name}[/status|/log]]``,
``/apis/batch/v1/namespaces/{ns}/jobs[/{name}[/status]]``, cluster-wide lists (``/api/v1/pods``) and
``/api/v1/namespaces[/{name}]``. Requests need ``Authorization: Bearer <token>`` when a token is set. Every failure is
a ``Status`` body with the code, reason and message wording of the real server.

``GET /_emulator/stats`` (not a Kubernetes path) reports what the emulator saw: bodies admitted per kind, bodies
refused, requests per verb and resource, and every delete with its propagation policy.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tests.services.k8s_emulator.admission import Admission
from tests.services.k8s_emulator.cluster import Cluster
from tests.services.k8s_emulator.kubelet import Kubelet
from tests.services.k8s_emulator.patch import apply_patch
from tests.services.k8s_emulator.selectors import Matcher, field_matcher, label_matcher
from tests.services.k8s_emulator.status import ApiError, failure
from tests.services.k8s_emulator.store import NAMESPACES, PODS, RESOURCES, Change, Resource, Store

logger = logging.getLogger("k8s_emulator.api")

#: The API server's request body limit, and etcd's limit on one stored object.
MAX_REQUEST = 3 * 1024 * 1024
MAX_OBJECT = 1536 * 1024
#: Seconds a watch stays open when the client does not say (the server's --min-request-timeout).
DEFAULT_WATCH_SECONDS = 1800


class ApiServer:
    """Routes requests to the store, admission, the garbage collector and the kubelet."""

    def __init__(
        self, cluster: Cluster, admission: Admission, kubelet: Kubelet, *, token: str | None, version: str
    ) -> None:
        self.cluster = cluster
        self.store: Store = cluster.store
        self.admission = admission
        self.kubelet = kubelet
        self.token = token
        self.version = version
        self.requests: Counter[str] = Counter()
        self.deletions: list[dict[str, Any]] = []
        self.watches = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST, middlewares=[self._errors])
        app.router.add_get("/version", self._version)
        for path in ("/healthz", "/livez", "/readyz"):
            app.router.add_get(path, self._healthy)
        app.router.add_get("/_emulator/stats", self._stats)
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        return app

    # -- plumbing -----------------------------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        try:
            public = request.path in ("/healthz", "/livez", "/readyz")
            if self.token is not None and not public and request.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized")
            response: web.StreamResponse = await handler(request)
            return response
        except ApiError as exc:
            return web.json_response(exc.body(), status=exc.code)
        except web.HTTPRequestEntityTooLarge:
            body = failure(413, "RequestEntityTooLarge", f"Request entity too large: limit is {MAX_REQUEST}")
            return web.json_response(body, status=413)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            logger.exception("request %s %s failed", request.method, request.path_qs)
            return web.json_response(failure(500, "InternalError", f"{type(exc).__name__}: {exc}"), status=500)

    async def _version(self, request: web.Request) -> web.Response:
        major, minor = self.version.split(".")[:2]
        return web.json_response(
            {
                "major": major,
                "minor": minor,
                "gitVersion": f"v{major}.{minor}.0-emulated",
                "platform": "linux/amd64",
                "compiler": "gc",
            }
        )

    async def _healthy(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "kubernetesVersion": self.version,
                "validated": dict(self.admission.validated),
                "rejected": self.admission.rejected,
                "requests": dict(self.requests),
                "deletions": self.deletions,
                "openWatches": self.watches,
            }
        )

    async def _json(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"couldn't get version/kind; json parse error: {exc}") from None

    # -- routing ------------------------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        resource, namespace, name, sub = _route(request.path)
        query = request.query
        method = request.method
        verb = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
            method, method
        )
        if name is None and method == "GET":
            verb = "watch" if query.get("watch") in ("true", "1") else "list"
        elif name is None and method == "DELETE":
            verb = "deletecollection"
        self.requests[f"{verb} {resource.plural}{'/' + sub if sub else ''}"] += 1
        if resource.namespaced and namespace is None and (name is not None or method != "GET"):
            raise ApiError(404, "the server could not find the requested resource")
        ns = namespace or ""
        if name is None:
            if method == "GET":
                if verb == "watch":
                    return await self._watch(request, resource, namespace)
                return web.json_response(self._list(resource, namespace, query))
            if method == "POST":
                return await self._create(request, resource, ns)
            if method == "DELETE":
                return await self._delete_collection(request, resource, ns)
            raise ApiError(405, f"the server does not allow this method on the requested resource ({method})")
        if sub not in (None, "status", "log") or (sub == "log" and resource is not PODS):
            raise ApiError(404, "the server could not find the requested resource")
        if sub == "log":
            if method != "GET":
                raise ApiError(405, "the server does not allow this method on the requested resource")
            return await self._log(request, ns, name)
        if method == "GET":
            return web.json_response(self.store.get(resource, ns, name))
        if method in ("PUT", "PATCH"):
            return await self._update(request, resource, ns, name, status=sub == "status")
        if method == "DELETE":
            return await self._delete(request, resource, ns, name)
        raise ApiError(405, f"the server does not allow this method on the requested resource ({method})")

    # -- verbs --------------------------------------------------------------------------------------------------------

    def _list(self, resource: Resource, namespace: str | None, query: Any) -> dict[str, Any]:
        matchers = [
            label_matcher(query.get("labelSelector")),
            field_matcher(resource.plural, query.get("fieldSelector")),
        ]
        items = list(self.store.select(resource, namespace, *matchers))
        start = 0
        token = query.get("continue")
        if token:
            try:
                after = json.loads(base64.urlsafe_b64decode(token.encode()))
            except ValueError:
                raise ApiError(400, "continue key is not valid") from None
            keys = [[i["metadata"].get("namespace", ""), i["metadata"]["name"]] for i in items]
            start = next((index for index, key in enumerate(keys) if key > after), len(items))
        limit = int(query.get("limit") or 0)
        chosen = items[start : start + limit] if limit > 0 else items[start:]
        meta: dict[str, Any] = {"resourceVersion": str(self.store.version)}
        if limit > 0 and start + limit < len(items):
            last = chosen[-1]["metadata"]
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps([last.get("namespace", ""), last["name"]]).encode()
            ).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        listed = []
        for item in chosen:
            item = copy.deepcopy(item)
            item.pop("apiVersion", None)  # items of a typed list carry no type of their own
            item.pop("kind", None)
            listed.append(item)
        return {"kind": f"{resource.kind}List", "apiVersion": resource.api_version, "metadata": meta, "items": listed}

    async def _create(self, request: web.Request, resource: Resource, namespace: str) -> web.Response:
        body = await self._json(request)
        if resource.namespaced:
            space = self.store.peek(NAMESPACES, "", namespace)
            if space is None:
                raise ApiError(
                    404, f'namespaces "{namespace}" not found', details={"name": namespace, "kind": "namespaces"}
                )
            if space["metadata"].get("deletionTimestamp"):
                raise ApiError(
                    403,
                    f'{resource.plural} "{(body.get("metadata") or {}).get("name")}" is forbidden: unable to create new'
                    f" content in namespace {namespace} because it is being terminated",
                )
        obj, warnings = self.admission.create(resource, body, namespace, request.query.get("fieldValidation"))
        self._check_size(obj)
        if request.query.get("dryRun") == "All":
            obj["metadata"]["creationTimestamp"] = None
            return self._answer(obj, 201, warnings)
        return self._answer(self.store.create(resource, obj), 201, warnings)

    async def _update(
        self, request: web.Request, resource: Resource, namespace: str, name: str, *, status: bool
    ) -> web.Response:
        old = self.store.get(resource, namespace, name)
        body = await self._json(request)
        # A resourceVersion in a PUT body or a patch is a precondition: 409 when the object changed since.
        expect = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        new = apply_patch(request.headers.get("Content-Type", ""), old, body) if request.method == "PATCH" else body
        obj, warnings = self.admission.update(resource, new, old, request.query.get("fieldValidation"), status=status)
        self._check_size(obj)
        if request.query.get("dryRun") == "All":
            return self._answer(obj, 200, warnings)
        return self._answer(self.store.replace(resource, obj, expect=expect), 200, warnings)

    async def _delete(self, request: web.Request, resource: Resource, namespace: str, name: str) -> web.Response:
        options: dict[str, Any] = {}
        if request.can_read_body:
            raw = await request.read()
            if raw.strip():
                options = await self._json_from(raw)
        query = request.query
        policy = query.get("propagationPolicy") or options.get("propagationPolicy")
        orphan = query.get("orphanDependents", options.get("orphanDependents"))
        if policy is None and orphan is not None:
            policy = "Orphan" if str(orphan).lower() == "true" else "Background"
        grace_text = query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
        grace = int(grace_text) if grace_text is not None else None
        if query.get("dryRun") == "All":
            return web.json_response(self.store.get(resource, namespace, name))
        self.deletions.append(
            {"resource": resource.plural, "namespace": namespace, "name": name, "propagationPolicy": policy}
        )
        return web.json_response(self.cluster.delete(resource, namespace, name, policy=policy, grace=grace))

    async def _json_from(self, raw: bytes) -> dict[str, Any]:
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"couldn't get version/kind; json parse error: {exc}") from None
        return value if isinstance(value, dict) else {}

    async def _delete_collection(self, request: web.Request, resource: Resource, namespace: str) -> web.Response:
        listed = self._list(resource, namespace, request.query)
        policy = request.query.get("propagationPolicy")
        for item in listed["items"]:
            self.deletions.append(
                {
                    "resource": resource.plural,
                    "namespace": namespace,
                    "name": item["metadata"]["name"],
                    "propagationPolicy": policy,
                }
            )
            try:
                self.cluster.delete(resource, namespace, item["metadata"]["name"], policy=policy)
            except ApiError as exc:
                if exc.code != 404:
                    raise
        return web.json_response(listed)

    async def _log(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        pod = self.store.get(PODS, namespace, name)
        names = [c["name"] for c in [*(pod["spec"].get("initContainers") or ()), *pod["spec"]["containers"]]]
        container = request.query.get("container")
        if container is None:
            if len(pod["spec"]["containers"]) != 1:
                raise ApiError(
                    400, f"a container name must be specified for pod {name}, choose one of: [{' '.join(names)}]"
                )
            container = pod["spec"]["containers"][0]["name"]
        if container not in names:
            raise ApiError(400, f"container {container} is not valid for pod {name}")
        status = pod.get("status") or {}
        entry = next(
            (
                s
                for s in [*(status.get("initContainerStatuses") or ()), *(status.get("containerStatuses") or ())]
                if s["name"] == container
            ),
            None,
        )
        state = (entry or {}).get("state") or {"waiting": {"reason": "ContainerCreating"}}
        if "waiting" in state and not (entry or {}).get("lastState"):
            reason = state["waiting"].get("reason", "ContainerCreating")
            raise ApiError(400, f'container "{container}" in pod "{name}" is waiting to start: {reason}')
        if request.query.get("previous") in ("true", "1") and not (entry or {}).get("restartCount"):
            raise ApiError(400, f'previous terminated container "{container}" in pod "{name}" not found')
        run = self.kubelet.run_of(pod["metadata"]["uid"])
        text = run.log_text(container) if run is not None else ""
        tail = request.query.get("tailLines")
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail) :]) if int(tail) > 0 else ""
        data = text.encode()
        limit = request.query.get("limitBytes")
        if limit is not None:
            data = data[: int(limit)]
        return web.Response(body=data, content_type="text/plain")

    # -- watch --------------------------------------------------------------------------------------------------------

    async def _watch(self, request: web.Request, resource: Resource, namespace: str | None) -> web.StreamResponse:
        query = request.query
        labels = label_matcher(query.get("labelSelector"))
        fields = field_matcher(resource.plural, query.get("fieldSelector"))
        since = query.get("resourceVersion") or "0"
        if not since.isdigit():
            raise ApiError(400, f'resourceVersion: Invalid value: "{since}": must be a number')
        timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_SECONDS)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        queue: asyncio.Queue[Change] = asyncio.Queue()

        def listen(change: Change) -> None:
            if change.resource is resource and (
                namespace is None or change.obj["metadata"].get("namespace") == namespace
            ):
                queue.put_nowait(change)

        self.store.subscribe(listen)
        self.watches += 1
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            last = self.store.version
            if since == "0":
                for obj in self.store.select(resource, namespace, labels, fields):
                    await _send(response, "ADDED", obj)
            elif int(since) < self.store.oldest_version():
                message = f"too old resource version: {since} ({self.store.oldest_version()})"
                await response.write(
                    json.dumps({"type": "ERROR", "object": failure(410, "Expired", message)}).encode() + b"\n"
                )
                return response
            else:
                for change in list(self.store.history):
                    if change.version > int(since) and change.version <= last:
                        listen_event = _event(change, resource, namespace, labels, fields)
                        if listen_event is not None:
                            await _send(response, *listen_event)
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    change = await asyncio.wait_for(queue.get(), min(remaining, 1.0))
                except TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        break
                    continue
                if change.version <= last:
                    continue
                last = change.version
                event = _event(change, resource, namespace, labels, fields)
                if event is not None:
                    await _send(response, *event)
            if bookmarks:
                bookmark = {
                    "kind": resource.kind,
                    "apiVersion": resource.api_version,
                    "metadata": {"resourceVersion": str(last)},
                }
                await _send(response, "BOOKMARK", bookmark)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.watches -= 1
            self.store.unsubscribe(listen)
        return response

    # -- helpers ------------------------------------------------------------------------------------------------------

    def _check_size(self, obj: dict[str, Any]) -> None:
        if len(json.dumps(obj)) > MAX_OBJECT:
            raise ApiError(500, "etcdserver: request is too large", reason="InternalError")

    @staticmethod
    def _answer(obj: dict[str, Any], status: int, warnings: list[str]) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict()
        for warning in warnings:
            headers.add("Warning", f"299 - {json.dumps(warning)}")
        return web.json_response(obj, status=status, headers=headers)


def _route(path: str) -> tuple[Resource, str | None, str | None, str | None]:
    parts = [part for part in path.split("/") if part]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiError(404, "the server could not find the requested resource")
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and (group, version, rest[2]) in RESOURCES:
        namespace, rest = rest[1], rest[2:]
    if not rest or (group, version, rest[0]) not in RESOURCES or len(rest) > 3:
        raise ApiError(404, "the server could not find the requested resource")
    resource = RESOURCES[(group, version, rest[0])]
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    return resource, namespace, name, sub


def _event(
    change: Change, resource: Resource, namespace: str | None, labels: Matcher, fields: Matcher
) -> tuple[str, dict[str, Any]] | None:
    """What a watch with these selectors reports for ``change``: objects entering or leaving the selection are
    ADDED or DELETED, as the API server does."""
    if change.resource is not resource or (
        namespace is not None and change.obj["metadata"].get("namespace") != namespace
    ):
        return None
    now = labels(change.obj) and fields(change.obj)
    before = change.old is not None and labels(change.old) and fields(change.old)
    if change.type == "DELETED":
        return ("DELETED", change.obj) if before or now else None
    if change.type == "ADDED" or not before:
        return ("ADDED", change.obj) if now else None
    return ("MODIFIED", change.obj) if now else ("DELETED", change.obj)


async def _send(response: web.StreamResponse, kind: str, obj: dict[str, Any]) -> None:
    await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
