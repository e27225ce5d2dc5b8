"""fused_moe.bench: timing rounds (implementations take turns, each keeps its
best median), the CPU mode's three implementations and their check, and the
record writer."""

import itertools
import json

import pytest
import torch

import fused_moe
from fused_moe import bench


def test_rounds_alternate_and_keep_the_best(monkeypatch):
    calls = []
    readings = itertools.count(100, -7)  # every median lower than the one before

    def fake_median(step, reps):
        step()
        return float(next(readings))

    def make(name):
        def impl(*args):
            calls.append(name)
            return bench.loop_experts(*args)
        return impl

    monkeypatch.setattr(bench, "_median_cpu_us", fake_median)
    monkeypatch.setattr(bench, "_FUNCTIONS", {"fused_moe": make("fused_moe"), "loop": make("loop")})
    rows = bench.run_point("tiny", (4, 2, 32, 24), 3, impls=("fused_moe", "loop"), device="cpu", rounds=3)
    # Two preparing calls each (warm-up, output), then the rounds in turns.
    assert calls == ["fused_moe"] * 2 + ["loop"] * 2 + ["fused_moe", "loop"] * 3
    us = {r["impl"]: r["us"] for r in rows}
    assert us == {"fused_moe": 100 - 7 * 4, "loop": 100 - 7 * 5}  # the last round's, the lowest
    assert all(r["ok"] for r in rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_point_times_and_checks_every_implementation(dtype):
    rows = bench.run_point("tiny", (4, 2, 32, 24), 5, device="cpu", dtype=dtype)
    assert [r["impl"] for r in rows] == list(bench.IMPLS)
    for r in rows:
        assert r["us"] > 0 and r["dtype"] == bench._dtype_name(dtype) and r["device"] == "cpu"
        assert r["ok"] and r["rel_diff"] <= bench.CHECK_RTOL[dtype]
    fused, peers = rows[0], rows[1:]
    fastest = min(peers, key=lambda r: r["us"])
    assert fused["best_peer"] == fastest["impl"]
    assert fused["vs_best_peer"] == pytest.approx(fastest["us"] / fused["us"])
    assert all(r["best_peer"] is None and r["vs_best_peer"] is None for r in peers)
    summary = bench.format_summary(rows)
    assert summary.startswith(f"tiny M=5 {fused['dtype']}: fused_moe ")
    assert all(f"{impl} " in summary for impl in bench.IMPLS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_peers_agree_with_fused_experts(dtype):
    """The two torch peers on the CPU (torch._grouped_mm, as transformers'
    grouped_mm experts run it, and the per-expert loop) compute fused_experts."""
    args = bench.make_inputs(8, 3, 64, 40, 37, "cpu", dtype, seed=1)
    expected = fused_moe.fused_experts(*args)
    for peer in (bench.grouped_mm_experts, bench.loop_experts):
        out = peer(*args)
        assert out.dtype == dtype and out.shape == expected.shape
        assert bench._rel_diff(out, expected) <= bench.CHECK_RTOL[dtype], peer.__name__


def test_a_wrong_implementation_is_reported(monkeypatch, capsys):
    def wrong(*args):
        return bench.loop_experts(*args) * 1.1

    monkeypatch.setattr(bench, "_FUNCTIONS", {**bench._FUNCTIONS, "grouped_mm": wrong})
    rows = bench.run_point("tiny", (4, 2, 32, 24), 3, device="cpu")
    assert [r["ok"] for r in rows] == [True, False, True]
    assert "WRONG: grouped_mm differs from the per-expert loop at tiny M=3 fp32" in \
        capsys.readouterr().err


def test_write_json_adds_the_environment(tmp_path):
    path = tmp_path / "record.json"
    bench.write_json(path, device="cpu", command="a command", results=[{"us": 1.0}])
    record = json.loads(path.read_text())
    assert record["card"].startswith("cpu") and record["date"] and record["torch"]
    assert {"cuda", "cpu_threads", "commit"} <= set(record)
    assert record["command"] == "a command" and record["results"] == [{"us": 1.0}]


def test_padded_weight_rows_are_views_and_still_checked():
    x, w13, w2, _, _ = bench.make_inputs(4, 2, 32, 24, 3, "cpu", torch.float32, row_pad=5)
    assert w13.stride(1) == 32 + 5 and w2.stride(1) == 24 + 5
    rows = bench.run_point("tiny", (4, 2, 32, 24), 3, impls=("fused_moe", "loop"), device="cpu",
                           row_pad=5)
    assert all(r["ok"] and r["row_pad"] == 5 for r in rows)


def test_targets_are_perf_md_tables():
    assert set(bench.TARGETS_US["bf16"]) == set(bench.TARGETS_US["fp8"]) == set(bench.MODELS)
    assert all(len(t) == len(bench.TOKENS) for table in bench.TARGETS_US.values() for t in table.values())
    assert bench.target_us("deepseek-v3", 32) == 3484
    assert bench.target_us("deepseek-v3", 32, "fp8-block") == 1771
    assert bench.target_us("gpt-oss-120b", 8192, "fp8-tensor") == 1480
    assert bench.target_us("deepseek-v3", 33) is None and bench.target_us("custom", 1) is None


def test_targets_met_counts_fused_moe_rows():
    def row(M, us, impl="fused_moe"):
        return dict(shape="qwen3-30b-a3b", M=M, impl=impl, us=us, dtype="bf16", device="cuda",
                    quant="fp8-block")
    rows = [row(1, 14.0), row(1, 99.0, "grouped_mm"), row(8, 70.0), row(32, None)]
    bench._add_targets(rows)
    assert [r["meets_target"] for r in rows] == [True, None, False, False]
    text = bench.format_targets(rows)
    assert text.splitlines()[0] == "targets met: 1 of 3 (fp8-block; PERF.md's H200 targets)"
    assert "qwen3-30b-a3b M=8: 70 us > 68 us" in text and "M=32: n/a > 150 us" in text
    assert bench.format_targets([dict(row(1, 14.0), device="cpu", target_us=None)]) == ""
