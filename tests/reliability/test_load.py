"""Load: thousands of mapped remote tasks, with ``delivery_max_in_flight`` bounding what is submitted at once.

Each weave runs in a process of its own (``tests/reliability/load_weave.py``) so its memory can be measured. What must
hold: every item resolves, with its own value; no task body runs twice (each execution notes its item in its worker's
file); the runtime never has more runs in flight than the bound; the submitting process's peak resident memory stays
under a generous bound (a leak guard, about twice what is measured). The counts, the time and the memory go into
docs/reliability.md. The CI sizes are 10,000 items on the ``process`` backend and 2,000 on Celery; the ``soak``
variants (``pytest tests/reliability -m soak``) run ten times as many, and eight weaves in a row in one process.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.queue_support import ROOT, worker_env
from tests.reliability.support import record, start_celery, unique_queue
from tests.services.redis import RedisServer

pytestmark = pytest.mark.integration

#: Redis database of this module's Celery worker.
CELERY_DB = 12
#: The leak guard on the submitting process's peak resident memory: this many MiB, plus ``PER_ITEM_KIB`` per item of
#: the weave (a weave holds every item's result, record and waiting run until it ends; measured: about 4 KiB each).
PEAK_RSS_BASE_MIB = 256
PER_ITEM_KIB = 8
#: Growth of resident memory allowed over the last three of several weaves in one process (soak). The runtime and the
#: callback server each remember the ids of the last 100,000 resolved runs (to tell late duplicates from forgeries),
#: so memory grows until that many runs resolved, and must then stay flat.
GROWTH_LIMIT_MIB = 16


def run_load(settings: dict[str, Any], folder: Path, timeout: float) -> dict[str, Any]:
    """Run the load weave in its own process; its JSON report."""
    settings = {**settings, "folder": str(folder)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.reliability.load_weave", json.dumps(settings)],
        cwd=ROOT,
        env={**os.environ, **worker_env()},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    report["stderr_lines"] = len(done.stderr.splitlines())
    return report


def executions(folder: Path) -> collections.Counter[int]:
    """How many times each item's task body ran, over every worker's file."""
    ran: collections.Counter[int] = collections.Counter()
    for path in folder.glob("ran-*"):
        ran.update(int(line) for line in path.read_text().split())
    return ran


def check(report: dict[str, Any], folder: Path, items: int, max_in_flight: int) -> dict[str, Any]:
    """Assert what must hold; the counts for the report."""
    ran = executions(folder)
    rounds = report["rounds"]
    for one in rounds:
        assert one["resolved"] == one["correct"] == one["succeeded_records"] == one["records"] == items
        assert one["peak_in_flight"] <= max_in_flight
    assert set(ran) == set(range(items))
    assert set(ran.values()) == {len(rounds)}, "a task body ran more than once per weave"
    assert report["peak_rss_mib"] < PEAK_RSS_BASE_MIB + items * PER_ITEM_KIB / 1024
    return {
        "submitted": items * len(rounds),
        "resolved": sum(one["resolved"] for one in rounds),
        "lost": sum(items - one["resolved"] for one in rounds),
        "duplicated": sum(count - len(rounds) for count in ran.values()),
        "seconds": [one["seconds"] for one in rounds],
        "runs_per_second": [round(items / one["seconds"]) for one in rounds],
        "peak_in_flight": max(one["peak_in_flight"] for one in rounds),
        "baseline_rss_mib": report["baseline_rss_mib"],
        "rss_after_each_weave_mib": [one["rss_after_mib"] for one in rounds],
        "peak_rss_mib": report["peak_rss_mib"],
    }


# -- the process backend -----------------------------------------------------------------------------------------------


def process_load(tmp_path: Path, items: int, max_in_flight: int, rounds: int = 1, timeout: float = 240) -> None:
    settings = {
        "executor": "process",
        "executor_config": {"max_workers": 2},
        "items": items,
        "max_in_flight": max_in_flight,
        "rounds": rounds,
    }
    report = run_load(settings, tmp_path, timeout)
    measured = check(report, tmp_path, items, max_in_flight)
    record("load", backend="process", items=items, max_in_flight=max_in_flight, workers=2, **measured)
    if rounds > 2:
        after = [one["rss_after_mib"] for one in report["rounds"]]
        assert after[-1] - after[-3] < GROWTH_LIMIT_MIB, after


@pytest.mark.timeout(300)
def test_10_000_mapped_tasks_on_the_process_backend(tmp_path: Path) -> None:
    process_load(tmp_path, 10_000, 64)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_100_000_mapped_tasks_on_the_process_backend(tmp_path: Path) -> None:
    process_load(tmp_path, 100_000, 256, timeout=3000)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_eight_weaves_of_20_000_in_one_process(tmp_path: Path) -> None:
    """160,000 runs in one process: past the 100,000 resolved run ids it remembers, memory stops growing."""
    process_load(tmp_path, 20_000, 64, rounds=8, timeout=3000)


# -- Celery ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def celery_broker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A prefork worker with two pool children (the machine's cores), on a queue of its own."""
    broker, queue = redis_server.url(CELERY_DB), unique_queue("load")
    worker = start_celery(tmp_path_factory.mktemp("celery-load"), broker, queue, concurrency=2)
    try:
        yield broker, queue
    finally:
        worker.stop()


def celery_load(broker: str, queue: str, tmp_path: Path, items: int, max_in_flight: int, timeout: float) -> None:
    settings = {
        "executor": "celery",
        "executor_config": {"broker_url": broker, "queue": queue},
        "items": items,
        "max_in_flight": max_in_flight,
    }
    report = run_load(settings, tmp_path, timeout)
    measured = check(report, tmp_path, items, max_in_flight)
    record("load", backend="celery", items=items, max_in_flight=max_in_flight, workers=2, **measured)


@pytest.mark.timeout(300)
def test_2_000_mapped_tasks_on_celery(celery_broker: tuple[str, str], tmp_path: Path) -> None:
    celery_load(*celery_broker, tmp_path, 2_000, 200, timeout=240)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_20_000_mapped_tasks_on_celery(celery_broker: tuple[str, str], tmp_path: Path) -> None:
    celery_load(*celery_broker, tmp_path, 20_000, 500, timeout=3000)
