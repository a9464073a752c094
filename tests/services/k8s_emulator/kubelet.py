"""``Kubelet``: schedules pods onto the emulator's one node and runs their containers as local processes.

Scheduling honours ``nodeSelector`` (the node carries ``kubernetes.io/hostname``, ``kubernetes.io/os`` and
``kubernetes.io/arch``); a pod that matches no node stays ``Pending`` with ``PodScheduled=False``/``Unschedulable``.

Each container goes through the states a real kubelet reports:

* ``waiting``/``ContainerCreating``; ``ErrImagePull`` then ``ImagePullBackOff`` (with back-off) for an image that does
  not exist (``--image`` lists those that do), ``ErrImageNeverPull`` for a missing image with ``imagePullPolicy:
  Never``; ``CreateContainerConfigError`` while an env var's Secret or key is missing.
* ``running`` while its process runs: ``command`` + ``args`` (``$(VAR)`` expanded) executed with only the container's
  environment (plus ``PATH``, ``HOSTNAME``, ``HOME`` and the service variables) in an empty working directory, in a
  process group of its own, output and errors to the container log.
* ``terminated`` with the exit code (128 + signal when killed), reason ``Completed``/``Error``, or ``StartError``
  with exit code 128 and the runtime's message when the command cannot be executed; ``FallbackToLogsOnError``
  puts the log's tail (80 lines, 2 KiB) into the termination message.

``restartPolicy`` ``OnFailure``/``Always`` restart containers (``CrashLoopBackOff`` in between); with ``Never`` the pod
ends ``Succeeded`` or ``Failed``. A pod marked for deletion gets SIGTERM on every process group, SIGKILL after its
grace period, and is removed from the store once they all exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import fnmatch
import logging
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.services.k8s_emulator.cluster import Cluster
from tests.services.k8s_emulator.status import ApiError
from tests.services.k8s_emulator.store import PODS, SECRETS, Change, now

__all__ = ["Kubelet", "PodRun", "normalize"]

logger = logging.getLogger("k8s_emulator.kubelet")

#: Seconds of the first image-pull and crash-loop back-off (10 s on a real node), doubled up to ``MAX_BACKOFF``.
BACKOFF = 0.5
MAX_BACKOFF = 10.0
#: What ``FallbackToLogsOnError`` copies into the termination message.
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048
_REFERENCE = re.compile(r"\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)|\$\$")


class ConfigProblem(Exception):
    """A container's configuration cannot be resolved yet (``CreateContainerConfigError``)."""


def normalize(image: str) -> str:
    """``busybox`` -> ``docker.io/library/busybox:latest``, as container runtimes name images."""
    name, digest = [*image.split("@", 1), ""][:2]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        name += ":latest"
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    return f"{name}@{digest}" if digest else name


@dataclass
class Container:
    """One container of a pod being run."""

    spec: dict[str, Any]
    log: Path
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0


