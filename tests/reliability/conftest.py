"""Fixtures of the reliability suite, and the ``soak`` marker: soak tests run only when ``-m`` names them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.reliability.support import SentFrames, count_sent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: long load runs, left out unless selected with -m soak")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave soak tests out unless the marker expression mentions them (``pytest tests/reliability -m soak``)."""
    if "soak" in (config.option.markexpr or ""):
        return
    kept = [item for item in items if item.get_closest_marker("soak") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> SentFrames:
    """Counts every ``run_task`` and ``cancel_task`` the runtime hands a backend executor in this process."""
    return count_sent(monkeypatch)


@pytest.fixture
def published() -> Iterator[list[str]]:
    """Task ids of every ``wove.run_payload`` message this process published to a Celery broker."""
    from celery.signals import after_task_publish

    from wove.integrations.celery import TASK_NAME

    ids: list[str] = []

    def count(sender: Any = None, headers: Any = None, **_: Any) -> None:
        if sender == TASK_NAME:
            ids.append(str((headers or {}).get("id")))

    after_task_publish.connect(count, weak=False)
    try:
        yield ids
    finally:
        after_task_publish.disconnect(count)
