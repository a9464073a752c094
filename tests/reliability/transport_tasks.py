"""Task functions the transport fault tests run on real worker processes (loaded by reference)."""

from __future__ import annotations

import time


def add(a: int, b: int) -> int:
    return a + b


def nap_then(seconds: float, value: int) -> int:
    """Sleep, then return ``value``: its result is posted while the test breaks the network."""
    time.sleep(seconds)
    return value
