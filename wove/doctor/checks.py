"""The checks ``wove doctor`` runs on one environment, in order; a failed one skips those that depend on it.

1. ``installed``: the adapter and the modules it needs here (``wove[dispatch]`` and the backend's SDK), and the
   event loop the runtime will run (``WOVE_EVENT_LOOP``).
2. ``backend``: the environment starts, which is where every adapter connects to its backend.
3. ``callback``: the callback URL workers are given answers, from a worker process (``process`` backend) or from
   this machine (every other backend: its workers run elsewhere, so only the ping proves they reach it).
4. ``submit`` and ``ping``: a ping task goes through the real backend; a worker must run it and its events must reach
   the callback URL. On silence the backend is asked where the ping is (see ``wove.doctor.evidence``).
5. ``versions``: the worker's Python and wove match this machine's (tasks travel pickled).
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from wove import __version__
from wove._types import TERMINAL_EVENTS, Frame
from wove.cli_worker import BACKENDS
from wove.config import Settings
from wove.doctor.callback import LOOPBACK, callback_fix, probe_from_child, probe_here
from wove.doctor.evidence import Evidence, find_ping
from wove.doctor.ping import ping
from wove.doctor.report import EnvironmentReport
from wove.environment.base import EnvironmentExecutor
from wove.environment.event_loop import EVENT_LOOP_ENV, runtime_loop_kind
from wove.errors import BackendUnavailableError, ConfigError
from wove.integrations import BUILTIN_ADAPTERS, adapter_names, get_adapter_class
from wove.integrations.base import DISPATCH_HINT, DISPATCH_MODULES, BackendAdapter, check_modules

__all__ = ["check_environment"]

#: Frames only a worker sends, through the callback URL.
_WORKER_EVENTS = frozenset({"task_started", "heartbeat", "task_result"})


def _record_submissions(adapter_class: type[BackendAdapter]) -> type[BackendAdapter]:
    """``adapter_class`` extended to remember what ``submit`` returned, so silence can be told from a stuck submit."""

    class Recording(adapter_class):  # type: ignore[valid-type,misc]  # a class chosen at run time
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.submissions: dict[str, Any] = {}

        async def submit(self, payload: Frame, frame: Frame) -> Any:
            submission = await super().submit(payload, frame)
            self.submissions[str(frame["run_id"])] = submission
            return submission

        def submit_nowait(self, payload: Frame, frame: Frame) -> Any:
            submission = super().submit_nowait(payload, frame)
            if submission is not NotImplemented:
                self.submissions[str(frame["run_id"])] = submission
            return submission

    Recording.__name__ = Recording.__qualname__ = adapter_class.__name__
    return Recording


def _ping_config(backend: str, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """The environment's ``executor_config``, with the ping set to expire where the backend can, so a ping no worker
    took does not wait in the queue for a worker that starts later (it would retry posting to a server long gone)."""
    copy = dict(config)
    ttl = int(timeout) + 5
    if backend == "celery":
        copy["send_task_options"] = {**(copy.get("send_task_options") or {}), "expires": ttl}
    elif backend == "rq":
        copy["enqueue_options"] = {**(copy.get("enqueue_options") or {}), "ttl": ttl}
    elif backend == "arq":
        copy["enqueue_options"] = {**(copy.get("enqueue_options") or {}), "_expires": ttl}
    return copy


def _installed(report: EnvironmentReport, name: str) -> type[BackendAdapter] | None:
    hint = f"pip install 'wove[{name}]'" if name in BUILTIN_ADAPTERS and name != "process" else DISPATCH_HINT
    try:
        adapter_class = get_adapter_class(name)
    except ConfigError:
        known = ", ".join(adapter_names())
        report.add(
            "installed",
            False,
            f"no backend adapter is registered as {name!r}",
            f"use one of {known}, or register yours with wove.integrations.register_adapter({name!r}, ...) in "
            "wove_config.py",
        )
        return None
    except ImportError as exc:
        report.add("installed", False, f"the {name!r} adapter cannot be imported: {exc}", f"run: {hint}")
        return None
    modules = (*DISPATCH_MODULES, *adapter_class.required_modules)
    try:
        check_modules(DISPATCH_MODULES, DISPATCH_HINT, what="dispatching to a backend")
        adapter_class.check_available()
    except BackendUnavailableError as exc:
        report.add("installed", False, str(exc), f"run: {adapter_class.install_hint}")
        return None
    try:
        loop = runtime_loop_kind()
    except ConfigError as exc:
        report.add("installed", False, str(exc), f"set {EVENT_LOOP_ENV} to auto, uvloop or asyncio, or unset it")
        return None
    report.add("installed", True, f"{', '.join(modules)}; runtime loop: {loop}")
    return adapter_class


async def check_environment(name: str, settings: Settings, timeout: float) -> EnvironmentReport:
    """Run every check on environment ``name``; never raises for a failed check."""
    definition = settings.environment(name)
    spec = definition.get("executor", "local")
    kind = spec if isinstance(spec, str) else spec.__name__ if isinstance(spec, type) else type(spec).__name__
    report = EnvironmentReport(name, kind)
    if spec == "local":
        report.add("executor", True, "tasks run in the submitting process: nothing to reach")
        return report
    adapter_class: type[BackendAdapter] | None = None
    config = dict(definition.get("executor_config") or {})
    if isinstance(spec, str):
        adapter_class = _installed(report, spec)
        if adapter_class is None:
            _skip(report, "backend", "callback", "submit", "ping")
            return report
        from wove.environment.remote import BackendAdapterEnvironmentExecutor

        config = _ping_config(spec, config, timeout)
        executor: EnvironmentExecutor = BackendAdapterEnvironmentExecutor(name, _record_submissions(adapter_class))
    else:
        from wove.environment.runtime import create_executor

        report.add("installed", True, f"custom executor {spec!r}")
        try:
            executor = create_executor(name, spec)
        except Exception as exc:
            report.add("backend", False, f"{type(exc).__name__}: {exc}", "fix the environment's executor setting")
            _skip(report, "submit", "ping")
            return report
    try:
        if await _start(report, executor, name, definition, config, settings, timeout):
            await _check_callback(report, executor, config, timeout)
            await _ping(report, executor, spec if isinstance(spec, str) else None, config, timeout)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(executor.stop(), 30)
    return report


def _skip(report: EnvironmentReport, *names: str) -> None:
    for check in names:
        report.add(check, None, "skipped: an earlier check failed")


async def _start(
    report: EnvironmentReport,
    executor: EnvironmentExecutor,
    name: str,
    definition: Mapping[str, Any],
    config: dict[str, Any],
    settings: Settings,
    timeout: float,
) -> bool:
    environment = {**definition, "executor_config": config}
    run_config = {"default_environment": settings.default_environment, "defaults": dict(settings.defaults)}
    began = time.monotonic()
    try:
        await asyncio.wait_for(
            executor.start(environment_name=name, environment_config=environment, run_config=run_config), timeout
        )
    except asyncio.TimeoutError:
        report.add(
            "backend",
            False,
            f"the environment did not start within {timeout:g}s",
            "check that the backend runs and that executor_config points at it (or raise --timeout)",
        )
    except ConfigError as exc:
        report.add("backend", False, str(exc), f"correct environments[{name!r}] in the configuration")
    except Exception as exc:
        fix = "check that the backend runs and that executor_config points at it"
        if "pip install" in str(exc):
            fix = "install what the message names"
        report.add("backend", False, f"{type(exc).__name__}: {exc}", fix)
    else:
        report.add("backend", True, f"started in {time.monotonic() - began:.2f}s")
        return True
    _skip(report, "callback", "submit", "ping")
    return False


def _callback_base(executor: EnvironmentExecutor) -> str | None:
    server = getattr(executor, "server", None)
    url = getattr(server, "public_url", None)
    return url if isinstance(url, str) else None


async def _check_callback(
    report: EnvironmentReport, executor: EnvironmentExecutor, config: Mapping[str, Any], timeout: float
) -> None:
    """Ask the callback URL for its events path: wove's server answers 405 to a GET there."""
    base = _callback_base(executor)
    if base is None:
        return  # a custom executor: no callback server of wove's
    report.callback_url = base
    probe = f"{base.rstrip('/')}/wove/events/doctor"
    if report.executor == "process":
        python = str(config.get("python") or sys.executable)
        env = {str(key): str(value) for key, value in (config.get("env") or {}).items()}
        error = await probe_from_child(python, env, probe, timeout)
        where = "a worker process"
    else:
        error = await probe_here(probe, timeout)
        where = "this machine"
    if error is None:
        report.add("callback", True, f"{base} answers from {where}")
        return
    report.add(
        "callback",
        False,
        f"{base} does not answer from {where}: {error}",
        callback_fix(base, config, report.executor),
    )


