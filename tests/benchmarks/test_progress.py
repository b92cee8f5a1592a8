"""Progress lines: elapsed time, ETA from the previous run, a heartbeat at least every 10 s."""

from __future__ import annotations

import io
import time

from benchmarks._progress import Progress, fmt_duration


def test_eta_from_expected_durations() -> None:
    p = Progress(["a", "b", "c"], expected={"a": 30.0, "b": 60.0, "c": 5.0}, heartbeat=0)
    p.begin("a")
    assert p.eta() in ("1m35s", "1m34s")  # a's 30 s (just begun) + 60 + 5
    p.begin("b")
    p.begin("c")
    assert p.eta() in ("5s", "4s")
    q = Progress(["a", "new"], expected={"a": 30.0}, heartbeat=0)
    q.begin("a")
    assert q.eta().endswith("+?")  # a suite never run before is unknown
    q.begin("new")
    assert q.eta() == "?"
    assert fmt_duration(125) == "2m05s" and fmt_duration(9.6) == "10s"


def test_heartbeat_repeats_the_last_message() -> None:
    out = io.StringIO()
    p = Progress(["a"], heartbeat=0.05, stream=out)
    try:
        p.begin("a")
        p("timing case 1")
        time.sleep(0.3)
    finally:
        p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[a 1/1 | 0s elapsed | ETA ?] starting a")
    beats = [line for line in lines if "timing case 1 ... still running" in line]
    assert len(beats) >= 2
    assert p.max_load is not None and p.max_load >= 0
    n = len(out.getvalue())
    time.sleep(0.15)
    assert len(out.getvalue()) == n  # closed: no more lines


def test_no_heartbeat_thread_inside_a_single_threaded_suite() -> None:
    # gradlab's auto runs no forward mode while another Python thread is alive: a suite that
    # measures it (derivatives) runs with the heartbeat paused, then the heartbeat resumes
    from gradlab._derivatives._registry import only_thread

    out = io.StringIO()
    p = Progress(["a"], heartbeat=0.05, stream=out)
    try:
        p.begin("a")
        assert not only_thread()
        with p.without_heartbeat():
            assert only_thread()
            p("inside")  # progress lines still print
            time.sleep(0.15)
            during = out.getvalue()
        assert not only_thread()
        p("after")
        time.sleep(0.2)
    finally:
        p.close()
    assert "] inside" in during and "inside ... still running" not in during
    assert "after ... still running" in out.getvalue()
