"""Process-wide configuration: environments, defaults, and the order in which settings resolve.

A setting resolves from the most specific place that sets it: task (``@w.do(...)``) -> weave (``weave(...)``)
-> environment (``environments[name]``) -> global (``wove.config(...)``) -> built-in default.
Every value is validated when it is given, so a typo fails at ``wove.config`` time, not mid-run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from pathlib import Path

from wove.errors import ConfigError, UnknownEnvironmentError

#: Name of the file ``wove.config()`` looks for, in the working directory or a parent.
CONFIG_FILENAME = "wove_config.py"
#: Name of the dict that file must define.
CONFIG_VARIABLE = "WOVE_CONFIG"

ERROR_MODES = ("raise", "return")
CANCEL_MODES = ("best_effort", "require_ack")
ORPHAN_POLICIES = ("fail", "cancel", "requeue", "detach")

#: Settings that resolve task -> weave -> environment -> global, with their built-in defaults.
BUILTIN_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "retries": 0,
        "timeout": None,
        "workers": None,
        "error_mode": "raise",
        "delivery_timeout": None,
        "delivery_heartbeat_seconds": None,
        "delivery_cancel_mode": "best_effort",
        "delivery_orphan_policy": "fail",
        "delivery_idempotency_key": None,
        "delivery_max_in_flight": None,
    }
)

#: Keys only an environment definition may hold, with their defaults.
ENVIRONMENT_ONLY_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"executor": "local", "executor_config": MappingProxyType({}), "max_workers": None}
)

DELIVERY_KEYS = tuple(key for key in BUILTIN_DEFAULTS if key.startswith("delivery_"))
TASK_KEYS = ("retries", "timeout", "workers", "environment", *DELIVERY_KEYS)
WEAVE_KEYS = ("environment", *BUILTIN_DEFAULTS)
ENVIRONMENT_KEYS = (*ENVIRONMENT_ONLY_DEFAULTS, *BUILTIN_DEFAULTS)
GLOBAL_KEYS = ("default_environment", "environments", "progress", *BUILTIN_DEFAULTS)


def _positive_number(key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{key} must be a positive number of seconds or None, got {value!r}")


def _positive_int(key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer or None, got {value!r}")


def _choice(allowed: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if value not in allowed:
            listed = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"{key} must be one of {listed}, got {value!r}")

    return check


def _retries(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key} must be an integer >= 0, got {value!r}")


def _idempotency_key(key: str, value: Any) -> None:
    if value is not None and not isinstance(value, str) and not callable(value):
        raise ConfigError(f"{key} must be a string, a format string over the task's arguments, or a callable")


def _executor(key: str, value: Any) -> None:
    is_executor = all(hasattr(value, method) for method in ("start", "send", "recv", "stop"))
    if not isinstance(value, str) and not callable(value) and not is_executor:
        raise ConfigError(f"{key} must be an executor name (e.g. 'local', 'process') or an executor class or instance")
    if isinstance(value, str) and not value:
        raise ConfigError(f"{key} must not be empty")


def _mapping(key: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a dict, got {type(value).__name__}")


def _environment_name(key: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{key} must be a non-empty environment name, got {value!r}")


_VALIDATORS: dict[str, Callable[[str, Any], None]] = {
    "retries": _retries,
    "timeout": _positive_number,
    "workers": _positive_int,
    "error_mode": _choice(ERROR_MODES),
    "delivery_timeout": _positive_number,
    "delivery_heartbeat_seconds": _positive_number,
    "delivery_cancel_mode": _choice(CANCEL_MODES),
    "delivery_orphan_policy": _choice(ORPHAN_POLICIES),
    "delivery_idempotency_key": _idempotency_key,
    "delivery_max_in_flight": _positive_int,
    "executor": _executor,
    "executor_config": _mapping,
    "max_workers": _positive_int,
    "environment": _environment_name,
}


def validate_options(options: Mapping[str, Any], allowed: Iterable[str], where: str) -> dict[str, Any]:
    """Check option names and values; return a plain dict copy. ``where`` names the call site in errors."""
    allowed = tuple(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listed = ", ".join(sorted(allowed))
        raise ConfigError(f"unknown option(s) for {where}: {', '.join(unknown)}; allowed: {listed}")
    for key, value in options.items():
        _VALIDATORS[key](f"{where}: {key}", value)
    return dict(options)


_BUILTIN_ENVIRONMENTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"default": MappingProxyType({"executor": "local"})}
)


class Settings(NamedTuple):
    """One immutable snapshot of the process-wide configuration.

    A named tuple rather than a dataclass: ``dataclasses`` imports ``inspect``, and every cold worker
    (``python -m wove.backend_worker``) imports this module through ``wove/__init__`` (about 8 ms of its start).
    """

    default_environment: str = "default"
    environments: Mapping[str, Mapping[str, Any]] = _BUILTIN_ENVIRONMENTS
    defaults: Mapping[str, Any] = MappingProxyType({})
    progress: bool | None = None

    def environment(self, name: str) -> Mapping[str, Any]:
        """The configuration of one environment; ``UnknownEnvironmentError`` (a NameError) names the known ones."""
        try:
            return self.environments[name]
        except KeyError:
            raise UnknownEnvironmentError(name, list(self.environments)) from None

    def environment_setting(self, environment: str, key: str) -> Any:
        """An environment-only key (``executor``, ``executor_config``, ``max_workers``) with its default."""
        return self.environment(environment).get(key, ENVIRONMENT_ONLY_DEFAULTS[key])

    def resolve(self, key: str, environment: str, *layers: Mapping[str, Any]) -> Any:
        """Resolve ``key`` through ``layers`` (most specific first), then environment, global, built-in."""
        for layer in layers:
            if key in layer:
                return layer[key]
        env = self.environment(environment)
        if key in env:
            return env[key]
        if key in self.defaults:
            return self.defaults[key]
        return BUILTIN_DEFAULTS[key]


def _freeze_environment(name: str, definition: Any) -> Mapping[str, Any]:
    if not isinstance(definition, Mapping):
        raise ConfigError(f"environment {name!r} must be a dict of settings, got {type(definition).__name__}")
    checked = validate_options(definition, ENVIRONMENT_KEYS, f"environment {name!r}")
    if "executor_config" in checked:
        checked["executor_config"] = MappingProxyType(dict(checked["executor_config"]))
    return MappingProxyType(checked)


def build_settings(
    default_environment: str | None = None,
    environments: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    **defaults: Any,
) -> Settings:
    """Validate arguments of ``wove.config`` and return the snapshot they describe."""
    checked_defaults = validate_options(defaults, BUILTIN_DEFAULTS, "wove.config")
    if environments is None:
        environments = {"default": {"executor": "local"}}
    if not isinstance(environments, Mapping):
        raise ConfigError(f"environments must be a dict of name -> settings, got {type(environments).__name__}")
    frozen: dict[str, Mapping[str, Any]] = {}
    for name, definition in environments.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"environment names must be non-empty strings, got {name!r}")
        frozen[name] = _freeze_environment(name, definition)
    if default_environment is None:
        default_environment = "default" if "default" in frozen else next(iter(frozen), "default")
    if default_environment not in frozen:
        raise UnknownEnvironmentError(default_environment, list(frozen))
    if progress is not None and not isinstance(progress, bool):
        raise ConfigError(
            f"progress must be True, False or None (show when the output is a terminal), got {progress!r}"
        )
    return Settings(default_environment, MappingProxyType(frozen), MappingProxyType(checked_defaults), progress)


_lock = threading.Lock()
_settings = build_settings()
_listeners: list[Callable[[Settings, Settings], None]] = []


def current_settings() -> Settings:
    """The configuration in force now."""
    return _settings


def on_change(listener: Callable[[Settings, Settings], None]) -> None:
    """Call ``listener(old, new)`` after every successful ``wove.config``; the runtime uses it to restart
    environments whose definition changed."""
    _listeners.append(listener)


def find_config_file(start: Path | None = None) -> Path | None:
    """The nearest ``wove_config.py`` in ``start`` (default: the working directory) or a parent."""
    from pathlib import Path

    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_FILENAME
        if candidate.is_file():
            return candidate
    return None


def load_config_file(path: Path) -> dict[str, Any]:
    """Import ``path`` and return its ``WOVE_CONFIG`` dict."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_wove_user_config", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    value = getattr(module, CONFIG_VARIABLE, None)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path} must define {CONFIG_VARIABLE} = {{...}} (a dict of wove.config arguments)")
    return dict(value)


def config(
    default_environment: str | None = None,
    environments: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    **defaults: Any,
) -> Settings:
    """Set the process-wide configuration and return it.

    With no arguments, loads ``WOVE_CONFIG`` from ``wove_config.py`` in the working directory or a parent.
    Each call replaces the whole configuration; environments whose definition changed are restarted on next use.
    ``progress`` shows a progress line while remote tasks run (``None``: when standard error is a terminal).
    """
    if default_environment is None and environments is None and progress is None and not defaults:
        path = find_config_file()
        if path is None:
            import os

            raise ConfigError(
                f"wove.config() found no {CONFIG_FILENAME} in {os.getcwd()} or its parents; "
                f"create one defining {CONFIG_VARIABLE} = {{...}}, or pass settings to wove.config(...)"
            )
        return config(**load_config_file(path))
    new = build_settings(default_environment, environments, progress, **defaults)
    global _settings
    with _lock:
        old, _settings = _settings, new
    for listener in list(_listeners):
        listener(old, new)
    return new


def reset() -> None:
    """Restore the built-in configuration (one ``local`` environment named ``default``)."""
    config(environments={"default": {"executor": "local"}})