async def _ping(
    report: EnvironmentReport,
    executor: EnvironmentExecutor,
    backend: str | None,
    config: Mapping[str, Any],
    timeout: float,
) -> None:
    run_id = uuid.uuid4().hex
    frame = {
        "type": "run_task",
        "run_id": run_id,
        "task_id": f"wove-doctor:{report.name}",
        "task_name": "wove_doctor_ping",
        "callable": ping,
        "args": {},
        "delivery": {},
    }
    began = time.monotonic()
    try:
        await executor.send(frame)
    except Exception as exc:
        report.add("submit", False, f"{type(exc).__name__}: {exc}", "check the backend and executor_config")
        _skip(report, "ping")
        return
    frames = await _collect(executor, run_id, began + timeout)
    adapter = getattr(executor, "adapter", None)
    submissions: Mapping[str, Any] = getattr(adapter, "submissions", {})
    terminal = frames[-1] if frames and frames[-1].get("type") in TERMINAL_EVENTS else None
    error = terminal.get("error") if terminal is not None and terminal.get("type") == "task_error" else None
    if isinstance(error, Mapping) and error.get("source") == "submit":
        report.add("submit", False, str(error.get("message")), "check that the backend accepts jobs (see the message)")
        _skip(report, "ping")
        return
    if run_id in submissions:
        report.add("submit", True, f"the ping was submitted as {submissions[run_id]}")
    elif frames:
        report.add("submit", True, "the ping was submitted")
    elif adapter is not None:
        report.add(
            "submit",
            False,
            f"submitting the ping did not return within {timeout:g}s",
            "check that the backend accepts jobs (a full or stuck broker, a paused queue)",
        )
        _skip(report, "ping")
        await _cancel(executor, run_id)
        return
    try:
        if terminal is None:
            await _silence(report, executor, backend, config, frames, timeout, run_id)
        else:
            _outcome(report, terminal, frames, time.monotonic() - began)
    finally:
        if terminal is None:
            await _cancel(executor, run_id)
    callback = next((check for check in report.checks if check.name == "callback"), None)
    reached = any(frame.get("type") in _WORKER_EVENTS or frame.get("host") for frame in frames)
    if callback is not None and callback.ok is False and reached:
        # This machine cannot reach the URL (a proxy, NAT), but the workers did: that is all that matters.
        callback.ok, callback.fix = True, None
        callback.detail += "; but the workers' events reached it"


