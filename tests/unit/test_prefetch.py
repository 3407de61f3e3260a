import threading
import time

import pytest

from beit_data.prefetch import batched, prefetch


def test_prefetch_keeps_order_and_raises_where_it_failed():
    def items():
        yield from range(5)
        raise ValueError("bad item 5")

    got = []
    with pytest.raises(ValueError, match="bad item 5"):
        for x in prefetch(items(), depth=2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]


def test_closing_early_stops_every_loader_thread():
    def endless():
        i = 0
        while True:
            i += 1
            yield i

    before = threading.active_count()
    gen = prefetch(prefetch(endless(), depth=2), depth=2)
    assert [next(gen) for _ in range(3)] == [1, 2, 3]
    gen.close()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_closing_early_after_the_producer_finished_stops_its_thread():
    """The producer is done and the queue full: handing over its end marker must not outlive the consumer."""
    before = set(threading.enumerate())  # another test's loader thread may still be ending
    gen = prefetch(iter(range(2)), depth=1)
    assert next(gen) == 0
    (producer,) = [t for t in threading.enumerate() if t not in before and t.name == "beit-data-prefetch"]
    time.sleep(0.3)  # the producer has queued item 1 and now waits to hand over its end marker
    gen.close()  # joins the thread (for up to 60 s)
    assert not producer.is_alive()


def test_batched():
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
