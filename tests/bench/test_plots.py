"""The GPU scripts' figures drawn on the CPU: a JSON of ``bench/gpu.py``'s and of
``bench/gpu_kernels.py``'s shape (built with the scripts' own row helpers, round-tripped through
JSON as ``--json`` writes it) goes through ``python bench/plots.py FILE``, which writes every
figure the scripts write beside their ``--json``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from bench import plots

REPO = Path(__file__).resolve().parents[2]


def _png_ok(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200, (path, image.shape)
    assert image.std() > 0.01, f"{path} is blank"


def gpu_result() -> dict:
    from bench import gpu
    bw = 4.0e12
    decode = [gpu.decode_row(b, ctx, 5.0 + b * ctx / 1e5, 4.5 + b * ctx / 1e5, 0.3, 16_000_000_000 + b * ctx * 131072,
                             bw) for b in (1, 64) for ctx in (512, 4096)]
    return {"device": "NVIDIA H200", "torch": "2.x", "hbm_copy_bytes_per_s": bw, "bf16_matmul_flops": 7e14,
            "decode": decode, "prefill": {"tokens": 4096, "ms": 80.0, "flops": 6e13, "matmul_fraction": 0.6},
            "generate_modes": {"async": {1: 150.0, 64: 6000.0}, "sync": {1: 120.0, 64: 5000.0}},
            "generate": [gpu.generate_row(1, 150.0, 40.0), gpu.generate_row(64, 6000.0, 900.0)]}


def kernels_result() -> dict:
    from bench import gpu_kernels as gk
    decode = gk.section("decode kernel (BLOCK_N, warps, stages)", "fraction of copy bandwidth", "TB/s",
                        [(64, 4, 3), (128, 4, 3), (256, 8, 2)])
    gk.add_row(decode, "b=1 ctx=4096 splits=16", [2.1, 3.0, None], gk._over([2.1, 3.0, None], 4.0))
    gk.add_row(decode, "b=256 ctx=512 splits=1", [3.5, 3.2, 2.0], gk._over([3.5, 3.2, 2.0], 4.0))
    prefill = gk.section("prefill kernel", "fraction of the matmul rate", "TFLOP/s", [(128, 64, 8, 3), (64, 64, 4, 3)])
    gk.add_row(prefill, "ctx=0 new=4096", [400.0, 300.0], gk._over([400.0, 300.0], 700.0))
    return {"device": "NVIDIA H200", "copy_tb_s": 4.0, "matmul_tflop_s": 700.0,
            "sections": {"decode": decode, "prefill": prefill}}


@pytest.mark.parametrize("name, result, figures", [
    ("gpu", gpu_result, ("gpu_decode.png", "gpu_generate.png")),
    ("kernels", kernels_result, ("kernels_decode.png", "kernels_prefill.png")),
])
def test_plots_from_a_gpu_scripts_json(tmp_path: Path, name: str, result, figures: tuple[str, ...]) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(result()))  # as the script writes it: int keys become strings
    cli = subprocess.run([sys.executable, str(REPO / "bench" / "plots.py"), str(path)], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    written = sorted(Path(line).name for line in cli.stdout.split())
    assert written == sorted(figures), cli.stdout
    for figure in figures:
        _png_ok(tmp_path / figure)


def test_a_skipped_reference_and_a_decode_only_run_still_plot(tmp_path: Path) -> None:
    """``--skip-hf`` (no transformers numbers) and ``--decode-only`` (decode rows only)."""
    result = json.loads(json.dumps(gpu_result()))
    for row in result["generate"]:
        row["transformers_tok_s"] = None
    assert len(plots.figures(result, tmp_path / "skip_hf")) == 2
    decode_only = {k: result[k] for k in ("device", "hbm_copy_bytes_per_s", "bf16_matmul_flops", "decode")}
    assert [p.name for p in plots.figures(decode_only, tmp_path / "d")] == ["d_decode.png"]


def test_handoff_trace_writes_its_report_and_figure(tmp_path: Path) -> None:
    """``bench/handoff_trace.py TRACE --json OUT`` (as a script) on a trace of three handed-off
    requests: the report's segments are the events' differences, and OUT's .png is drawn (also
    by ``bench/plots.py OUT``)."""
    trace = tmp_path / "trace"
    trace.mkdir()
    order = ["r.plan", "r.prefill_ans", "r.first_yield", "p.ans", "p.pushkv", "p.pushed", "d.landed", "d.ready",
             "d.launch1", "d.out1", "d.msg1", "r.msg1", "r.second_yield"]
    lines = []
    for i in range(3):
        t = 1_000_000_000 * (i + 1)
        for ev in order:
            t += 1_000_000 * (2 if ev == "p.pushed" else 1)  # 1 ms between events, 2 ms for the push
            lines.append(json.dumps({"rid": f"r{i}", "ev": ev, "t": t}))
    (trace / "all.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "handoff.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "handoff_trace.py"), str(trace), "--json", str(out)],
                   check=True, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    report = json.loads(out.read_text())["all"]
    assert report["num_requests"] == 3
    assert report["push at P"]["p50"] == pytest.approx(2.0)
    assert report["landed -> engine has it"]["p50"] == pytest.approx(1.0)
    _png_ok(out.with_suffix(".png"))
    out.with_suffix(".png").unlink()
    assert plots.figures(json.loads(out.read_text()), tmp_path / "handoff") == [out.with_suffix(".png")]
    _png_ok(out.with_suffix(".png"))


def test_engine_cpu_time_json_is_drawn(tmp_path: Path) -> None:
    """A JSON of ``bench/engine_cpu_time.py --json``'s shape through ``bench/plots.py FILE``."""
    rows = [{"workload": w, "tokens": t, "tandem_cpu_s": c, "tandem_wall_s": c * 1.2, "transformers_cpu_s": 2 * c,
             "transformers_wall_s": 2.4 * c} for w, t, c in (("prefill 1024", 1024, 0.9), ("decode batch 1", 64, 3.4))]
    path = tmp_path / "ect.json"
    path.write_text(json.dumps({"args": {}, "load_average": 1.0, "engine_cpu_time": rows}))
    subprocess.run([sys.executable, str(REPO / "bench" / "plots.py"), str(path)], check=True, timeout=120)
    _png_ok(path.with_suffix(".png"))


def test_start_abort_json_is_drawn(tmp_path: Path) -> None:
    """A JSON of ``bench/start_abort.py --json``'s shape (two starts that died, one of them with
    the epoll abort) through ``bench/plots.py FILE``."""
    starts = [{"index": i, "outcome": "ok", "code": 0, "ready_s": 2.0 + i / 10, "exit_s": 0.27} for i in range(8)]
    starts[3] = {"index": 3, "outcome": "abort", "code": -6, "tail": ["epoll_wait error: Bad file descriptor"]}
    starts[5] = {"index": 5, "outcome": "died", "code": -11, "tail": []}
    summary = {"transport": "tcp", "spawner_grpc": "busy", "starts": 8, "ok": 6, "abort": 1, "died": 1}
    path = tmp_path / "starts.json"
    path.write_text(json.dumps({"summary": summary, "starts": starts}))
    subprocess.run([sys.executable, str(REPO / "bench" / "plots.py"), str(path)], check=True, timeout=120)
    _png_ok(path.with_suffix(".png"))
