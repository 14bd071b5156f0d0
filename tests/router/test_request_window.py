"""The router's sliding request window and its in-flight load, as published to etcd (for the
planner, and for the other router replicas)."""

from router.inflight import Inflight, inflight_to_pb, sum_peers
from router.request_window import RequestWindow, percentile
from runtime.pb import tandem_control_pb2 as cpb


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


def test_window_stats_go_to_etcd_as_a_message_with_unset_fields_where_no_value() -> None:
    w = RequestWindow(window_s=10.0)
    empty = w.snapshot(now=0.0).to_pb("r0")
    assert empty.router_id == "r0" and empty.window_s == 10.0 and not empty.HasField("ttft_ms_p50")
    for t in range(20):
        w.arrived(100 + t, now=float(t) / 4, requested=16 if t < 19 else 0)  # the last asked for no max_tokens
        w.finished(100 + t, 10, 0.1 + t / 100, 1.0, now=float(t) / 4, requested=16 if t < 19 else 0)
    msg = cpb.RouterWindowStats.FromString(w.snapshot(now=5.0).to_pb("r0").SerializeToString())
    assert (msg.num_arrivals, msg.num_finished, msg.num_inflight) == (20, 20, 0)
    assert msg.isl_p50 == 109.0 and msg.isl_p95 == 118.0 and msg.osl_mean == 10.0
    assert abs(msg.ttft_ms_p95 - 280.0) < 1e-6 and msg.HasField("itl_ms_p99")
    assert msg.published_at_unix_ms > 0
    # the totals since start outlive the window: a reader differences them for its own interval
    later = w.snapshot(now=100.0).to_pb("r0")
    assert (later.num_arrivals, later.num_arrivals_total, later.num_finished_total) == (0, 20, 20)
    # prompt tokens (counted at arrival: 100..119) and answer tokens: the window's lengths for the planner
    assert (later.num_prompt_tokens_total, later.num_output_tokens_total) == (2190, 200)
    # answer tokens asked for (max_tokens x n), at arrival and of the finished: the planner's early OSL
    assert (later.num_requested_tokens_total, later.num_finished_requested_tokens_total) == (304, 304)


def test_inflight_is_shared_as_a_message() -> None:
    mine = {"decode": {"d0": Inflight(2, 30, 500), "d1": Inflight()}, "prefill": {"p0": Inflight(1, 300, 300)}}
    wire = cpb.RouterInflight.FromString(inflight_to_pb("r0", mine).SerializeToString())
    assert set(wire.tiers["decode"].workers) == {"d0"}  # idle workers are left out
    other = inflight_to_pb("r1", {"decode": {"d0": Inflight(1, 0, 100)}})
    peers = sum_peers({"r0": wire, "r1": other}, own_id="r2")
    assert peers == {"decode": {"d0": Inflight(3, 30, 600)}, "prefill": {"p0": Inflight(1, 300, 300)}}
    assert sum_peers({"r0": wire}, own_id="r0") == {}  # a router does not count itself
