"""The adapter registry: lazy lookup by name, user registration, clear errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import wove.integrations as integrations
from wove._types import Frame
from wove.errors import ConfigError
from wove.integrations import adapter_names, get_adapter_class, register_adapter
from wove.integrations.base import BackendAdapter


class EchoAdapter(BackendAdapter):
    backend = "echo"

    async def submit(self, payload: Frame, frame: Frame) -> Any:
        return frame["run_id"]

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        return None


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    saved = dict(integrations._registry)
    yield
    integrations._registry.clear()
    integrations._registry.update(saved)


def test_process_is_registered() -> None:
    from wove.integrations.process import ProcessAdapter

    assert "process" in adapter_names()
    assert get_adapter_class("process") is ProcessAdapter


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown backend adapter 'celeryy'.*'process'") as info:
        get_adapter_class("celeryy")
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize("name", sorted(integrations.BUILTIN_ADAPTERS))
def test_every_builtin_adapter_resolves_to_its_class(name: str) -> None:
    cls = get_adapter_class(name)
    assert issubclass(cls, BackendAdapter)
    assert cls.backend == name
    assert name in cls.install_hint or name == "process"


def test_backends_that_do_not_exist_are_not_registered() -> None:
    with pytest.raises(ConfigError, match="known adapters"):
        get_adapter_class("slurmish")


def test_register_class() -> None:
    register_adapter("echo", EchoAdapter)
    assert get_adapter_class("echo") is EchoAdapter
    assert "echo" in adapter_names()


def test_register_dotted_path_is_lazy_and_cached() -> None:
    register_adapter("echo", f"{__name__}:EchoAdapter")
    before: object = integrations._registry["echo"]
    assert before == f"{__name__}:EchoAdapter"
    assert get_adapter_class("echo") is EchoAdapter
    after: object = integrations._registry["echo"]
    assert after is EchoAdapter


def test_register_refuses_silent_override() -> None:
    register_adapter("echo", EchoAdapter)
    register_adapter("echo", EchoAdapter)  # same class again is harmless
    with pytest.raises(ConfigError, match="already registered"):
        register_adapter("echo", f"{__name__}:EchoAdapter")
    register_adapter("echo", f"{__name__}:EchoAdapter", replace=True)
    assert get_adapter_class("echo") is EchoAdapter


@pytest.mark.parametrize("bad", ["", "no_colon", ":Cls", "mod:"])
def test_register_rejects_bad_paths(bad: str) -> None:
    with pytest.raises(ConfigError):
        register_adapter("bad", bad) if bad else register_adapter(bad, EchoAdapter)


def test_register_rejects_non_adapters() -> None:
    with pytest.raises(ConfigError, match="BackendAdapter subclass"):
        register_adapter("bad", dict)  # type: ignore[arg-type]


def test_path_to_non_adapter_fails_on_lookup() -> None:
    register_adapter("bad", "collections:OrderedDict")
    with pytest.raises(ConfigError, match="BackendAdapter subclass"):
        get_adapter_class("bad")
    register_adapter("missing", "collections:NoSuchThing")
    with pytest.raises(ConfigError, match="no attribute 'NoSuchThing'"):
        get_adapter_class("missing")


def test_lazy_exports() -> None:
    from wove.integrations.process import ProcessAdapter

    assert integrations.ProcessAdapter is ProcessAdapter
    assert integrations.BackendAdapter is BackendAdapter
    with pytest.raises(AttributeError):
        _ = integrations.NoSuchAdapter


def test_importing_the_registry_imports_no_backend() -> None:
    code = (
        "import sys, wove.integrations as i; "
        "assert 'wove.integrations.process' not in sys.modules; "
        "assert 'aiohttp' not in sys.modules and 'cloudpickle' not in sys.modules; "
        "assert not {'celery', 'rq', 'arq', 'taskiq', 'dask', 'distributed', 'ray'} & set(sys.modules); "
        "assert i.adapter_names() == tuple(sorted(i.BUILTIN_ADAPTERS))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
