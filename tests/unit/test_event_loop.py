"""The runtime's own event loop: uvloop where installed, the standard loop on request, clear errors otherwise."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
import uvloop

import wove
from wove import ConfigError, weave
from wove.environment import get_runtime
from wove.environment.event_loop import EVENT_LOOP_ENV, new_runtime_loop, runtime_loop_kind


def test_auto_picks_uvloop_when_it_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    assert runtime_loop_kind() == "uvloop"
    loop = new_runtime_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_auto_falls_back_to_the_standard_loop_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "auto")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an environment without uvloop sees: ImportError
    assert runtime_loop_kind() == "asyncio"
    loop = new_runtime_loop()
    try:
        assert not isinstance(loop, uvloop.Loop)
        assert isinstance(loop, asyncio.AbstractEventLoop)
    finally:
        loop.close()


def test_asking_for_uvloop_without_it_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(ConfigError, match=r"pip install uvloop"):
        runtime_loop_kind()


def test_an_unknown_choice_lists_the_valid_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "trio")
    with pytest.raises(ConfigError, match=r"auto, uvloop, asyncio; got 'trio'"):
        runtime_loop_kind()


def test_a_bad_choice_fails_the_weave_that_starts_the_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "trio")
    wove.config(environments={"default": {}, "side": {"executor": "local"}})
    with pytest.raises(ConfigError, match=EVENT_LOOP_ENV), weave() as w:

        @w.do(environment="side")
        def task() -> int:
            return 1


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_the_process_backend_runs_on_either_loop(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The callback server, the worker pipes and cancellation all live on the runtime loop: both kinds carry them."""
    monkeypatch.setenv(EVENT_LOOP_ENV, kind)
    wove.config(progress=False, environments={"default": {}, "pool": {"executor": "process", "executor_config": {}}})
    with weave(items=[1, 2, 3]) as w:

        @w.do("items", environment="pool")
        def square(item: int) -> tuple[int, int]:
            return item * item, os.getpid()

    assert [value for value, _ in w.result.square] == [1, 4, 9]
    assert {pid for _, pid in w.result.square} != {os.getpid()}
    loop = get_runtime()._loop
    assert loop is not None
    assert isinstance(loop, uvloop.Loop) is (kind == "uvloop")
