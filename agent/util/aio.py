"""Small asyncio and thread helpers shared by the services."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` up to ``timeout`` seconds; True if it was set in time."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


class LockTimeout(Exception):
    """:meth:`KeyedLocks.hold` waited longer than its timeout for ``key``."""

    def __init__(self, key: Hashable) -> None:
        super().__init__(f"timed out waiting for {key!r}")
        self.key = key


class KeyedLocks:
    """One FIFO lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        #: key -> [lock, holders and waiters]
        self._locks: dict[Hashable, list[Any]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable, timeout: float | None = None) -> AsyncIterator[None]:
        """Hold ``key``'s lock; :class:`LockTimeout` if not acquired within ``timeout``."""
        entry = self._locks.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            lock: asyncio.Lock = entry[0]
            try:
                async with asyncio.timeout(timeout):
                    await lock.acquire()
            except TimeoutError:
                raise LockTimeout(key) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._locks[key]


async def to_the_end(cleanup: Coroutine[Any, Any, None], name: str = "cleanup") -> None:
    """Run a clean-up to its end even if the caller is cancelled (again) meanwhile.

    A cancellation that arrives during the clean-up is raised once it has finished, so
    the caller holds what it holds (a lock) until the clean-up is over.
    """
    task = asyncio.create_task(cleanup, name=name)
    interrupted = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            interrupted = True
    task.result()
    if interrupted:
        raise asyncio.CancelledError


class DaemonThreadPool(concurrent.futures.Executor):
    """A fixed pool of daemon threads.

    A libvirt call stuck in the kernel or in a frozen libvirtd cannot be interrupted; with
    daemon threads it at least cannot keep the agent from exiting.
    """

    def __init__(self, size: int, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(size)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)
