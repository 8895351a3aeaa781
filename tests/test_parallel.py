"""runner.parallel: the host threads every phase of a run uses (pure: no host)."""

import threading
import time

import pytest

from fleet import runner


def test_results_come_back_in_order_and_items_run_at_once():
    started = threading.Barrier(5, timeout=10)  # all five must be running at the same time

    def work(item):
        started.wait()
        time.sleep(0.01 * (5 - item))  # the first item finishes last
        return item * 10

    assert runner.parallel(list(range(5)), work) == [0, 10, 20, 30, 40]


def test_an_error_reaches_the_caller_and_the_next_phase_still_gets_its_threads():
    release = threading.Event()

    def first_phase(item):
        if item == 0:
            raise ValueError("host h0 broke")
        release.wait(10)  # the rest are still busy when the caller sees the error
        return item

    with pytest.raises(ValueError, match="host h0 broke"):
        runner.parallel([0, 1, 2], first_phase)
    # Two threads are still busy with the first phase: the next one gets threads of its own.
    together = threading.Barrier(3, timeout=10)
    try:
        assert runner.parallel(["a", "b", "c"], lambda item: (together.wait(), item)[1]) == ["a", "b", "c"]
    finally:
        release.set()


def test_threads_are_reused_from_phase_to_phase():
    runner.parallel(list(range(4)), lambda _: None)
    before = runner._host_threads.count
    for _ in range(5):
        assert runner.parallel(list(range(4)), lambda item: item) == [0, 1, 2, 3]
    assert runner._host_threads.count == before  # a thread is free again before its result is out


def test_no_items_is_no_work():
    assert runner.parallel([], lambda item: 1 / 0) == []
