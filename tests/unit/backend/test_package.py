"""The public surface of ``wove.backend``, and what importing it (or starting a worker) pulls in."""

from __future__ import annotations

import subprocess
import sys

import wove.backend
from tests.unit.backend.conftest import ROOT, worker_env

EXPECTED = [
    "BackendCallbackServer",
    "build_backend_payload",
    "build_backend_payload_for_run",
    "deserialize_frame",
    "payload_from_b64",
    "payload_to_b64",
    "post_event",
    "post_event_async",
    "run_backend_payload",
    "run_backend_payload_async",
    "serialize_frame",
]


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert wove.backend.__all__ == EXPECTED
    for name in EXPECTED:
        assert callable(getattr(wove.backend, name))
        assert name in dir(wove.backend)


def test_unknown_names_raise_attribute_error() -> None:
    try:
        wove.backend.nope
    except AttributeError as exc:
        assert "nope" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def _run(script: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", script], env=worker_env(), cwd=str(ROOT), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


#: Runs with the ``wove`` package's own ``__init__`` bypassed: these tests are about the transport's imports only.
BARE = f"""
import sys, types
package = types.ModuleType("wove")
package.__path__ = [{str(ROOT / "wove")!r}]
sys.modules["wove"] = package
"""


def test_the_worker_path_imports_neither_aiohttp_nor_cloudpickle_nor_asyncio() -> None:
    out = _run(
        BARE
        + """
import wove.backend_worker, wove.backend.worker, wove.integrations.worker
heavy = sorted(m for m in ("aiohttp", "cloudpickle", "asyncio", "logging") if m in sys.modules)
print(",".join(heavy))
"""
    )
    assert out.strip() == ""


BLOCKED = """
import importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("aiohttp", "cloudpickle", "httptools"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def test_without_the_dispatch_extra_errors_name_it() -> None:
    out = _run(
        BARE
        + BLOCKED
        + """
import wove.backend
from wove.errors import BackendUnavailableError
try:
    wove.backend.BackendCallbackServer
except BackendUnavailableError as exc:
    print("server ->", exc)
import asyncio
try:
    asyncio.run(wove.backend.post_event_async("http://127.0.0.1:1/x", {"type": "heartbeat", "run_id": "r"}))
except BackendUnavailableError as exc:
    print("async post ->", exc)
frame = {"type": "run_task", "run_id": "r", "task_id": "t", "task_name": "t", "callable": len, "args": {}}
try:
    wove.backend.build_backend_payload(frame, callback_url="http://x/", adapter="a")
except BackendUnavailableError as exc:
    print("build ->", exc)
print(wove.backend.payload_from_b64(wove.backend.payload_to_b64({"version": 1, "callback_url": "http://x/",
      "run_id": "r", "task_name": "t", "callable_pickle": "", "args_pickle": "", "delivery": {}}))["run_id"])
"""
    )
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[-1] == "r"
    assert all("pip install 'wove[dispatch]'" in line for line in lines[:3])
