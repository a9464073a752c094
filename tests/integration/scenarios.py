"""What every task-system backend must do against its real engine, written once: ``BackendScenarios``.

A backend's test module describes its running engine with an ``Engine`` subclass, provides two fixtures, ``engine``
(the ``jobs`` environment configured on a running engine) and ``victim`` (an engine whose worker the test may kill;
parametrize it to kill in several ways), and subclasses ``BackendScenarios`` as ``TestScenarios``. That way
``pytest tests/integration/test_<backend>.py`` runs the shared scenarios next to the backend's own tests. A backend
that needs another engine for the cancel scenario overrides the ``cancelling`` fixture in its subclass.

The scenarios assert what holds for every backend (values, error types, run records, cancellation, loss, payload
size). The ``Engine`` hooks add what only that engine shows: its logs, job states and worker processes. The
module imports no engine SDK, so ARQ's separate environment (wove's ``dev`` and ``arq`` extras) runs it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.queue_support import await_for, wait_for_file
from tests.integration.remote_tasks import InventoryError, add, hold, hold_async, out_of_stock, square, tail, where
from wove import DeliveryLostError, weave
from wove.environment import get_runtime
from wove.result import RunRecord


def unreachable_run_fails(match: str) -> DeliveryLostError:
    """One remote task in ``jobs``, whose ``callback_url`` points where nothing listens: the weave must fail with
    ``DeliveryLostError`` matching ``match`` (the backend's word on the worker's failure), never wait forever."""
    with pytest.raises(DeliveryLostError, match=match) as info, weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1

    assert w.result.records["never"][0].status == "failed"
    return info.value


class Engine:
    """A running engine as the scenarios see it; a backend overrides what its engine does differently or shows."""

    #: The remote task the cancel scenario holds on the worker: ``hold_async`` where the engine cancels coroutines.
    holding_task: Callable[..., Any] = staticmethod(hold)
    #: The cancel scenario maps the held task over this many items that run at once, plus this many queued behind.
    cancel_running = 1
    cancel_queued = 0
    #: Whether a cancel stops a task that is already running (a Dask worker cannot: the function runs to its end).
    interrupts_running = True
    #: A cancelled weave returns within this many seconds.
    cancel_returns_within = 2.0
    #: A killed worker is reported lost within this many seconds, with an error matching ``lost_message``.
    lost_within = 4.0
    lost_message: str | None = None
    #: The most bytes the engine may carry for a run whose argument is 1 MiB (it goes by reference).
    carried_limit = 8 * 1024

    def check_ran(self, record: RunRecord, pid: int) -> None:
        """After a remote run succeeded in process ``pid``: what the engine shows of it."""

    def check_mapped(self, records: list[RunRecord], pids: set[int]) -> None:
        """After a remote task mapped over 20 items succeeded in processes ``pids``."""

    def check_failed(self, record: RunRecord) -> None:
        """After a remote run raised: the engine recorded the failure too."""

    def check_started(self, pids: list[int]) -> None:
        """Held tasks started in processes ``pids``, before the test cancels or kills them: where they run."""

    async def saw_cancel(self, records: list[RunRecord], pids: list[int]) -> None:
        """After a weave holding tasks in ``pids`` was cancelled: the engine acted on it."""

    async def settle(self) -> None:
        """After the held tasks of a cancelled weave were released, on an engine that cannot interrupt them."""

    def kill(self, pid: int) -> None:
        """Kill the worker whose task runs in process ``pid``, as a lost machine or an OOM kill would."""
        os.kill(pid, signal.SIGKILL)

    async def after_loss(self, folder: Path) -> None:
        """After the weave reported the killed run lost; ``folder`` holds the held task's files."""

    @contextlib.contextmanager
    def watch_carried(self) -> Iterator[list[int]]:
        """Around a weave with a 1 MiB argument: yield a list the other ``carried`` hooks fill with message sizes."""
        yield []

    async def carried_while_running(self, carried: list[int]) -> None:
        """While that run is held on the worker: add the size of what the engine keeps for it."""

    async def carried_after(self, record: RunRecord, carried: list[int]) -> None:
        """After that weave: add the size of what the engine kept for the run."""


