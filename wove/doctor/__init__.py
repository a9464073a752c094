"""``wove doctor``: check that each configured environment can really run a task, end to end.

For each environment: the packages it needs are installed, its backend answers, and a ping task submitted through
the real backend is run by a worker whose events reach the callback URL. Each failure comes with a concrete fix.
Use it from code with :func:`diagnose`, or as ``wove doctor`` (``wove.doctor.command``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from wove.config import Settings
from wove.doctor.report import Check, EnvironmentReport, Report

__all__ = ["DEFAULT_TIMEOUT", "Check", "EnvironmentReport", "Report", "diagnose"]

#: Seconds the doctor waits for an environment to start, and again for its ping to come back.
DEFAULT_TIMEOUT = 20.0


def diagnose(
    settings: Settings,
    environments: Sequence[str] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    config: str | None = None,
) -> Report:
    """Check ``environments`` (default: every configured one) of ``settings``, one after another, in a private event
    loop; ``config`` names where the settings came from in the report. Unknown names raise
    ``UnknownEnvironmentError``. Nothing is applied to the process-wide configuration or runtime."""
    from wove.doctor.checks import check_environment

    names = list(settings.environments) if environments is None else list(environments)
    for name in names:
        settings.environment(name)  # UnknownEnvironmentError names the configured ones, before anything starts

    async def run() -> Report:
        report = Report(config)
        for name in names:
            report.environments.append(await check_environment(name, settings, timeout))
        return report

    return asyncio.run(run())
