"""Service and fixtures for a loopback emulator of the Kubernetes Jobs and Pods API, and a local job controller.

``kubernetes_cluster`` starts ``python -m tests.services.k8s_emulator`` (see that package) on a free loopback port
with a bearer token and writes a kubeconfig for it: tests reach it over real HTTP with the official ``kubernetes``
client, exactly as they would reach a cluster. The emulated image is ``EMULATED_IMAGE``; its "Python" is this
interpreter, with the repository on ``PYTHONPATH`` so workers import the tests' modules.

When ``KUBECONFIG`` is set, the same fixture hands out that cluster instead and nothing is started. The cluster's
worker pods must then reach this process: set ``WOVE_K8S_TEST_IMAGE`` (an image with this checkout of wove
installed), ``WOVE_K8S_TEST_CALLBACK_URL`` (how pods reach this machine, e.g. ``http://10.0.0.5:8765``; wove listens
on all interfaces on its port), and optionally ``WOVE_K8S_TEST_CONTEXT``, ``WOVE_K8S_TEST_NAMESPACE`` (default
``default``) and ``WOVE_K8S_TEST_PYTHON`` (default ``python``).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.services.base import ManagedProcess, free_port, port_open, wait_until

ROOT = Path(__file__).resolve().parents[2]
#: The only image the emulator's registry has.
EMULATED_IMAGE = "registry.example/wove/worker:emulated"
#: The namespace the emulator's kubeconfig context selects.
EMULATED_NAMESPACE = "wove-tests"


@dataclass
class KubernetesCluster:
    """Where the tests' Jobs go, and the ``executor_config`` that sends them there."""

    namespace: str
    image: str
    python: str | list[str]
    emulated: bool
    kubeconfig: Path | None = None
    context: str | None = None
    url: str = ""
    token: str | None = None
    container_env: list[dict[str, str]] = field(default_factory=list)
    callback: dict[str, Any] = field(default_factory=dict)

    def executor_config(self, **extra: Any) -> dict[str, Any]:
        """The ``kubernetes_jobs`` settings for this cluster; ``extra`` keys override them (``container`` merges)."""
        container = dict(extra.pop("container", {}))
        container["env"] = [*self.container_env, *container.get("env", [])]
        config: dict[str, Any] = {
            "image": self.image,
            "python": self.python,
            "container": container,
            **self.callback,
        }
        if self.kubeconfig is not None:
            config["kubeconfig"] = str(self.kubeconfig)
        if self.context is not None:
            config["context"] = self.context
        if not self.emulated:
            config["namespace"] = self.namespace  # the emulated one comes from the kubeconfig's context
        config.update(extra)
        return config

    def api_client(self) -> Any:
        """A client of the test's own, to look at what wove did."""
        from kubernetes import client, config

        configuration = client.Configuration()
        path = str(self.kubeconfig) if self.kubeconfig is not None else None
        config.load_kube_config(config_file=path, context=self.context, client_configuration=configuration)
        return client.ApiClient(configuration)

    def stats(self) -> dict[str, Any]:
        """What the emulator saw (``GET /_emulator/stats``): admitted bodies per kind, refusals, deletions."""
        assert self.emulated, "only the emulator keeps statistics"
        request = urllib.request.Request(
            f"{self.url}/_emulator/stats", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            stats: dict[str, Any] = json.load(answer)
        return stats


class KubernetesEmulator:
    """``python -m tests.services.k8s_emulator`` on a free loopback port, with a kubeconfig pointing at it."""

    def __init__(
        self, directory: Path, *, images: tuple[str, ...] = (EMULATED_IMAGE,), options: tuple[str, ...] = ()
    ) -> None:
        self.directory = directory
        self.options = options
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.images = images
        self.url = f"http://127.0.0.1:{self.port}"
        self.kubeconfig = directory / "kubeconfig"
        self.process: ManagedProcess | None = None

    def start(self) -> KubernetesEmulator:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "tests.services.k8s_emulator",
            "--port",
            str(self.port),
            "--token",
            self.token,
            "--namespace",
            EMULATED_NAMESPACE,
            "--workdir",
            str(self.directory / "node"),
        ]
        for image in self.images:
            command += ["--image", image]
        command += self.options
        log = self.directory / "emulator.log"
        self.process = ManagedProcess(command, log, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
        wait_until(lambda: port_open(self.port) or not self.process.alive(), 30, "the Kubernetes emulator", log)
        assert self.process.alive(), self.process.output()
        self.kubeconfig.write_text(json.dumps(self._kubeconfig(), indent=2))
        return self

    def _kubeconfig(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "wove-tests", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "emulated",
                    "context": {"cluster": "emulated", "user": "wove-tests", "namespace": EMULATED_NAMESPACE},
                }
            ],
            "current-context": "emulated",
        }

    def cluster(self) -> KubernetesCluster:
        return KubernetesCluster(
            namespace=EMULATED_NAMESPACE,
            image=EMULATED_IMAGE,
            python=sys.executable,
            emulated=True,
            kubeconfig=self.kubeconfig,
            url=self.url,
            token=self.token,
            # The emulated image has this checkout importable; a worker whose weave is gone gives up posting soon.
            container_env=[{"name": "PYTHONPATH", "value": str(ROOT)}, {"name": "WOVE_POST_DEADLINE", "value": "10"}],
        )

    def output(self) -> str:
        return self.process.output() if self.process is not None else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def real_cluster() -> KubernetesCluster:
    """The cluster ``KUBECONFIG`` points at, configured from the ``WOVE_K8S_TEST_*`` variables."""
    image, callback = os.environ.get("WOVE_K8S_TEST_IMAGE"), os.environ.get("WOVE_K8S_TEST_CALLBACK_URL")
    if not image or not callback:
        pytest.fail(
            "KUBECONFIG is set, so the Kubernetes tests run against that cluster; they also need WOVE_K8S_TEST_IMAGE"
            " (an image with wove installed) and WOVE_K8S_TEST_CALLBACK_URL (how its pods reach this machine)"
        )
    port = urlsplit(callback).port or 80
    return KubernetesCluster(
        namespace=os.environ.get("WOVE_K8S_TEST_NAMESPACE", "default"),
        image=image,
        python=os.environ.get("WOVE_K8S_TEST_PYTHON", "python"),
        emulated=False,
        context=os.environ.get("WOVE_K8S_TEST_CONTEXT"),
        callback={"callback_host": "0.0.0.0", "callback_port": port, "callback_url": callback},
    )


@pytest.fixture(scope="session")
def kubernetes_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubernetesCluster]:
    """The cluster the Kubernetes Jobs tests use: the one ``KUBECONFIG`` names, else a fresh emulator."""
    if os.environ.get("KUBECONFIG"):
        yield real_cluster()
        return
    emulator = KubernetesEmulator(tmp_path_factory.mktemp("kubernetes")).start()
    try:
        yield emulator.cluster()
    finally:
        emulator.stop()