class BackendScenarios:
    """The shared scenarios; a backend's test module subclasses this as ``TestScenarios``."""

    @pytest.fixture
    def cancelling(self, engine: Engine) -> Engine:
        """The engine of the cancel scenario: the shared one unless the backend's subclass says otherwise."""
        return engine

    def test_local_and_remote_tasks(self, engine: Engine) -> None:
        with weave(n=20) as w:

            @w.do
            def local(n: int) -> int:
                return n + 1

            @w.do(environment="jobs")
            def remote(local: int) -> tuple[int, tuple[str, int]]:
                return add(local, 1), where()

        value, (_, pid) = w.result.remote
        assert value == 22 and pid != os.getpid()
        (record,) = w.result.records["remote"]
        assert record.status == "succeeded" and record.pid == pid and record.environment == "jobs"
        assert record.submitted_at is not None and record.started_at is not None and record.finished_at is not None
        assert record.submitted_at <= record.started_at <= record.finished_at
        engine.check_ran(record, pid)

    def test_remote_task_mapped_over_20_items(self, engine: Engine) -> None:
        with weave(n=20) as w:

            @w.do
            def items(n: int) -> list[int]:
                return list(range(n))

            @w.do(environment="jobs")
            def total(items: list[int]) -> int:
                return add(sum(items), 1)

            @w.do("items", environment="jobs")
            def squared(item: int) -> tuple[int, int]:
                return square(item)

            @w.do
            def report(total: int, squared: list[tuple[int, int]]) -> tuple[int, list[int]]:
                return total, [value for value, _ in squared]

        assert w.result.report == (191, [i * i for i in range(20)])
        pids = {pid for _, pid in w.result.squared}
        assert pids and os.getpid() not in pids
        records = w.result.records["squared"]
        assert [r.item for r in records] == list(range(20))
        assert all(r.status == "succeeded" and r.pid in pids for r in records)
        assert all(r.submitted_at <= r.started_at <= r.finished_at for r in records)  # type: ignore[operator]
        engine.check_mapped(records, pids)

    def test_remote_exception_keeps_its_type(self, engine: Engine) -> None:
        with pytest.raises(InventoryError, match="sku-9 is out of stock"), weave(sku="sku-9") as w:
            w.do(environment="jobs")(out_of_stock)  # by reference, as a module's function

        (record,) = w.result.records["out_of_stock"]
        assert record.status == "failed"
        engine.check_failed(record)

    async def test_a_run_that_lasts_is_seen_running_where_it_runs(self, engine: Engine, tmp_path: Path) -> None:
        # Backends whose short runs fold their start into the outcome post task_started once a run lasts.
        weaves: list[Any] = []
        running = asyncio.ensure_future(run_held(tmp_path, hold, 1, weaves))
        try:
            (pid,) = await started(tmp_path, 1)

            def record() -> RunRecord | None:  # the weave's result is readable only after it; the runtime has it
                runs = [run for run in get_runtime()._runs.pending() if run.request.task_name == "hold"]
                return runs[0].request.record if runs else None

            await await_for(lambda: (r := record()) is not None and r.status == "running", 10, "the run shown running")
            shown = record()
            assert shown is not None and shown.pid == pid and shown.started_at is not None
            (tmp_path / "release").touch()
            await asyncio.wait_for(running, 20)
        finally:
            await release(tmp_path, running)
        assert weaves[0].result.hold == 0 and weaves[0].result.records["hold"] == [shown]
        assert shown.status == "succeeded" and shown.finished_at is not None

    async def test_cancelling_the_weave_reaches_the_engine(self, cancelling: Engine, tmp_path: Path) -> None:
        engine, held = cancelling, cancelling.holding_task
        weaves: list[Any] = []
        running = asyncio.ensure_future(run_held(tmp_path, held, engine.cancel_running + engine.cancel_queued, weaves))
        try:
            pids = await started(tmp_path, engine.cancel_running)
            engine.check_started(pids)
            began = time.monotonic()
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(running, 10)
            assert time.monotonic() - began < engine.cancel_returns_within
            records = weaves[0].result.records[held.__name__]
            assert {r.status for r in records} == {"cancelled"}
            if held is hold_async:  # the coroutine on the worker was cancelled
                for item in range(engine.cancel_running):
                    await wait_for_file(tmp_path / f"cancelled-{item}", timeout=5)
            await engine.saw_cancel(records, pids)
        finally:
            await release(tmp_path, running)
        if engine.interrupts_running:
            await asyncio.sleep(0.5)  # a task still running would have seen its release by now
            assert not list(tmp_path.glob("finished-*"))
        else:  # it runs to its end, and what it posts back is refused
            ended = engine.cancel_running
            await await_for(lambda: len(list(tmp_path.glob("finished-*"))) == ended, 20, "the held tasks ended")
            await engine.settle()
        await asyncio.sleep(0.3)  # a free worker would pick up a queued task now, had it not been cancelled
        assert len(starts(tmp_path)) == engine.cancel_running
        await serves_runs()  # the engine carries on

    async def test_killed_worker_is_reported_lost(self, victim: Engine, tmp_path: Path) -> None:
        running = asyncio.ensure_future(run_held(tmp_path, hold, 1, []))
        try:
            pids = await started(tmp_path, 1)
            victim.check_started(pids)
            killed_at = time.monotonic()
            victim.kill(pids[0])
            with pytest.raises(DeliveryLostError, match=victim.lost_message):
                await asyncio.wait_for(running, victim.lost_within + 8)
            assert time.monotonic() - killed_at < victim.lost_within  # reported, not timed out
            await victim.after_loss(tmp_path)
        finally:
            await release(tmp_path, running)

    async def test_oversized_argument_goes_by_reference(self, engine: Engine, tmp_path: Path) -> None:
        blob = os.urandom(1 << 20)

        async def run() -> Any:
            async with weave(blob=blob, folder=str(tmp_path)) as w:
                w.do(environment="jobs")(tail)
            return w

        with engine.watch_carried() as carried:
            running = asyncio.ensure_future(run())
            try:
                await started(tmp_path, 1)
                await engine.carried_while_running(carried)
            finally:
                await release(tmp_path)
            w = await asyncio.wait_for(running, 20)
            assert w.result.tail == (len(blob), blob[-16:])
            await engine.carried_after(w.result.records["tail"][0], carried)
        assert len(carried) == 1 and 0 < carried[0] < engine.carried_limit, carried  # the megabyte stayed home


