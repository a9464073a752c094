"""Which event loop the executor runtime runs on.

The runtime's loop is wove's own: it carries the callback server, the adapters' clients and the process pool's
pipes, never a weave's tasks. Where ``uvloop`` is installed (the ``dispatch`` extra installs it on CPython outside
Windows) that loop is a uvloop loop, which takes noticeably less CPU per callback request and per pipe write
than the standard one (``docs/benchmarks.md``). ``WOVE_EVENT_LOOP`` chooses explicitly:

* ``auto`` (the default): uvloop when it imports, the standard loop otherwise;
* ``uvloop``: uvloop, or a :class:`~wove.errors.ConfigError` naming the install when it is missing;
* ``asyncio``: always the standard loop.

Weaves themselves keep whatever loop their caller runs (or ``asyncio``'s default for a synchronous weave).
"""

from __future__ import annotations

import asyncio
import os

from wove.errors import ConfigError

__all__ = ["EVENT_LOOP_ENV", "new_runtime_loop", "runtime_loop_kind"]

EVENT_LOOP_ENV = "WOVE_EVENT_LOOP"
_KINDS = ("auto", "uvloop", "asyncio")


def runtime_loop_kind() -> str:
    """The loop the runtime will use: ``"uvloop"`` or ``"asyncio"``, from ``WOVE_EVENT_LOOP`` and what imports."""
    wanted = os.environ.get(EVENT_LOOP_ENV, "").strip().lower() or "auto"
    if wanted not in _KINDS:
        raise ConfigError(f"{EVENT_LOOP_ENV} must be one of {', '.join(_KINDS)}; got {wanted!r}")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if wanted == "uvloop":
            raise ConfigError(
                f"{EVENT_LOOP_ENV}=uvloop but uvloop is not installed: pip install uvloop "
                f"(or unset {EVENT_LOOP_ENV} to use the standard loop)"
            ) from None
        return "asyncio"
    return "uvloop"


def new_runtime_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the kind :func:`runtime_loop_kind` names."""
    if runtime_loop_kind() == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()