class Kubelet:
    """The node's kubelet (and the cluster's scheduler)."""

    def __init__(
        self,
        cluster: Cluster,
        loop: asyncio.AbstractEventLoop,
        *,
        workdir: Path,
        images: list[str],
        node: str,
        service_host: str,
        service_port: int,
    ) -> None:
        self.cluster = cluster
        self.store = cluster.store
        self.loop = loop
        self.workdir = workdir
        self.images = [normalize(image) if "*" not in image else image for image in images]
        self.node = node
        self.node_labels = {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        self.service = {"KUBERNETES_SERVICE_HOST": service_host, "KUBERNETES_SERVICE_PORT": str(service_port)}
        self._pods: dict[str, PodRun] = {}
        self.store.subscribe(self._on_change)

    def available(self, image: str) -> bool:
        ref = normalize(image)
        return any(ref == known or fnmatch.fnmatchcase(image, known) for known in self.images)

    def run_of(self, uid: str) -> PodRun | None:
        return self._pods.get(uid)

    def shutdown(self) -> None:
        """Kill every process this kubelet started (the emulator is stopping)."""
        for run in self._pods.values():
            run.kill_all(signal.SIGKILL)

    def _on_change(self, change: Change) -> None:
        if change.resource is not PODS:
            return
        pod = change.obj
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid = meta["uid"]
        if change.type == "DELETED":
            run = self._pods.pop(uid, None)
            if run is not None:
                run.kill_all(signal.SIGKILL)
            return
        if not spec.get("nodeName"):
            if change.type == "ADDED":
                self.loop.call_soon(self._schedule, meta["namespace"], meta["name"], uid)
            return
        if spec["nodeName"] != self.node:
            return
        run = self._pods.get(uid)
        if (
            run is None
            and not meta.get("deletionTimestamp")
            and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ):
            run = self._pods[uid] = PodRun(self, meta["namespace"], meta["name"], uid)
            run.task = self.loop.create_task(run.main())
        if meta.get("deletionTimestamp"):
            if run is None:
                with contextlib.suppress(ApiError):
                    self.store.remove(PODS, meta["namespace"], meta["name"])
            else:
                run.terminate(int(meta.get("deletionGracePeriodSeconds") or 0))

    def _schedule(self, namespace: str, name: str, uid: str) -> None:
        pod = self.store.peek(PODS, namespace, name)
        if pod is None or pod["metadata"]["uid"] != uid or pod["spec"].get("nodeName"):
            return
        pod = copy.deepcopy(pod)
        wanted = pod["spec"].get("nodeSelector") or {}
        status = pod.setdefault("status", {})
        status["phase"] = "Pending"
        if all(self.node_labels.get(key) == value for key, value in wanted.items()):
            pod["spec"]["nodeName"] = self.node
            _condition(status, "PodScheduled", "True")
        else:
            message = (
                "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/1 nodes"
                " are available: 1 Preemption is not helpful for scheduling."
            )
            _condition(status, "PodScheduled", "False", "Unschedulable", message)
        self.store.replace(PODS, pod)


class PodRun:
    """Runs one pod's containers from start to end (or deletion)."""

    def __init__(self, kubelet: Kubelet, namespace: str, name: str, uid: str) -> None:
        self.kubelet = kubelet
        self.store = kubelet.store
        self.namespace, self.name, self.uid = namespace, name, uid
        self.directory = kubelet.workdir / "pods" / f"{namespace}_{name}_{uid}"
        self.deleting = asyncio.Event()
        self.containers: dict[str, Container] = {}
        self.task: asyncio.Task[None] | None = None
        self._kill: asyncio.TimerHandle | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    async def main(self) -> None:
        try:
            await self._run()
        except Exception:
            logger.exception("running pod %s/%s failed", self.namespace, self.name)
        finally:
            if self.deleting.is_set():
                with contextlib.suppress(ApiError):
                    self.store.remove(PODS, self.namespace, self.name)

    def terminate(self, grace: int) -> None:
        if self.deleting.is_set():
            return
        self.deleting.set()
        self.kill_all(signal.SIGTERM if grace > 0 else signal.SIGKILL)
        self._kill = self.kubelet.loop.call_later(grace, self.kill_all, signal.SIGKILL)

    def kill_all(self, sig: int) -> None:
        for container in self.containers.values():
            process = container.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, sig)

    async def _run(self) -> None:
        pod = self._pod()
        if pod is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        spec = pod["spec"]
        for group in ("initContainers", "containers"):
            for container in spec.get(group) or ():
                self.containers[container["name"]] = Container(container, self.directory / f"{container['name']}.log")
        init = [self.containers[c["name"]] for c in spec.get("initContainers") or ()]
        main = [self.containers[c["name"]] for c in spec.get("containers") or ()]

        def start(status: dict[str, Any]) -> None:
            status.update({"phase": "Pending", "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": now()})
            status["podIPs"], status["hostIPs"] = [{"ip": "127.0.0.1"}], [{"ip": "127.0.0.1"}]
            _condition(status, "PodReadyToStartContainers", "True")
            _condition(status, "Initialized", "False" if init else "True", "ContainersNotInitialized" if init else None)
            _condition(status, "Ready", "False", "ContainersNotReady")
            _condition(status, "ContainersReady", "False", "ContainersNotReady")
            for key, group in (("initContainerStatuses", init), ("containerStatuses", main)):
                if group:
                    status[key] = [
                        _waiting(c.spec, "PodInitializing" if init and group is main else "ContainerCreating")
                        for c in group
                    ]

        self._update(start)
        policy = spec.get("restartPolicy", "Always")
        for container in init:
            if await self._container(container, "Never" if policy == "Never" else "OnFailure") != 0:
                return self._finish(failed=True)
        if init:
            self._update(lambda status: _condition(status, "Initialized", "True"))
        codes = await asyncio.gather(*(self._container(container, policy) for container in main))
        self._finish(failed=any(code != 0 for code in codes))

    def _finish(self, *, failed: bool) -> None:
        def end(status: dict[str, Any]) -> None:
            status["phase"] = "Failed" if failed else "Succeeded"
            _condition(status, "Ready", "False", "PodFailed" if failed else "PodCompleted")
            _condition(status, "ContainersReady", "False", "PodFailed" if failed else "PodCompleted")
            _condition(status, "PodReadyToStartContainers", "False")

        self._update(end)

    # -- one container ------------------------------------------------------------------------------------------------

    async def _container(self, container: Container, policy: str) -> int:
        """Pull, configure and run ``container`` (again, per ``policy``); its last exit code, or -1 if it never ran."""
        if not await self._pull(container):
            return -1
        environment = await self._configure(container)
        if environment is None:
            return -1
        backoff = BACKOFF
        while True:
            code = await self._execute(container, environment)
            if self.deleting.is_set() or policy == "Never" or (policy == "OnFailure" and code == 0):
                return code
            container.restarts += 1
            reason = (
                f"back-off {backoff:g}s restarting failed container={container.spec['name']}"
                f" pod={self.name}_{self.namespace}({self.uid})"
            )
            self._set_state(container, {"waiting": {"reason": "CrashLoopBackOff", "message": reason}}, keep_last=True)
            if await self._sleep(backoff):
                return code
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _pull(self, container: Container) -> bool:
        image = str(container.spec.get("image"))
        backoff = BACKOFF
        while not self.kubelet.available(image):
            if container.spec.get("imagePullPolicy") == "Never":
                message = f'Container image "{image}" is not present with pull policy of Never'
                self._set_state(container, {"waiting": {"reason": "ErrImageNeverPull", "message": message}})
                await self.deleting.wait()
                return False
            ref = normalize(image)
            message = (
                f'rpc error: code = NotFound desc = failed to pull and unpack image "{ref}": failed to resolve'
                f' reference "{ref}": {ref}: not found'
            )
            self._set_state(container, {"waiting": {"reason": "ErrImagePull", "message": message}})
            if await self._sleep(0.2):
                return False
            self._set_state(
                container, {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}}
            )
            if await self._sleep(backoff):
                return False
            backoff = min(backoff * 2, MAX_BACKOFF)
        return not self.deleting.is_set()

    async def _configure(self, container: Container) -> dict[str, str] | None:
        backoff = BACKOFF
        while True:
            try:
                return self._environment(container.spec)
            except ConfigProblem as problem:
                self._set_state(
                    container, {"waiting": {"reason": "CreateContainerConfigError", "message": str(problem)}}
                )
            if await self._sleep(backoff):
                return None
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _execute(self, container: Container, environment: dict[str, str]) -> int:
        spec = container.spec
        argv = [_expand(str(part), environment) for part in [*(spec.get("command") or ()), *(spec.get("args") or ())]]
        workdir = self.directory / f"{spec['name']}-root"
        workdir.mkdir(exist_ok=True)
        started = now()
        if not argv:
            return self._start_failed(container, started, "no command specified")
        with container.log.open("ab") as log:
            try:
                container.process = await asyncio.create_subprocess_exec(
                    *argv,
                    env=environment,
                    cwd=workdir,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                return self._start_failed(container, started, f'exec: "{argv[0]}": {_exec_problem(exc)}')
        logger.debug(
            "pod %s/%s: container %s started as process %s",
            self.namespace,
            self.name,
            spec["name"],
            container.process.pid,
        )
        self._set_state(container, {"running": {"startedAt": started}}, ready=True)
        self._update(self._maybe_running)
        if self.deleting.is_set():  # deleted while starting: the SIGTERM went to no process
            self.kill_all(signal.SIGTERM)
        returncode = await container.process.wait()
        logger.debug("pod %s/%s: container %s exited with %s", self.namespace, self.name, spec["name"], returncode)
        code = returncode if returncode >= 0 else 128 - returncode
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started,
            "finishedAt": now(),
            "containerID": f"containerd://{self.uid.replace('-', '')}{container.restarts}",
        }
        if code != 0 and spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            terminated["message"] = _tail(container.log)
        self._set_state(container, {"terminated": terminated})
        return code

    def _start_failed(self, container: Container, started: str, problem: str) -> int:
        message = (
            "failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create"
            f" failed: unable to start container process: error during container init: {problem}: unknown"
        )
        terminated = {
            "exitCode": 128,
            "reason": "StartError",
            "message": message,
            "startedAt": started,
            "finishedAt": now(),
        }
        self._set_state(container, {"terminated": terminated})
        return 128

    def _environment(self, spec: dict[str, Any]) -> dict[str, str]:
        """The container's environment as the runtime builds it; ``ConfigProblem`` while a source is missing."""
        pod = self._pod() or {}
        result = {
            "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOSTNAME": self.name,
            "HOME": str(self.directory),
            **self.kubelet.service,
        }
        for source in spec.get("envFrom") or ():
            ref = source.get("secretRef")
            if ref is not None:
                data = self._secret(ref["name"], optional=bool(ref.get("optional")))
                prefix = source.get("prefix", "")
                result.update({f"{prefix}{key}": value for key, value in data.items()})
            elif source.get("configMapRef") is not None and not source["configMapRef"].get("optional"):
                raise ConfigProblem(f'configmap "{source["configMapRef"]["name"]}" not found')
        for env in spec.get("env") or ():
            source = env.get("valueFrom")
            if source is None:
                result[env["name"]] = _expand(str(env.get("value") or ""), result)
                continue
            if source.get("secretKeyRef") is not None:
                ref = source["secretKeyRef"]
                data = self._secret(ref["name"], optional=bool(ref.get("optional")))
                if ref["key"] in data:
                    result[env["name"]] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise ConfigProblem(f"couldn't find key {ref['key']} in Secret {self.namespace}/{ref['name']}")
            elif source.get("fieldRef") is not None:
                result[env["name"]] = _field(pod, source["fieldRef"]["fieldPath"])
            elif source.get("configMapKeyRef") is not None and not source["configMapKeyRef"].get("optional"):
                raise ConfigProblem(f'configmap "{source["configMapKeyRef"]["name"]}" not found')
        return result

    def _secret(self, name: str, *, optional: bool) -> dict[str, str]:
        import base64

        secret = self.store.peek(SECRETS, self.namespace, name)
        if secret is None:
            if optional:
                return {}
            raise ConfigProblem(f'secret "{name}" not found')
        return {
            key: base64.b64decode(value).decode("utf-8", errors="replace")
            for key, value in (secret.get("data") or {}).items()
        }

    # -- status -------------------------------------------------------------------------------------------------------

    def _pod(self) -> dict[str, Any] | None:
        pod = self.store.peek(PODS, self.namespace, self.name)
        return pod if pod is not None and pod["metadata"]["uid"] == self.uid else None

    def _update(self, change: Callable[[dict[str, Any]], None]) -> None:
        pod = self._pod()
        if pod is None:
            return
        pod = copy.deepcopy(pod)
        change(pod.setdefault("status", {}))
        self.store.replace(PODS, pod)

    def _set_state(
        self, container: Container, state: dict[str, Any], *, ready: bool = False, keep_last: bool = False
    ) -> None:
        name = container.spec["name"]

        def change(status: dict[str, Any]) -> None:
            for key in ("initContainerStatuses", "containerStatuses"):
                for entry in status.get(key) or ():
                    if entry["name"] == name:
                        if keep_last or "terminated" in entry["state"]:
                            entry["lastState"] = (
                                entry["state"] if "terminated" in entry["state"] else entry.get("lastState", {})
                            )
                        entry["state"] = state
                        entry["ready"] = ready
                        entry["started"] = "running" in state
                        entry["restartCount"] = container.restarts
                        if "running" in state or "terminated" in state:
                            entry["imageID"] = f"{normalize(str(container.spec.get('image')))}@sha256:{'0' * 64}"
                            entry["containerID"] = f"containerd://{self.uid.replace('-', '')}{container.restarts}"

        self._update(change)

    @staticmethod
    def _maybe_running(status: dict[str, Any]) -> None:
        statuses = status.get("containerStatuses") or []
        if statuses and all("running" in entry["state"] for entry in statuses):
            status["phase"] = "Running"
            _condition(status, "Ready", "True")
            _condition(status, "ContainersReady", "True")
        elif any("running" in entry["state"] for entry in statuses):
            status["phase"] = "Running"

    async def _sleep(self, seconds: float) -> bool:
        """Sleep ``seconds``; True when the pod was marked for deletion meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.deleting.wait(), seconds)
        return self.deleting.is_set()

    def log_text(self, container: str) -> str:
        path = self.containers[container].log if container in self.containers else None
        return path.read_text(errors="replace") if path is not None and path.exists() else ""


# -- helpers ---------------------------------------------------------------------------------------------------------


def _waiting(spec: dict[str, Any], reason: str) -> dict[str, Any]:
    return {
        "name": spec["name"],
        "image": spec.get("image", ""),
        "imageID": "",
        "ready": False,
        "started": False,
        "restartCount": 0,
        "state": {"waiting": {"reason": reason}},
        "lastState": {},
    }


def _condition(
    status: dict[str, Any], kind: str, value: str, reason: str | None = None, message: str | None = None
) -> None:
    conditions = status.setdefault("conditions", [])
    entry = next((c for c in conditions if c["type"] == kind), None)
    if entry is None:
        entry = {"type": kind, "lastProbeTime": None}
        conditions.append(entry)
    if entry.get("status") != value:
        entry["lastTransitionTime"] = now()
    entry["status"] = value
    for key, text in (("reason", reason), ("message", message)):
        if text:
            entry[key] = text
        else:
            entry.pop(key, None)


def _expand(text: str, values: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names are replaced, ``$$`` is a literal ``$``, the rest stays."""
    return _REFERENCE.sub(lambda m: "$" if m.group(0) == "$$" else values.get(m.group(1), m.group(0)), text)


def _field(pod: dict[str, Any], path: str) -> str:
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    known = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    return str(known.get(path) or "")


def _exec_problem(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return (
            "executable file not found in $PATH" if "/" not in str(exc.filename or "") else "no such file or directory"
        )
    if exc.errno == errno.EACCES:
        return "permission denied"
    if exc.errno == errno.E2BIG:
        return "argument list too long"
    return exc.strerror or str(exc)


def _tail(path: Path) -> str:
    lines = path.read_bytes().splitlines()[-FALLBACK_LINES:] if path.exists() else []
    return b"\n".join(lines)[-FALLBACK_BYTES:].decode("utf-8", errors="replace")
