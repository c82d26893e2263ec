"""`Tasks`: the background tasks of one owner, spawned, logged and closed as one.

Every long-lived part of a peer (the peer itself, a session, the registry,
the DHT protocol, a connection) starts work that must not outlive it. A
`Tasks` holds that work: `spawn` starts a coroutine and keeps a reference
(asyncio keeps only weak ones), a task that fails is logged once with its
traceback (nobody awaits it to see the error), and `close` cancels what is
left and waits for it, so that the owner's `stop()` releases everything
whatever happens before it.

`bounded` and `every` are the two loops the owners share: a bounded fan-out
and a periodic job that survives its own failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from ._errors import NetworkError, RemoteError, StoreError
from ._ratelog import RateLimitedLog

__all__ = ["Tasks", "bounded", "every"]

T = TypeVar("T")
X = TypeVar("X")

CONCURRENCY = 16
"""Jobs `bounded` runs at once unless told otherwise."""


class Tasks:
    """A set of background tasks owned by one object.

    Args:
        logger: Where failures of spawned tasks are logged.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closed = False

    def spawn(
        self, work: Awaitable[T], *, name: str | None = None
    ) -> asyncio.Future[T]:
        """Run `work` in the background until it ends or `close` is called.

        Args:
            work: A coroutine, or a task or future already running, which
                the group then owns.
            name: What the task is, for the log line if it fails (the
                coroutine's name by default).

        Raises:
            RuntimeError: The group is closed (`work` is closed or
                cancelled, not run).
        """
        if self._closed:
            if isinstance(work, Coroutine):
                work.close()
            elif isinstance(work, asyncio.Future):
                work.cancel()
            raise RuntimeError("spawn on closed tasks")
        if isinstance(work, Coroutine):
            task: asyncio.Future[T] = asyncio.get_running_loop().create_task(
                work, name=name or getattr(work, "__qualname__", None)
            )
        else:
            task = asyncio.ensure_future(work)
            if name is not None and isinstance(task, asyncio.Task):
                task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def __len__(self) -> int:
        """How many tasks are running."""
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        """Whether `cancel` or `close` was called: nothing more may be spawned."""
        return self._closed

    def cancel(self) -> None:
        """Cancel every task now, without waiting for them (for a callback
        that cannot wait: `close` waits). Spawning after it raises."""
        self._closed = True
        current = _current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    async def close(self) -> None:
        """Cancel every task and wait until all are done; idempotent.

        Spawning after `close` raises. If the caller is cancelled while
        waiting, the tasks are still cancelled (they may finish later). A
        task of the group that closes it is neither cancelled nor waited for
        (it is the one closing), so an owner may be stopped from its own
        background work.
        """
        self.cancel()
        current = _current_task()
        await cancel(task for task in self._tasks if task is not current)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            name = task.get_name() if isinstance(task, asyncio.Task) else "a future"
            self._log.error("background task %s failed", name, exc_info=error)


def _current_task() -> asyncio.Task[Any] | None:
    """The task running now, if any (None outside an event loop too)."""
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


async def cancel(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until they are all done (errors are not raised)."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def bounded(
    job: Callable[[X], Awaitable[T]], items: Iterable[X], limit: int = CONCURRENCY
) -> list[T]:
    """`job(item)` for every item, at most `limit` at a time; results in order.

    Each coroutine is created only when its turn comes, so none is left
    un-awaited if this is cancelled.
    """
    slots = asyncio.Semaphore(limit)

    async def run(item: X) -> T:
        async with slots:
            return await job(item)

    return await asyncio.gather(*(run(item) for item in items))


async def every(
    interval: float, job: Callable[[], Awaitable[object]], log: RateLimitedLog
) -> None:
    """Run `job` every `interval` seconds until cancelled, whatever it raises.

    Failures are logged on `log`, at most once per kind and job per its
    interval: network and remote failures at INFO (they are expected in a
    network), store failures at WARNING, anything else with a traceback.
    """
    name = getattr(job, "__name__", "job")
    while True:
        await asyncio.sleep(interval)
        try:
            await job()
        except (NetworkError, RemoteError) as exc:
            log.info(f"every {name}", "periodic %s failed: %s", name, exc)
        except StoreError as exc:
            log.warning(f"every {name} store", "periodic %s failed: %s", name, exc)
        except Exception:
            log.exception(
                f"every {name} bug", "periodic %s failed; it will run again", name
            )
