"""Tasks, bounded and every: the one owner of background work, on a real loop."""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest

import p2ptimeline as pt
from p2ptimeline._ratelog import RateLimitedLog
from p2ptimeline._tasks import Tasks, bounded, every
from p2ptimeline.testing import eventually

log = logging.getLogger("p2ptimeline.test_tasks")


async def test_spawned_work_runs_and_is_counted_until_done() -> None:
    """spawn runs a coroutine in the background; len counts it until it ends."""
    tasks = Tasks(log)
    go = asyncio.Event()

    async def work() -> int:
        await go.wait()
        return 42

    task = tasks.spawn(work())
    assert len(tasks) == 1
    go.set()
    assert await task == 42
    await eventually(lambda: len(tasks) == 0)
    await tasks.close()


async def test_a_failure_is_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task that raises is logged once, at ERROR, with the traceback and
    the task's name; tasks that end well or are cancelled are not logged."""
    tasks = Tasks(log)

    async def broken() -> None:
        raise ValueError("boom")

    async def fine() -> None:
        pass

    with caplog.at_level(logging.DEBUG, logger=log.name):
        failed = tasks.spawn(broken(), name="the broken job")
        tasks.spawn(fine())
        forever = tasks.spawn(asyncio.Event().wait())
        await asyncio.wait([failed])
        await eventually(lambda: len(tasks) == 1)
        await tasks.close()
    assert forever.cancelled()
    records = [r for r in caplog.records if r.name == log.name]
    assert len(records) == 1, records
    (record,) = records
    assert record.levelno == logging.ERROR
    assert "the broken job" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)
    assert "boom" in caplog.text
    assert "Traceback" in caplog.text


async def test_a_coroutine_is_named_after_its_function_by_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a name, the log line names the coroutine's function."""
    tasks = Tasks(log)

    async def renew_the_lease() -> None:
        raise RuntimeError("bug")

    with caplog.at_level(logging.ERROR, logger=log.name):
        await asyncio.wait([tasks.spawn(renew_the_lease())])
        await eventually(lambda: len(tasks) == 0)
    assert "renew_the_lease" in caplog.records[0].getMessage()


async def test_close_cancels_every_task_and_waits_for_it() -> None:
    """close() cancels what runs and returns only once each task has ended
    (its cleanup included); it is idempotent."""
    tasks = Tasks(log)
    cleaned: list[int] = []
    started = asyncio.Event()

    async def worker(i: int) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            cleaned.append(i)

    spawned = [tasks.spawn(worker(i)) for i in range(3)]
    await started.wait()
    await tasks.close()
    assert sorted(cleaned) == [0, 1, 2]
    assert all(task.cancelled() for task in spawned)
    assert len(tasks) == 0
    assert tasks.closed
    await tasks.close()


async def test_spawn_after_close_raises_and_closes_the_coroutine() -> None:
    """A closed group runs nothing more: spawn raises, and the coroutine is
    closed (never left un-awaited), a future is cancelled."""
    tasks = Tasks(log)
    await tasks.close()
    ran: list[bool] = []

    async def work() -> None:
        ran.append(True)

    coroutine = work()
    with pytest.raises(RuntimeError):
        tasks.spawn(coroutine)
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(RuntimeError):
        tasks.spawn(future)
    assert future.cancelled()
    await asyncio.sleep(0)
    assert not ran


async def test_cancelling_close_still_cancels_the_tasks() -> None:
    """If the caller of close() is cancelled while close waits for a slow
    cleanup, the tasks are cancelled all the same, and the group is closed."""
    tasks = Tasks(log)
    release = asyncio.Event()
    cancelled = asyncio.Event()
    running = asyncio.Event()

    async def stubborn() -> None:
        try:
            running.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            await release.wait()  # a slow cleanup
            raise

    task = tasks.spawn(stubborn())
    await running.wait()
    closer = asyncio.create_task(tasks.close())
    await cancelled.wait()  # close() cancelled the task and now waits for it
    await asyncio.sleep(0)
    assert not closer.done()
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    with pytest.raises(RuntimeError):  # closed, although close() did not finish
        tasks.spawn(asyncio.sleep(0))
    async with asyncio.timeout(5):
        await asyncio.wait([task])
    assert task.cancelled()


async def test_a_task_may_close_its_own_group() -> None:
    """A task of the group that closes it (an owner stopped from its own
    background work) cancels the others and is not cancelled itself."""
    tasks = Tasks(log)
    other = tasks.spawn(asyncio.Event().wait())

    async def stopper() -> str:
        await tasks.close()
        return "closed"

    stopping = tasks.spawn(stopper())
    async with asyncio.timeout(5):
        assert await stopping == "closed"
    assert other.cancelled()


async def test_cancel_cancels_at_once_without_waiting() -> None:
    """cancel(), for callbacks that cannot wait, cancels every task and
    refuses new ones; close() then waits for them."""
    tasks = Tasks(log)
    task = tasks.spawn(asyncio.Event().wait())
    await asyncio.sleep(0)  # let it start
    tasks.cancel()
    assert tasks.closed
    with pytest.raises(RuntimeError):
        tasks.spawn(asyncio.sleep(0))
    await tasks.close()
    assert task.cancelled()


async def test_bounded_runs_at_most_limit_at_once_and_keeps_order() -> None:
    """bounded() returns the results in the items' order, never running more
    than `limit` jobs at once."""
    running = 0
    most = 0

    async def job(i: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001 * (i % 3))
        running -= 1
        return i * i

    assert await bounded(job, range(20), limit=4) == [i * i for i in range(20)]
    assert most == 4


async def test_every_goes_on_whatever_the_job_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """every() runs its job again after a network failure (logged at INFO)
    and after a bug (logged at ERROR with the traceback)."""
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise pt.RegistryUnavailable("no node answered")
        if calls == 2:
            raise KeyError("a bug")

    tasks = Tasks(log)
    with caplog.at_level(logging.INFO, logger=log.name):
        tasks.spawn(every(0.001, flaky, RateLimitedLog(log)))
        await eventually(lambda: calls >= 4)
        await tasks.close()
    records = [r for r in caplog.records if r.name == log.name]
    assert [r.levelno for r in records] == [logging.INFO, logging.ERROR]
    assert "no node answered" in records[0].getMessage()
    assert records[1].exc_info is not None
    assert isinstance(records[1].exc_info[1], KeyError)
