"""Overlap a run's reading and writing with the model: frames decoded ahead on one thread, outputs written
behind on another.

Per video frame the host decodes the frame, then encodes a mask PNG and an overlay frame into the output video:
a few milliseconds that a GPU frame (~2 ms) would otherwise wait for in series. OpenCV's decoders and encoders
and numpy release the GIL, so threads overlap them with the model. Both stages keep order and are bounded
(``depth`` frames ahead, ``backlog`` frames behind), so memory stays flat however long the video, and both
hand errors back to the main thread in order: a frame that cannot be read or written fails the run there,
as it did without them.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_END = object()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetch(Generic[T]):
    """Iterates ``source`` on a background thread, at most ``depth`` items ahead of the consumer. An exception
    the source raises is re-raised by ``next`` where its item would have come. ``close`` stops the thread
    (call it before closing what the source reads from); a context manager does."""

    def __init__(self, source: Iterable[T], depth: int = 4) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, args=(iter(source),), name="imedsam-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, it: Iterator[T]) -> None:
        try:
            for item in it:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, in order
            self._put(_Raised(e))

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.error
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        self._stop.set()
        self._done = True
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OrderedWriter:
    """Runs submitted calls one at a time, in submission order, on a background thread, with at most ``backlog``
    not yet finished (``submit`` then waits for the oldest). The first error is re-raised by the next
    ``submit`` or by ``drain``; ``close`` drops what has not started and waits for the call running, so nothing
    writes after it returns (the CLI then discards its staging folder). A context manager closes."""

    def __init__(self, backlog: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imedsam-writer")
        self._pending: deque[Future[Any]] = deque()
        self._backlog = max(1, backlog)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while self._pending and (len(self._pending) >= self._backlog or self._pending[0].done()):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for everything submitted; re-raises the first error."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> OrderedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _call(fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)


@contextmanager
def overlapped(source: Iterable[T], on: bool = True, depth: int = 4,
               backlog: int = 4) -> Iterator[tuple[Iterable[T], Callable[..., None]]]:
    """``(frames, write)``: with ``on``, ``source`` read ahead (``Prefetch``) and each ``write(fn, *args)`` run
    behind (``OrderedWriter``); otherwise the source as it is and writes in line. Leaving the block normally
    waits for every write (and re-raises the first error); leaving it in any way stops both threads first, so
    the caller can close or discard what they read from and write to."""
    if not on:
        yield source, _call
        return
    pre, writer = Prefetch(source, depth), OrderedWriter(backlog)
    try:
        yield pre, writer.submit
        writer.drain()
    finally:
        writer.close()
        pre.close()
