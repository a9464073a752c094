"""``python -m tests.services.k8s_emulator``: serve the emulated API server until SIGTERM or SIGINT.

Every process the kubelet started is killed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import tempfile
from pathlib import Path

from aiohttp import web

from tests.services.k8s_emulator import DEFAULT_KUBERNETES_VERSION, NODE_NAME
from tests.services.k8s_emulator.admission import Admission
from tests.services.k8s_emulator.api import ApiServer
from tests.services.k8s_emulator.cluster import Cluster
from tests.services.k8s_emulator.controller import JobController
from tests.services.k8s_emulator.kubelet import Kubelet
from tests.services.k8s_emulator.store import NAMESPACES, Store


def build(args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> tuple[web.Application, Kubelet]:
    """The API server application, with the store, controllers and kubelet behind it."""
    store = Store(history=args.history)
    cluster = Cluster(store)
    admission = Admission(args.kubernetes_version)
    for name in ("default", "kube-system", "kube-public", *args.namespace):
        obj, _ = admission.create(NAMESPACES, {"metadata": {"name": name}}, "", None)
        store.create(NAMESPACES, obj)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="k8s-emulator-"))
    kubelet = Kubelet(
        cluster,
        loop,
        workdir=workdir,
        images=args.image,
        node=NODE_NAME,
        service_host=args.host,
        service_port=args.port,
    )
    JobController(cluster, loop, backoff=args.backoff)
    api = ApiServer(cluster, admission, kubelet, token=args.token, version=args.kubernetes_version)
    return api.app(), kubelet


async def serve(args: argparse.Namespace) -> None:
    app, kubelet = build(args, asyncio.get_running_loop())
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    logging.getLogger("k8s_emulator").info("listening on http://%s:%s", args.host, args.port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        kubelet.shutdown()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.services.k8s_emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", help="bearer token every request must carry (none: no authentication)")
    parser.add_argument("--image", action="append", default=[], help="an image that exists (glob patterns allowed)")
    parser.add_argument("--namespace", action="append", default=[], help="a namespace to create besides 'default'")
    parser.add_argument("--workdir", help="where pods keep their logs and working directories")
    parser.add_argument("--kubernetes-version", default=DEFAULT_KUBERNETES_VERSION)
    parser.add_argument("--history", type=int, default=10_000, help="changes a watch can resume from")
    parser.add_argument("--backoff", type=float, default=0.5, help="seconds before a failed Job pod is replaced")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
