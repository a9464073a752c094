"""BackendAdapter: construction, availability checks, error translation, helpers."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import pytest

from wove._types import Frame
from wove.errors import BackendUnavailableError, ConfigError, SubmitError
from wove.integrations.base import BackendAdapter, check_modules


class RecordingAdapter(BackendAdapter):
    backend = "recording"
    required_modules: ClassVar[tuple[str, ...]] = ("json",)
    install_hint = "pip install 'wove[recording]'"

    async def submit(self, payload: Frame, frame: Frame) -> Any:
        with self.translate_errors("submit", run_id=frame["run_id"]):
            if payload.get("boom"):
                raise ConnectionError("broker unreachable")
            if payload.get("config_error"):
                raise ConfigError("bad queue name")
        return "job-1"

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        return None


class MissingSdkAdapter(RecordingAdapter):
    backend = "missing"
    required_modules = ("json", "wove_no_such_sdk", "wove_no_such_pkg.sub")
    install_hint = "pip install 'wove[missing]'"


def make(cls: type[BackendAdapter] = RecordingAdapter, **kwargs: Any) -> BackendAdapter:
    options: dict[str, Any] = {"name": "env", "config": {"queue": "q"}, "callback_url": "http://h:1", "run_config": {}}
    options.update(kwargs)
    return cls(**options)


def test_constructor_is_keyword_only_and_copies_config() -> None:
    config = {"queue": "q"}
    adapter = make(config=config)
    config["queue"] = "changed"
    assert adapter.config == {"queue": "q"}
    assert adapter.name == "env"
    assert adapter.callback_url == "http://h:1"
    assert "recording" in repr(adapter) and "'env'" in repr(adapter)
    with pytest.raises(TypeError):
        RecordingAdapter("env", {}, "http://h:1", {})  # type: ignore[call-arg]


def test_base_class_is_abstract() -> None:
    with pytest.raises(TypeError):
        BackendAdapter(name="x", config={}, callback_url="", run_config={})  # type: ignore[abstract]


def test_defaults() -> None:
    assert BackendAdapter.inline_payload_limit == 32 * 1024
    assert BackendAdapter.required_modules == ()
    assert "wove[dispatch]" in BackendAdapter.install_hint


async def test_start_and_close_are_noops() -> None:
    adapter = make()
    await adapter.start()
    await adapter.close()
    await adapter.close()


def test_check_available_passes_when_modules_exist() -> None:
    RecordingAdapter.check_available()


def test_check_available_names_the_pip_command() -> None:
    with pytest.raises(BackendUnavailableError) as info:
        MissingSdkAdapter.check_available()
    message = str(info.value)
    assert "pip install 'wove[missing]'" in message
    assert "wove_no_such_sdk" in message and "wove_no_such_pkg.sub" in message
    assert "json" not in message.split("needs")[1].split("which")[0]


def test_check_modules_function() -> None:
    check_modules(("os",), "pip install nothing", what="x")
    with pytest.raises(BackendUnavailableError, match="pip install thing"):
        check_modules(("wove_no_such_sdk",), "pip install thing", what="x")


async def test_translate_errors_wraps_sdk_errors() -> None:
    adapter = make()
    assert await adapter.submit({}, {"run_id": "r1"}) == "job-1"
    with pytest.raises(SubmitError) as info:
        await adapter.submit({"boom": True}, {"run_id": "r1"})
    err = info.value
    assert isinstance(err.__cause__, ConnectionError)
    assert err.environment == "env" and err.run_id == "r1"
    assert "broker unreachable" in str(err) and "ConnectionError" in str(err)


async def test_translate_errors_lets_wove_errors_through() -> None:
    with pytest.raises(ConfigError, match="bad queue name"):
        await make().submit({"config_error": True}, {"run_id": "r1"})


def test_emit_and_report_lost() -> None:
    seen: list[Frame] = []
    adapter = make(on_event=seen.append)
    adapter.emit({"type": "heartbeat", "run_id": "r1"})
    adapter.report_lost({"run_id": "r2", "task_id": "t"}, "worker 12 exited")
    assert seen[0] == {"type": "heartbeat", "run_id": "r1"}
    lost = seen[1]
    assert lost["type"] == "task_error" and lost["run_id"] == "r2" and lost["task_id"] == "t"
    assert lost["error"]["kind"] == "WorkerLost" and lost["error"]["source"] == "backend"
    assert lost["error"]["retryable"] is True and "worker 12 exited" in lost["error"]["message"]
    assert isinstance(lost["finished_at"], float)


def test_emit_without_sink_logs(caplog: pytest.LogCaptureFixture) -> None:
    make().emit({"type": "heartbeat", "run_id": "r1"})
    assert "no event sink" in caplog.text


async def test_run_blocking_uses_a_thread() -> None:
    def where(prefix: str, *, suffix: str) -> str:
        return f"{prefix}{threading.get_ident()}{suffix}"

    result = await make().run_blocking(where, "<", suffix=">")
    assert result != f"<{threading.get_ident()}>"
    assert result.startswith("<") and result.endswith(">")
