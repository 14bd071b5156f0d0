"""The router's sliding request window (published to etcd for the planner)."""

from router.request_window import RequestWindow, percentile


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 90) == 90.0
    assert percentile(values, 99) == 99.0


def test_window_counts_latencies_and_forgets_old_requests() -> None:
    w = RequestWindow(window_s=10.0)
    for t in (0.0, 1.0, 2.0):
        w.arrived(now=t)
    assert w.num_inflight == 3
    # isl 100, 11 tokens: ttft 0.2 s, e2e 1.2 s -> itl (1.2 - 0.2) / 10 = 100 ms
    w.finished(100, 11, 0.2, 1.2, now=3.0)
    w.finished(50, 1, 0.4, 0.4, now=4.0)  # one token: no inter-token latency
    w.finished(70, 5, None, 0.1, now=4.5)  # failed before its first token
    snap = w.snapshot(now=5.0)
    assert (snap.num_arrivals, snap.num_finished, snap.num_inflight) == (3, 2, 0)
    assert snap.request_rate == 0.3
    assert snap.isl_mean == 75.0 and snap.osl_mean == 6.0
    assert snap.ttft_ms_p50 == 200.0 and snap.ttft_ms_p99 == 400.0
    assert abs(snap.itl_ms_p50 - 100.0) < 1e-9
    later = w.snapshot(now=13.5)  # arrivals at 0..2 and the finish at 3.0 have left the window
    assert (later.num_arrivals, later.num_finished) == (0, 1)
    assert later.ttft_ms_p50 == 400.0 and later.itl_ms_p50 is None
