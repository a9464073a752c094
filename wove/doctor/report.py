"""What ``wove doctor`` found: one ``Check`` per line, grouped by environment, as text or as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Check", "EnvironmentReport", "Report"]


@dataclass
class Check:
    """One check of one environment. ``ok`` is ``None`` when it was skipped (an earlier check failed)."""

    name: str
    ok: bool | None
    detail: str
    fix: str | None = None

    @property
    def status(self) -> str:
        return "skip" if self.ok is None else "ok" if self.ok else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "ok": self.ok, "detail": self.detail, "fix": self.fix}


@dataclass
class EnvironmentReport:
    """The checks of one environment, and the callback URL its workers were given (adapter backends)."""

    name: str
    executor: str
    checks: list[Check] = field(default_factory=list)
    callback_url: str | None = None

    @property
    def ok(self) -> bool:
        return all(check.ok is not False for check in self.checks)

    def add(self, name: str, ok: bool | None, detail: str, fix: str | None = None) -> Check:
        check = Check(name, ok, detail, fix)
        self.checks.append(check)
        return check

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "executor": self.executor,
            "ok": self.ok,
            "callback_url": self.callback_url,
            "checks": [check.to_dict() for check in self.checks],
        }


@dataclass
class Report:
    """Everything ``wove doctor`` checked; ``ok`` when no check failed."""

    config: str | None
    environments: list[EnvironmentReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(env.ok for env in self.environments)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "config": self.config,
            "environments": [env.to_dict() for env in self.environments],
        }

    def render(self) -> str:
        """Plain text: a heading per environment, then ``ok``/``FAIL``/``skip``, the check, its detail and fix."""
        lines = [f"wove doctor: {self.config or 'built-in configuration'}"]
        width = max((len(check.name) for env in self.environments for check in env.checks), default=0)
        for env in self.environments:
            lines += ["", f"environment {env.name!r} (executor: {env.executor})"]
            for check in env.checks:
                lines.append(f"  {check.status:<4}  {check.name:<{width}}  {check.detail}")
                if check.fix:
                    lines.append(f"  {'':<4}  {'':<{width}}  fix: {check.fix}")
        failed = [env.name for env in self.environments if not env.ok]
        lines.append("")
        if failed:
            lines.append(f"FAIL: {len(failed)} of {len(self.environments)} environment(s): {', '.join(failed)}")
        else:
            lines.append(f"ok: {len(self.environments)} environment(s) checked")
        return "\n".join(lines)
