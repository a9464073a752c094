"""What code inside a backend worker calls: ``run(payload)``, or ``await arun(payload)`` in async workers.

Both execute a wove backend payload and report its events to the weave's callback server; see
:mod:`wove.backend.worker`.
"""

from __future__ import annotations

from wove.backend.worker import run_backend_payload as run
from wove.backend.worker import run_backend_payload_async as arun

__all__ = ["arun", "run"]
