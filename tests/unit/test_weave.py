"""The inline weave: call sites, concurrency, mapping, retries, timeouts and both error modes."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import wove
from wove import TaskTimeoutError, UpstreamFailedError, WoveError, weave


def order_pipeline() -> Any:
    with weave(order_id=7) as w:

        @w.do
        def order(order_id: int) -> list[int]:
            return [order_id, order_id + 1, order_id + 2]

        @w.do
        async def customer(order: list[int]) -> str:
            await asyncio.sleep(0)
            return f"customer-of-{order[0]}"

        @w.do("order", workers=2)
        def priced(item: int) -> int:
            return item * 10

        @w.do
        def report(customer: str, priced: list[int]) -> tuple[str, int]:
            return customer, sum(priced)

    return w


def test_sync_weave_in_plain_code() -> None:
    w = order_pipeline()
    assert w.result.final == ("customer-of-7", 240)
    assert w.result.priced == [70, 80, 90]
    assert w.result["customer"] == "customer-of-7"
    assert list(w.result) == ["order", "customer", "priced", "report"]


async def test_async_weave_in_the_callers_loop() -> None:
    caller_loop = asyncio.get_running_loop()
    async with weave(x=2) as w:

        @w.do
        async def where(x: int) -> bool:
            return asyncio.get_running_loop() is caller_loop

        @w.do
        def doubled(x: int) -> int:
            return x * 2

    assert w.result.where is True
    assert w.result.doubled == 4


async def test_sync_weave_called_from_inside_a_running_loop() -> None:
    w = order_pipeline()  # a sync with-block inside async code blocks, but works
    assert w.result.final == ("customer-of-7", 240)


def test_weaves_in_many_threads_at_once() -> None:
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            with weave(n=n) as w:

                @w.do
                def square(n: int) -> int:
                    return n * n

                @w.do
                async def plus_one(square: int) -> int:
                    return square + 1

            results[n] = w.result.final
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == {n: n * n + 1 for n in range(16)}


def test_independent_sync_tasks_run_concurrently() -> None:
    barrier = threading.Barrier(3, timeout=5)  # breaks (and fails the test) unless all three run at once
    with weave() as w:

        @w.do
        def a() -> str:
            barrier.wait()
            return "a"

        @w.do
        def b() -> str:
            barrier.wait()
            return "b"

        @w.do
        def c() -> str:
            barrier.wait()
            return "c"

    assert [w.result.a, w.result.b, w.result.c] == ["a", "b", "c"]


async def test_a_task_starts_as_soon_as_its_own_inputs_exist() -> None:
    slow_may_finish = asyncio.Event()
    async with weave() as w:

        @w.do
        async def fast() -> int:
            return 1

        @w.do
        async def slow() -> int:
            await asyncio.wait_for(slow_may_finish.wait(), 5)
            return 2

        @w.do
        async def after_fast(fast: int) -> int:
            slow_may_finish.set()  # only reachable while slow is still waiting
            return fast + 1

    assert (w.result.slow, w.result.after_fast) == (2, 2)


def test_mapped_results_keep_input_order_and_respect_workers() -> None:
    lock = threading.Lock()
    running = {"now": 0, "peak": 0}

    with weave(items=list(range(20))) as w:

        @w.do("items", workers=3)
        def slow_square(item: int) -> int:
            with lock:
                running["now"] += 1
                running["peak"] = max(running["peak"], running["now"])
            time.sleep(0.01 * (item % 3))
            with lock:
                running["now"] -= 1
            return item * item

    assert w.result.slow_square == [i * i for i in range(20)]
    assert 1 < running["peak"] <= 3


def test_map_over_a_literal_iterable_with_other_dependencies() -> None:
    with weave(factor=3) as w:

        @w.do
        def offset() -> int:
            return 1

        @w.do([1, 2, 3])
        async def scaled(value: int, factor: int, offset: int) -> int:
            return value * factor + offset

    assert w.result.scaled == [4, 7, 10]


def test_mapping_over_a_non_iterable_fails_clearly() -> None:
    with pytest.raises(TypeError, match="needs an iterable"), weave() as w:

        @w.do
        def number() -> int:
            return 5

        @w.do("number")
        def each(item: int) -> int:
            return item


def test_retries_rerun_a_failing_task() -> None:
    attempts: list[int] = []
    with weave() as w:

        @w.do(retries=2)
        def flaky() -> str:
            attempts.append(1)
            if len(attempts) < 3:
                raise ConnectionError("try again")
            return "ok"

    assert w.result.flaky == "ok"
    assert len(attempts) == 3
    assert [r.status for r in w.result.records["flaky"]] == ["failed", "failed", "succeeded"]


def test_retries_exhausted_raise_the_original_exception() -> None:
    with pytest.raises(ConnectionError, match="still down"), weave(retries=1) as w:

        @w.do
        def down() -> None:
            raise ConnectionError("still down")

    assert len(w._specs) == 1


async def test_timeout_applies_to_each_attempt() -> None:
    attempts: list[int] = []
    with pytest.raises(TaskTimeoutError, match="'sleepy' timed out after 0.05s"):
        async with weave() as w:

            @w.do(timeout=0.05, retries=1)
            async def sleepy() -> None:
                attempts.append(1)
                await asyncio.sleep(10)

    assert len(attempts) == 2


def test_raise_mode_cancels_dependents_and_raises_the_original() -> None:
    ran: list[str] = []

    class Boom(Exception):
        pass

    with pytest.raises(Boom), weave() as w:

        @w.do
        def bad() -> None:
            raise Boom("first failure")

        @w.do
        def downstream(bad: None) -> None:
            ran.append("downstream")

    assert ran == []


async def test_raise_mode_cancels_tasks_still_running() -> None:
    cancelled = asyncio.Event()
    with pytest.raises(ValueError, match="nope"):
        async with weave() as w:

            @w.do
            async def long() -> None:
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise

            @w.do
            async def bad() -> None:
                await asyncio.sleep(0.01)
                raise ValueError("nope")

    assert cancelled.is_set()


def test_return_mode_keeps_failures_and_finishes_the_rest() -> None:
    with weave(error_mode="return") as w:

        @w.do
        def bad() -> None:
            raise KeyError("missing")

        @w.do
        def child(bad: None) -> str:
            return "never"

        @w.do
        def grandchild(child: str) -> str:
            return "never"

        @w.do
        def independent() -> str:
            return "fine"

    assert w.result.independent == "fine"
    assert set(w.result.errors) == {"bad", "child", "grandchild"}
    assert isinstance(w.result.errors["bad"], KeyError)
    skipped = w.result.errors["grandchild"]
    assert isinstance(skipped, UpstreamFailedError) and skipped.upstream == "child"
    with pytest.raises(KeyError):
        w.result.bad


def test_result_is_unavailable_inside_the_block_and_tasks_after_it() -> None:
    with weave() as w:

        @w.do
        def one() -> int:
            return 1

        with pytest.raises(WoveError, match="once the weave"):
            w.result

    with pytest.raises(WoveError, match="already run"):

        @w.do
        def late() -> None: ...


def test_unknown_result_name_lists_the_tasks() -> None:
    with weave() as w:

        @w.do
        def one() -> int:
            return 1

    with pytest.raises(AttributeError, match="tasks: one"):
        w.result.two
    with pytest.raises(KeyError, match="tasks: one"):
        w.result["two"]


def test_an_exception_in_the_body_runs_nothing() -> None:
    ran: list[int] = []
    with pytest.raises(RuntimeError, match="body"), weave() as w:

        @w.do
        def t() -> None:
            ran.append(1)

        raise RuntimeError("body")
    assert ran == []


def test_an_empty_weave_has_no_final_value() -> None:
    with weave() as w:
        pass
    assert len(w.result) == 0
    with pytest.raises(WoveError, match="no tasks"):
        w.result.final


def test_records_and_timeline_show_where_tasks_ran() -> None:
    w = order_pipeline()
    records = w.result.records
    assert [r.item for r in records["priced"]] == [0, 1, 2]
    assert all(r.pid is not None and r.status == "succeeded" for rs in records.values() for r in rs)
    table = w.result.timeline()
    assert "priced[2]" in table and "default" in table


def test_kwargs_and_defaults() -> None:
    with weave() as w:

        @w.do
        def base() -> int:
            return 2

        @w.do
        def uses_default(base: int, scale: int = 5, **extra: Any) -> int:
            return base * scale

    assert w.result.uses_default == 10


def test_version_and_public_names() -> None:
    assert wove.__version__
    for name in wove.__all__:
        assert hasattr(wove, name), name


def test_after_a_raised_failure_the_result_shows_what_happened() -> None:
    with pytest.raises(ValueError, match="bad input"), weave() as w:

        @w.do
        def fine() -> int:
            return 1

        @w.do
        def bad(fine: int) -> None:
            raise ValueError("bad input")

    assert w.result.fine == 1
    assert isinstance(w.result.errors["bad"], ValueError)
    assert [r.status for r in w.result.records["bad"]] == ["failed"]
