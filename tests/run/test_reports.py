"""reports.Reports: jobs in submission order in one thread beside the caller; waiting, failures."""

from __future__ import annotations

import threading
import time

import pytest

from vlm_autoquant.run.reports import Reports


def test_jobs_run_in_order_in_one_thread_beside_the_caller():
    release, ran, threads = threading.Event(), [], set()

    def job(n):
        if n == 0:
            assert release.wait(10), "the caller was not left free while the first job ran"
        threads.add(threading.current_thread().name)
        ran.append(n)
        return n * 10

    reports = Reports()
    futures = [reports.submit(f"job{n}", job, n) for n in range(3)]
    assert ran == []  # the first job is still blocked: submit did not wait for it
    release.set()
    reports.wait()
    assert ran == [0, 1, 2] and [f.result() for f in futures] == [0, 10, 20]
    assert threads == {"scheme-reports"} and reports.failed() == []


def test_a_failing_job_is_reported_by_its_name_and_the_next_ones_still_run():
    ran = []

    def job(n):
        if n == 1:
            raise RuntimeError("injected")
        ran.append(n)

    reports = Reports()
    for n in range(3):
        reports.submit(f"job{n}", job, n)
    reports.wait()
    assert ran == [0, 2]
    [(about, exc)] = reports.failed()
    assert about == "job1" and isinstance(exc, RuntimeError) and str(exc) == "injected"


def test_leaving_the_block_on_an_exception_waits_for_every_job():
    done = []

    def slow():
        time.sleep(0.3)
        done.append(True)

    with pytest.raises(KeyboardInterrupt):
        with Reports() as reports:
            reports.submit("slow", slow)
            raise KeyboardInterrupt
    assert done == [True]


def test_waiting_is_idempotent_and_a_reports_object_takes_jobs_again_after_it():
    reports = Reports()
    reports.wait()  # nothing submitted
    out = []
    reports.submit("a", out.append, 1)
    reports.wait()
    reports.wait()
    reports.submit("b", out.append, 2)
    reports.wait()
    assert out == [1, 2]


def test_inline_jobs_run_in_the_callers_thread_and_an_interrupt_still_stops_it():
    from vlm_autoquant.core.errors import Interrupted

    reports, where = Reports(beside=False), []
    reports.submit("a", lambda: where.append(threading.current_thread()))
    assert where == [threading.current_thread()]  # ran before submit returned
    reports.submit("b", lambda: 1 / 0)  # an error is recorded, not raised
    with pytest.raises(Interrupted):
        reports.submit("c", _raise, Interrupted("SIGINT"))
    reports.wait()
    assert [(about, type(exc)) for about, exc in reports.failed()] == [
        ("b", ZeroDivisionError),
        ("c", Interrupted),
    ]


def _raise(exc):
    raise exc
