"""Backend adapters by executor name, imported only when an environment asks for one.

``import wove`` never imports a backend SDK: the registry holds dotted paths, resolved on first use.
Register your own adapter under a name, then use that name as an environment's ``executor``::

    wove.integrations.register_adapter("myqueue", "mypkg.adapters:QueueAdapter")
    wove.config(environments={"jobs": {"executor": "myqueue", "executor_config": {...}}})
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Any

from wove.errors import ConfigError

if TYPE_CHECKING:
    from wove.integrations.base import BackendAdapter
    from wove.integrations.process import ProcessAdapter

__all__ = ["BackendAdapter", "ProcessAdapter", "adapter_names", "get_adapter_class", "register_adapter"]

#: Adapters shipped with wove: executor name -> "module:ClassName".
BUILTIN_ADAPTERS: dict[str, str] = {
    "process": "wove.integrations.process:ProcessAdapter",
    "celery": "wove.integrations.celery:CeleryAdapter",
    "rq": "wove.integrations.rq:RQAdapter",
    "arq": "wove.integrations.arq:ArqAdapter",
    "taskiq": "wove.integrations.taskiq:TaskiqAdapter",
    "dask": "wove.integrations.dask:DaskAdapter",
    "ray": "wove.integrations.ray:RayAdapter",
    "slurm": "wove.integrations.slurm:SlurmAdapter",
    "temporal": "wove.integrations.temporal:TemporalAdapter",
    "aws_batch": "wove.integrations.aws_batch:AwsBatchAdapter",
    "kubernetes_jobs": "wove.integrations.kubernetes_jobs:KubernetesJobsAdapter",
}

_registry: dict[str, type[BackendAdapter] | str] = dict(BUILTIN_ADAPTERS)
_lock = threading.Lock()

# Public classes reachable as ``wove.integrations.<Name>`` without importing them at package import.
_LAZY_EXPORTS = {
    "BackendAdapter": "wove.integrations.base:BackendAdapter",
    "ProcessAdapter": "wove.integrations.process:ProcessAdapter",
}


def adapter_names() -> tuple[str, ...]:
    """Every registered executor name, sorted."""
    with _lock:
        return tuple(sorted(_registry))


def register_adapter(name: str, adapter: type[BackendAdapter] | str, *, replace: bool = False) -> None:
    """Register ``adapter`` (a ``BackendAdapter`` subclass, or ``"module:Class"`` imported lazily) as ``name``.

    Re-registering a name raises ``ConfigError`` unless ``replace=True``, so two plugins cannot silently
    shadow each other.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"adapter name must be a non-empty string, got {name!r}")
    if isinstance(adapter, str):
        _split_path(adapter)
    else:
        _check_class(name, adapter)
    with _lock:
        if name in _registry and not replace and _registry[name] is not adapter:
            raise ConfigError(f"adapter {name!r} is already registered; pass replace=True to override it")
        _registry[name] = adapter


def get_adapter_class(name: str) -> type[BackendAdapter]:
    """The adapter class registered as ``name``, importing it on first use.

    An unknown name raises ``ConfigError`` (a ``ValueError``) listing the known names.
    """
    with _lock:
        entry = _registry.get(name)
    if entry is None:
        known = ", ".join(repr(n) for n in adapter_names())
        raise ConfigError(f"unknown backend adapter {name!r}; known adapters: {known}")
    if isinstance(entry, str):
        cls = _check_class(name, _import_path(entry))
        with _lock:
            if _registry.get(name) == entry:
                _registry[name] = cls
        return cls
    return entry


def _split_path(path: str) -> tuple[str, str]:
    module, sep, attribute = path.partition(":")
    if not sep or not module or not attribute:
        raise ConfigError(f"adapter path must look like 'package.module:ClassName', got {path!r}")
    return module, attribute


def _import_path(path: str) -> Any:
    module_name, attribute = _split_path(path)
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from None


def _check_class(name: str, value: Any) -> type[BackendAdapter]:
    from wove.integrations.base import BackendAdapter

    if not (isinstance(value, type) and issubclass(value, BackendAdapter)):
        raise ConfigError(f"adapter {name!r} must be a BackendAdapter subclass, got {value!r}")
    return value


def __getattr__(name: str) -> Any:
    path = _LAZY_EXPORTS.get(name)
    if path is None:
        raise AttributeError(f"module 'wove.integrations' has no attribute {name!r}")
    return _import_path(path)
