"""Reading ahead and writing behind (utils.read_ahead, utils.WriteBehind): the same items in the
same order as reading in the caller's thread, errors where they happened, memory bounded."""
import threading
import time

import pytest
import torch

from maskrcnn.commands.detect import GPU_PICTURE_WRITERS, pipeline_threads
from maskrcnn.utils import WriteBehind, batches, read_ahead


def counting(n: int, produced: list, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"item {i} is unreadable")
        produced.append(i)
        yield i


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_read_ahead_gives_every_item_in_order(depth):
    assert list(read_ahead(counting(50, []), depth)) == list(range(50))
    assert list(read_ahead(iter([]), depth)) == []


@pytest.mark.parametrize("depth", [0, 2])
def test_read_ahead_raises_the_producers_error_after_the_items_before_it(depth):
    got = []
    with pytest.raises(ValueError, match="item 7 is unreadable"):
        for item in read_ahead(counting(20, [], fail_at=7), depth):
            got.append(item)
    assert got == list(range(7))


def test_read_ahead_stays_at_most_depth_ahead_and_stops_with_the_consumer():
    produced = []
    items = read_ahead(counting(1000, produced), 4)
    for k, item in enumerate(items):
        time.sleep(0.01)
        # the item handed out, the 4 queued and the one waiting to be queued
        assert len(produced) <= item + 1 + 4 + 1
        if k == 10:
            break
    items.close()  # the generator's finally stops and joins the thread
    assert not any(t.name == "read-ahead" for t in threading.enumerate())
    assert len(produced) <= 11 + 4 + 1


def test_write_behind_returns_results_in_order_with_bounded_pending_and_raises_errors():
    running, most = [0], [0]
    lock = threading.Lock()

    def square(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.001 * (i % 4))  # later calls often finish first
        with lock:
            running[0] -= 1
        return i * i

    results = []
    with WriteBehind(2, pending=3) as writer:
        for i in range(30):
            results += writer.submit(square, i)
            assert len(writer.futures) <= 3
        results += writer.finish()
    assert results == [i * i for i in range(30)] and most[0] <= 2

    def fail(i):
        if i == 4:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with WriteBehind(1) as writer:
            for i in range(10):
                writer.submit(fail, i)
    with WriteBehind(0) as writer:  # in the caller's thread, at once
        assert writer.submit(lambda: threading.current_thread().name) == [threading.current_thread().name]


def test_batches_and_detect_threads():
    assert list(batches(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert pipeline_threads(torch.device("cpu")) == (1, 1)
    assert pipeline_threads(None) == (1, 1)  # ONNX Runtime
    assert pipeline_threads(torch.device("cuda"), no_overlays=True) == (2, 1)
    ahead, writers = pipeline_threads(torch.device("cuda", 0))
    assert ahead == 2 and 1 <= writers <= GPU_PICTURE_WRITERS
