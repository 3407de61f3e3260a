"""Run a producer in a background thread so that loading overlaps the model's work."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


def batched(items: Iterable[T], size: int, *, cost: Callable[[T], int] | None = None,
            budget: int | None = None) -> Iterator[list[T]]:
    """Lists of ``size`` items (the last may hold fewer). With ``cost`` and ``budget``, a list
    also ends before an item that would take its total cost past ``budget``: an item that costs
    more than ``budget`` on its own still goes, alone (its caller refuses those beforehand)."""
    batch: list[T] = []
    total = 0
    for item in items:
        weight = cost(item) if cost is not None and budget is not None else 0
        if batch and weight and total + weight > budget:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += weight
        if len(batch) == size:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` while a daemon thread computes up to ``depth`` of them ahead.

    An exception in the producer is re-raised in the consumer, at the item where it happened.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        """Hand ``entry`` to the consumer; False once the consumer has gone."""
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # handed to the consumer
            put((_DONE, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # stops an upstream prefetch too

    thread = threading.Thread(target=produce, daemon=True, name="beit-data-prefetch")
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        # Join, so that no loader thread (and no DALI pipeline in it) outlives the consumer.
        thread.join(timeout=60)