async def run_held(folder: Path, task: Callable[..., Any], count: int, weaves: list[Any]) -> None:
    """A weave running ``task`` remotely (mapped over ``count`` items if more than one) on ``folder``."""
    async with weave(folder=str(folder)) as w:
        weaves.append(w)
        if count == 1:
            w.do(environment="jobs")(task)
        else:
            w.do(range(count), environment="jobs")(task)


def starts(folder: Path) -> list[int]:
    """The pid of every start of a held task so far, item by item."""
    pids: list[int] = []
    for path in sorted(folder.glob("started-*")):
        text = path.read_text()
        pids += [int(line) for line in text[: text.rfind("\n") + 1].split()]  # whole lines only
    return pids


async def started(folder: Path, count: int) -> list[int]:
    """The pids of the first ``count`` held tasks to start, once they have."""
    await await_for(lambda: len(starts(folder)) >= count, 20, f"{count} held task(s) started")
    return starts(folder)[:count]


async def release(folder: Path, running: asyncio.Future[Any] | None = None) -> None:
    """Let the held tasks end; cancel ``running`` (a weave) if a failed assertion left it running."""
    (folder / "release").touch()
    if running is not None and not running.done():
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def serves_runs() -> None:
    """The ``jobs`` environment still runs remote tasks."""
    async with weave(items=[1, 2, 3]) as w:

        @w.do("items", environment="jobs")
        def plus_one(item: int) -> int:
            return add(item, 1)

    assert w.result.plus_one == [2, 3, 4]
