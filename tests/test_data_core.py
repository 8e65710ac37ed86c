"""The ordered, record-skipping map and the prefetcher of clipjax.data.core: order, skips, caps, executors,
shutdown."""

import concurrent.futures as cf
import itertools
import logging
import pickle
import threading
import time

import pytest

from clipjax.data import core


class Square:
    """A picklable record function: item → item², items ≡ 3 (mod 7) are bad. Sleeps a little, longer for small
    items, so that results finish out of order."""

    def __init__(self, calls=None):
        self.calls = calls

    def __call__(self, item):
        if self.calls is not None:
            self.calls.append(item)
        time.sleep(0.002 * ((item * 7919) % 5))
        if item % 7 == 3:
            raise core.BadRecord(f"item {item}: divisible the wrong way")
        return item * item


def _threads_alive(prefix):
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def _run(fn, items, **kw):
    with core.OrderedMap(fn, items, **{"executor": core.threads(2, "test-map"), "window": 8, **kw}) as m:
        return list(m), m.skipped


def test_order_kept_and_bad_records_skipped_and_counted():
    out, skipped = _run(Square(), range(60))
    good = [i for i in range(60) if i % 7 != 3]
    assert out == [(i, i * i) for i in good]
    assert skipped == 60 - len(good) == 9


@pytest.mark.parametrize("window", [1, 3, 64])
def test_results_do_not_depend_on_threads_or_window(window):
    one, s1 = _run(Square(), range(40), executor=core.threads(1, "test-map"), window=window)
    four, s4 = _run(Square(), range(40), executor=core.threads(4, "test-map"), window=window)
    assert one == four and s1 == s4 == 6


def test_skips_are_logged_first_few_with_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="clipjax.data.core"):
        _, skipped = _run(Square(), range(60), log_first=3, skipped=100)
    lines = [r.getMessage() for r in caplog.records]
    assert skipped == 109  # counted on from the resumed count
    assert lines == ["skipping item 3: divisible the wrong way", "skipping item 10: divisible the wrong way",
                     "skipping item 17: divisible the wrong way (further skips are counted, not logged)"]


def test_consecutive_failure_cap_raises_with_the_last_reason():
    def fn(item):
        if 10 <= item < 20:
            raise core.BadRecord(f"record {item} of 'spec': broken")
        return item

    with pytest.raises(core.TooManyBadRecords, match=r"10 consecutive bad records; last: record 19 of 'spec'"):
        _run(fn, range(30), max_consecutive_bad=10)
    out, skipped = _run(fn, range(30), max_consecutive_bad=11)
    assert [i for i, _ in out] == list(range(10)) + list(range(20, 30)) and skipped == 10
    assert not _threads_alive("test-map")


def test_other_exceptions_are_errors_not_skips():
    def fn(item):
        if item == 5:
            raise KeyError("a bug")
        return item

    m = core.OrderedMap(fn, range(10), executor=core.threads(2, "test-map"), window=4)
    assert [next(m)[0] for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(KeyError, match="a bug"):
        next(m)
    assert m.skipped == 0 and not _threads_alive("test-map")
    with pytest.raises(StopIteration):  # closed by the error
        next(m)


def test_infinite_items_bounded_window_and_close_stops_threads():
    calls = []
    m = core.OrderedMap(Square(calls), itertools.count(), executor=core.threads(3, "test-map"), window=5)
    got = [next(m) for _ in range(10)]
    assert [i for i, _ in got] == [0, 1, 2, 4, 5, 6, 7, 8, 9, 11]
    assert len(calls) <= 12 + 5  # never more than the window past what was consumed
    assert _threads_alive("test-map")
    m.close()
    assert not _threads_alive("test-map")
    m.close()  # idempotent


class PickledThreads:
    """An executor that passes the function, items, results and errors through pickle, as worker processes do
    (the function pickled once, like a process pool's initializer argument)."""

    def __init__(self, fn, num_threads=2):
        self._blob = pickle.dumps(fn)
        self._local = threading.local()
        self._pool = cf.ThreadPoolExecutor(num_threads, thread_name_prefix="test-pickled")

    def _call(self, blob):
        if not hasattr(self._local, "fn"):
            self._local.fn = pickle.loads(self._blob)
        try:
            return pickle.dumps(self._local.fn(pickle.loads(blob)))
        except Exception as e:
            raise pickle.loads(pickle.dumps(e)) from None

    def submit(self, item):
        inner = self._pool.submit(self._call, pickle.dumps(item))
        outer = cf.Future()

        def done(f):
            if f.cancelled():
                outer.cancel()
            elif f.exception() is not None:
                outer.set_exception(f.exception())
            else:
                outer.set_result(pickle.loads(f.result()))

        inner.add_done_callback(done)
        return outer

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


def test_a_pickling_executor_plugs_in_with_the_same_results():
    threaded, s1 = _run(Square(), range(40))
    pickled, s2 = _run(Square(), range(40), executor=PickledThreads)
    assert threaded == pickled and s1 == s2 == 6 and not _threads_alive("test-pickled")


def test_prefetcher_runs_ahead_forwards_errors_and_closes():
    produced = []

    def numbers():
        for i in range(100):
            produced.append(i)
            yield i

    p = core.Prefetcher(numbers, depth=3, name="test-prefetch")
    assert [next(p) for _ in range(4)] == [0, 1, 2, 3]
    time.sleep(0.05)
    assert len(produced) <= 4 + 3 + 1  # bounded: depth queued, one being put
    p.close()
    assert not _threads_alive("test-prefetch")
    assert list(core.Prefetcher(lambda: iter(range(5)), depth=2)) == [0, 1, 2, 3, 4]

    def failing():
        yield 1
        raise core.TooManyBadRecords("broken data")

    p = core.Prefetcher(failing, depth=2, name="test-prefetch")
    assert next(p) == 1
    with pytest.raises(core.TooManyBadRecords, match="broken data"):
        next(p)
    assert not _threads_alive("test-prefetch")


def test_prefetcher_close_closes_the_map_inside():
    def batches():
        with core.OrderedMap(Square(), itertools.count(), executor=core.threads(2, "test-map"), window=4) as m:
            while True:
                yield [next(m)[1] for _ in range(3)]

    p = core.Prefetcher(batches, depth=2, name="test-prefetch")
    assert next(p) == [0, 1, 4] and next(p) == [16, 25, 36]
    p.close()
    assert not _threads_alive("test-prefetch") and not _threads_alive("test-map")


def test_worker_processes_plug_in_with_the_same_results():
    threaded, s1 = _run(Square(), range(40))
    processes, s2 = _run(Square(), range(40), executor=core.processes(2, 2))
    assert threaded == processes and s1 == s2 == 6
    assert core.make_executor(0, 3).keywords == {"num_threads": 3, "name": "clipjax-data"}
    assert core.make_executor(2, 3).keywords["num_workers"] == 2
    with pytest.raises(ValueError, match="workers must be >= 0"):
        core.make_executor(-1, 2)
