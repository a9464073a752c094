"""The task ``wove doctor`` sends through each backend. Standard library only: workers import it by reference."""

from __future__ import annotations

import os
import platform
import socket
import sys
from typing import Any

__all__ = ["ping"]


def ping() -> dict[str, Any]:
    """Where it ran: host, pid, the worker's Python and wove versions (a mismatch with the weave's is worth knowing)."""
    from wove import __version__

    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "wove": __version__,
    }
