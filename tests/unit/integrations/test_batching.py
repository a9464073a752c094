"""``BatchSubmitter`` and ``call_blocking``: SDK calls off the event loop, in batches, and at interpreter exit."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from wove.integrations._batching import BatchSubmitter, call_blocking


class Recorder:
    """A fake SDK: records each batch and the thread it ran on; fails items named ``"bad"``."""

    def __init__(self, release: threading.Event | None = None) -> None:
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self.release = release

    def __call__(self, items: Sequence[str]) -> list[str | BaseException]:
        if self.release is not None:
            self.release.wait(5)
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        return [ValueError(item) if item == "bad" else item.upper() for item in items]


async def test_a_lone_item_goes_at_once_off_the_loop() -> None:
    sdk = Recorder()
    submitter = BatchSubmitter(sdk)
    assert await submitter.submit("a") == "A"
    assert sdk.batches == [["a"]]
    assert threading.current_thread().name not in sdk.threads


async def test_items_arriving_during_a_batch_share_the_next_one() -> None:
    release = threading.Event()
    sdk = Recorder(release)
    submitter = BatchSubmitter(sdk)
    first = asyncio.ensure_future(submitter.submit("first"))
    await asyncio.sleep(0.05)  # the first batch is now waiting in the thread
    rest = [asyncio.ensure_future(submitter.submit(f"item{i}")) for i in range(50)]
    await asyncio.sleep(0.05)
    release.set()
    assert await first == "FIRST"
    assert await asyncio.gather(*rest) == [f"ITEM{i}" for i in range(50)]
    assert sdk.batches == [["first"], [f"item{i}" for i in range(50)]]


async def test_each_item_gets_its_own_outcome() -> None:
    submitter = BatchSubmitter(Recorder())
    results = await asyncio.gather(submitter.submit("ok"), submitter.submit("bad"), return_exceptions=True)
    assert results[0] == "OK" and isinstance(results[1], ValueError)


async def test_a_failing_call_fails_its_whole_batch_and_the_next_batch_still_runs() -> None:
    calls = 0

    def flaky(items: Sequence[str]) -> list[str | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("broker down")
        return list(items)

    submitter = BatchSubmitter(flaky)
    with pytest.raises(ConnectionError):
        await submitter.submit("a")
    assert await submitter.submit("b") == "b"


async def test_a_cancelled_item_not_yet_sent_is_dropped() -> None:
    release = threading.Event()
    sdk = Recorder(release)
    submitter = BatchSubmitter(sdk)
    first = asyncio.ensure_future(submitter.submit("first"))
    await asyncio.sleep(0.05)
    dropped = asyncio.ensure_future(submitter.submit("dropped"))
    kept = asyncio.ensure_future(submitter.submit("kept"))
    await asyncio.sleep(0)
    dropped.cancel()
    release.set()
    assert (await first, await kept) == ("FIRST", "KEPT")
    assert sdk.batches == [["first"], ["kept"]]


async def test_call_blocking_runs_in_a_thread_and_inline_once_the_pool_is_shut_down() -> None:
    loop = asyncio.get_running_loop()
    assert await call_blocking(lambda: threading.current_thread().name) != threading.current_thread().name
    pool = ThreadPoolExecutor(1)
    loop.set_default_executor(pool)
    pool.shutdown()  # what interpreter exit does to every pool before atexit handlers run
    assert await call_blocking(lambda: threading.current_thread().name) == threading.current_thread().name
