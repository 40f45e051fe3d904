"""Run one test body against the sync face or the asyncio face of every pattern.

`Face("sync")` builds the sync classes directly. `Face("async")` builds the asyncio classes
on a real event loop running in a helper thread, and hands the test a blocking proxy:
each method call runs on that loop (awaited if it is a coroutine) under a timeout. The
asyncio objects are created, used and closed only in the loop's thread.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any

import zfabric
from zfabric.envelope import Envelope

CALL_TIMEOUT = 60.0


class LoopThread:
    """An asyncio loop in a daemon thread; `run` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async def go() -> Any:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        return self.run(go())

    def close(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_rest(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Blocking:
    """A proxy that runs every method of an asyncio object on the loop thread and returns the result."""

    def __init__(self, obj: Any, lt: LoopThread) -> None:
        self._obj = obj
        self._lt = lt

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr
        return lambda *a, **kw: self._lt.call(attr, *a, **kw)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:  # a public attribute of the object (e.g. a group renamed), not of this proxy
            setattr(self._obj, name, value)

    def __repr__(self) -> str:
        return f"Blocking({self._obj!r})"


class _AsyncService(Blocking):
    """An AsyncReplier serving in a task on the loop; close() stops it and waits for the task."""

    def __init__(self, obj: Any, lt: LoopThread) -> None:
        super().__init__(obj, lt)
        self._task = asyncio.run_coroutine_threadsafe(obj.serve(), lt.loop)

    def close(self, linger_ms: int | None = None) -> None:
        self._lt.call(self._obj.stop)
        try:
            self._task.result(5)
        finally:
            self._lt.call(self._obj.close, linger_ms)


class Face:
    """Constructors for every pattern in one face; remembers what it built and closes it all."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_async = name == "async"
        self.lt = LoopThread() if self.is_async else None
        self._made: list[Any] = []

    def _make(self, sync_cls: type, async_cls: type, *args: Any, **kwargs: Any) -> Any:
        if self.lt is None:
            obj = sync_cls(*args, **kwargs)
        else:
            obj = Blocking(self.lt.call(async_cls, *args, **kwargs), self.lt)
        self._made.append(obj)
        return obj

    def producer(self, *a: Any, **kw: Any) -> Any:
        return self._make(zfabric.Producer, zfabric.AsyncProducer, *a, **kw)

    def consumer(self, *a: Any, **kw: Any) -> Any:
        return self._make(zfabric.Consumer, zfabric.AsyncConsumer, *a, **kw)

    def publisher(self, *a: Any, **kw: Any) -> Any:
        return self._make(zfabric.Publisher, zfabric.AsyncPublisher, *a, **kw)

    def subscriber(self, *a: Any, **kw: Any) -> Any:
        return self._make(zfabric.Subscriber, zfabric.AsyncSubscriber, *a, **kw)

    def requester(self, *a: Any, **kw: Any) -> Any:
        return self._make(zfabric.Requester, zfabric.AsyncRequester, *a, **kw)

    def scatterer(self, *a: Any, **kw: Any) -> Any:
        return self._make(zfabric.Scatterer, zfabric.AsyncScatterer, *a, **kw)

    def replier(self, endpoint: str, handler: Callable[[Envelope], Any], **kw: Any) -> Any:
        """A replier already serving (a thread for sync, a loop task for asyncio)."""
        if self.lt is None:
            obj = zfabric.Replier(endpoint, handler, **kw).start()
        else:
            obj = _AsyncService(self.lt.call(zfabric.AsyncReplier, endpoint, handler, **kw), self.lt)
        self._made.append(obj)
        return obj

    def close_all(self) -> None:
        for obj in reversed(self._made):
            try:
                obj.close(0)
            except Exception:  # a test may have closed it already, or killed its peer
                pass
        self._made.clear()
        if self.lt is not None:
            self.lt.close()
