"""Shared by the ARQ and Taskiq adapters: refuse a Redis pool whose open connections belong to another event loop.

wove drives a given pool from its runtime thread's loop. An asyncio Redis connection belongs to the loop that opened
it, and using it from another one fails only when a read has to wait: by chance, now and then. So a pool passed in is
checked once at start, and any "different loop" failure later is reported with the same advice.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["loop_hint", "opened_in_another_loop"]


def opened_in_another_loop(pool: Any) -> bool:
    """True when the redis-py asyncio connection ``pool`` holds an open connection made in another event loop.

    Reads redis-py's private pool and stream attributes defensively: a pool without them passes the check.
    """
    loop = asyncio.get_running_loop()
    connections = [*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ())]
    for connection in connections:
        owner = getattr(getattr(connection, "_reader", None), "_loop", None)
        if owner is not None and owner is not loop:
            return True
    return False


def loop_hint(what: str, config_key: str, alternative: str) -> str:
    """The advice appended to errors caused by a ``what`` (pool, broker) opened in another event loop."""
    return (
        f"the {what} has connections opened in another event loop, and wove uses it from its runtime thread's "
        f"loop: pass a callable that creates the {what} (executor_config[{config_key!r}]) or {alternative} instead"
    )