async def _collect(executor: EnvironmentExecutor, run_id: str, deadline: float) -> list[Frame]:
    """The ping's frames until its terminal one or ``deadline`` (``time.monotonic``)."""
    frames: list[Frame] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return frames
        try:
            event = await asyncio.wait_for(executor.recv(), remaining)
        except asyncio.TimeoutError:
            return frames
        except Exception as exc:  # the executor failed (its callback server stopped)
            error = {"kind": type(exc).__name__, "message": str(exc), "source": "executor"}
            frames.append({"type": "task_error", "run_id": run_id, "error": error})
            return frames
        if event.get("run_id") == run_id:
            frames.append(event)
            if event.get("type") in TERMINAL_EVENTS:
                return frames


async def _cancel(executor: EnvironmentExecutor, run_id: str) -> None:
    """Take back a ping that did not finish, as a weave would on its timeout."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(executor.send({"type": "cancel_task", "run_id": run_id, "task_id": None}), 10)


def _where(frame: Mapping[str, Any]) -> str:
    host, pid = frame.get("host"), frame.get("pid")
    return f"{host or '?'}:{pid or '?'}"


def _outcome(report: EnvironmentReport, terminal: Frame, frames: list[Frame], elapsed: float) -> None:
    kind = terminal.get("type")
    where = _where(terminal)
    if kind == "task_result":
        result = terminal.get("result")
        if where == "?:?" and isinstance(result, Mapping):  # an executor that does not stamp frames
            where = _where(result)
        report.add(
            "ping",
            True,
            f"worker {where} ran it and its events reached {report.callback_url or 'the executor'} "
            f"({elapsed * 1000:.0f} ms round trip)",
        )
        if isinstance(result, Mapping):
            _versions(report, result)
        return
    if kind == "task_cancelled":
        report.add("ping", False, "the backend cancelled the ping", "see the worker's log for why it was cancelled")
        return
    given = terminal.get("error")
    error: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
    message = f"{error.get('kind', 'Exception')}: {error.get('message', '')}"
    started = any(frame.get("type") == "task_started" for frame in frames)
    if error.get("kind") in ("ModuleNotFoundError", "ImportError"):
        fix = f"install wove {__version__} (with this backend's extra) where the workers run"
    else:
        fix = "see the worker's log; the workers may run another wove or Python version"
    ran = f"the ping reached worker {where} but failed" if started or terminal.get("host") else "the ping failed"
    report.add("ping", False, f"{ran}: {message}", fix)


def _versions(report: EnvironmentReport, result: Mapping[str, Any]) -> None:
    here = platform.python_version()
    there, wove_there = str(result.get("python")), str(result.get("wove"))
    detail = f"worker: Python {there}, wove {wove_there}; here: Python {here}, wove {__version__}"
    same_python = there.split(".")[:2] == here.split(".")[:2]
    if same_python and wove_there == __version__:
        report.add("versions", True, detail)
        return
    report.add(
        "versions",
        False,
        detail,
        "run the same Python (major.minor) and wove version on workers and here: tasks travel pickled",
    )


async def _silence(
    report: EnvironmentReport,
    executor: EnvironmentExecutor,
    backend: str | None,
    config: Mapping[str, Any],
    frames: list[Frame],
    timeout: float,
    run_id: str,
) -> None:
    url = report.callback_url or "the callback URL"
    started = next((frame for frame in frames if frame.get("type") == "task_started"), None)
    if started is not None:
        report.add(
            "ping",
            False,
            f"worker {_where(started)} started the ping (so it reaches {url}) but sent no result within {timeout:g}s",
            "see that worker's log; it may be overloaded (or raise --timeout)",
        )
        return
    adapter = getattr(executor, "adapter", None)
    evidence: Evidence | None = None
    if adapter is not None:
        with contextlib.suppress(Exception):
            evidence = await asyncio.wait_for(asyncio.to_thread(find_ping, adapter, run_id), 15)
    silence = f"no event from a worker within {timeout:g}s (callback URL in use: {url})"
    no_worker = _no_worker_fix(report.name, backend)
    unreachable = callback_fix(url, config, backend)
    if evidence is not None and evidence.taken:
        detail = f"{silence}; {evidence.detail}, so workers cannot reach {url}"
        report.add("ping", False, detail, f"workers could not reach {url}: {unreachable}")
    elif evidence is not None and evidence.taken is False:
        report.add("ping", False, f"{silence}; {evidence.detail}", no_worker)
    else:
        known = f"; {evidence.detail}" if evidence is not None else ""
        detail = f"{silence}{known}; either no worker consumes the queue, or workers cannot reach {url}"
        fix = f"{no_worker}; if workers run, check their logs for CallbackError: {unreachable}"
        report.add("ping", False, detail, fix)
    host = urlsplit(url).hostname
    if host in LOOPBACK and backend not in (None, "process"):
        report.checks[-1].detail += f" ({host} is a loopback address: only workers on this machine can reach it)"


def _no_worker_fix(name: str, backend: str | None) -> str:
    if backend in BACKENDS:  # those ``wove worker`` starts
        return f"start a worker on the environment's queue: wove worker {backend} --environment {name}"
    return "start workers for this backend (see its page in docs/backends) and check they take the environment's jobs"
