"""Work ahead on a thread of its own, through a bounded queue (issue 21 §1: generation never waits).

A build is a chain of such stages: the source's identities are read and cut into batches on one thread, the
transform generates on another (and may run its own stages inside, as arc2face plans the next call on one), and the
writer takes the results on the calling thread. Each stage runs as far ahead as its queue allows, and no further:
memory stays bounded, and a slow stage holds the others back instead of piling work up.

:func:`run_ahead` is that stage. Its thread iterates the items and keeps up to ``depth`` of them ready; an exception
raised while making one is raised to the consumer in its place; closing the stage (a failure downstream, Ctrl-C)
stops the thread after the item it is making, closes the items' iterator on that thread (so a generator's
``finally`` stops its own stages) and joins it. Work that takes long per item (a diffusion loop) calls
:func:`stop_if_closed` between its steps, so that a closed stage stops within a step: Ctrl-C and SIGTERM do not wait
for a whole micro-batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()  # the items are exhausted
# how soon a producer blocked on a full queue sees that the stage was closed, and a consumer waiting on an empty one
# handles a signal (Python runs handlers on the main thread, but the kernel may deliver a signal to any thread)
POLL_SECONDS = 0.1


_stage = threading.local()  # the stop event of the stage whose thread this is (none on other threads)


class Closed(BaseException):
    """Raised on a stage's thread once the stage is closed (a BaseException: no ``except Exception`` keeps the
    stopped work going); it never reaches the consumer, who closed the stage."""


def stop_if_closed() -> None:
    """Raise :class:`Closed` if this thread makes a stage's items and the stage was closed; else nothing."""
    stop = getattr(_stage, "stop", None)
    if stop is not None and stop.is_set():
        raise Closed


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Ahead(Generic[T], Iterator[T]):
    """The items of ``items``, made on the thread ``name`` up to ``depth`` ahead of the consumer (see the module
    docstring). Use it as a context manager, or call :meth:`close`: the thread starts at once."""

    def __init__(self, items: Iterable[T], depth: int, name: str):
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = False
        # a daemon: a second Ctrl-C while the first one waits for the item in progress must not hang the exit
        self._thread = threading.Thread(target=self._make, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _make(self, items: Iterable[T]) -> None:
        _stage.stop = self._stop
        iterator = None
        try:
            iterator = iter(items)
            for item in iterator:
                # closed while the item was put (close() empties the queue): the next one is not made
                if not self._put(item) or self._stop.is_set():
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, raised there in the item's place
            self._put(_Failed(exc))
        finally:
            close = getattr(iterator, "close", None) if iterator is not None else None
            if close is not None:
                close()  # a generator's cleanup (its own stages) runs here, on the thread that ran it

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Ahead[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        while True:
            try:  # in turns: a signal that another thread received is handled (Ctrl-C raised) here, within a turn
                item = self._queue.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                stop_if_closed()  # this consumer is itself a stage's thread, closed meanwhile
        if item is _END or isinstance(item, _Failed):
            self._done = True
            self._thread.join()
            if item is _END:
                raise StopIteration
            raise item.error
        return item

    def close(self) -> None:
        """Stop the thread once the item it is making is made, and wait for it."""
        self._done = True
        self._stop.set()
        while True:  # what was made ahead is dropped (and a producer blocked on the full queue is freed at once)
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> Ahead[T]:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def run_ahead(items: Iterable[T], depth: int, name: str) -> Ahead[T]:
    """``items``, made on a thread of their own up to ``depth`` ahead of the consumer, in order (module docstring)."""
    return Ahead(items, depth, name)
