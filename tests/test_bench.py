"""fused_moe.bench: timing rounds (implementations take turns, each keeps its
best median), the CPU mode's three implementations and their check, the
record writer, targets, rows of implementations that do not run, and the FP8
schemes of --quant (weights, calibration, the torch._scaled_grouped_mm
pipeline's layout, and CPU runs end to end)."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_moe
from fused_moe import bench, quant
from fused_moe.__main__ import main as cli_main

TINY = (4, 2, 256, 128)  # H and I a multiple of 128: whole 128x128 blocks
TINY_ARGS = ["bench", "--shape", "4,2,256,128", "--tokens", "1,5"]


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


def test_quant_schemes():
    assert bench.quant_config("none") is None
    assert bench.quant_config("fp8-block") == quant.QuantConfig.fp8_block((128, 128))
    assert bench.quant_config(bench.ROWWISE_NAME) == bench.ROWWISE
    tensor = bench.quant_config("fp8-tensor")
    assert tensor.weight_scale == "tensor" and tensor.static_activations
    assert bench.QUANTS[0] == "none" and set(bench.QUANTS[1:]) <= set(quant._NAMED)


def test_impls_need_a_scheme_for_the_fp8_peers():
    bench.check_impls(bench.IMPLS)
    bench.check_impls(bench.QUANT_IMPLS, "fp8-block")
    with pytest.raises(ValueError, match="scaled_grouped_mm needs an FP8 scheme"):
        bench.check_impls(["fused_moe", "scaled_grouped_mm"])
    with pytest.raises(ValueError, match="unknown implementations"):
        bench.check_impls(["vllm"], "fp8-block")
    with pytest.raises(ValueError, match="unknown quant"):
        bench.check_impls(["fused_moe"], "int4")
    assert bench.default_impls() == bench.IMPLS
    assert bench.default_impls("fp8-block", cuda=True) == (
        "fused_moe", "fused_moe-bf16", "scaled_grouped_mm", "grouped_mm")
    assert bench.default_impls("fp8-block", cuda=False) == bench.QUANT_IMPLS_CPU


def test_static_scales_calibrate_x_and_the_activation():
    x, w13, w2, weights, ids = bench.make_inputs(*TINY, 9, "cpu", torch.bfloat16)
    a13, a2 = bench.static_activation_scales(x, w13, ids)
    assert a13.shape == a2.shape == (1,) and a13.dtype == a2.dtype == torch.float32
    assert a13.item() == pytest.approx(x.abs().max().item() / quant.FP8_MAX)
    act = torch.cat([bench._silu_and_mul(x[(ids == e).nonzero()[:, 0]] @ w13[e].T)
                     for e in range(4)])
    assert a2.item() == pytest.approx(act.abs().max().float().item() / quant.FP8_MAX, rel=1e-2)
    kwargs = bench.quantize_experts(x, w13, w2, ids, bench.quant_config("fp8-tensor")).kwargs
    assert torch.equal(kwargs["a13_scale"], a13) and kwargs["w13_scale"].shape == (4,)
    assert "a13_scale" not in bench.quantize_experts(x, w13, w2, ids, bench.ROWWISE).kwargs


def _emulated_scaled_grouped_mm(a, b, scale_a, scale_b, offs=None, out_dtype=None,
                                use_fast_accum=False):
    """torch._scaled_grouped_mm's 2D x 3D rowwise case on the CPU, with the
    checks its CUDA kernel makes of its arguments."""
    assert a.dtype == b.dtype == quant.FP8_DTYPE and out_dtype == torch.bfloat16
    assert a.is_contiguous() and b.stride(1) == 1  # a row-major, b [E, K, N] column-major
    assert scale_a.shape == (a.shape[0],) and scale_a.is_contiguous()
    assert scale_b.shape == (b.shape[0], b.shape[2]) and scale_b.stride(1) == 1
    assert offs.dtype == torch.int32 and a.shape[1] % 16 == 0 and b.shape[2] % 16 == 0
    rows = (a.float() * scale_a[:, None]).to(torch.bfloat16)
    weights = (b.float() * scale_b[:, None, :]).to(torch.bfloat16)
    return torch._grouped_mm(rows, weights, offs=offs)


def test_scaled_grouped_mm_pipeline_on_emulated_kernel(monkeypatch):
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _emulated_scaled_grouped_mm)
    args = bench.make_inputs(*TINY, 11, "cpu", torch.bfloat16, seed=2)
    x, w13, w2, weights, ids = args
    fp8 = bench._rowwise_experts(args, None, None)
    assert set(fp8.kwargs) == {"w13_scale", "w2_scale"} and fp8.kwargs["w2_scale"].shape == (4, 256)
    for fast in (False, True):
        out = bench.scaled_grouped_mm_experts(x, fp8.w13, fp8.w2, weights, ids,
                                              use_fast_accum=fast, **fp8.kwargs)
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
        assert bench._rel_diff(out, bench.loop_experts(*args)) <= bench.CHECK_RTOL_FP8
    rows = bench.run_point("tiny", TINY, 6, device="cpu", dtype=torch.bfloat16, quant="fp8-block",
                           impls=("fused_moe-bf16", "scaled_grouped_mm", "loop"))
    peer = rows[1]
    assert peer["weights"] == "fp8-channel" and peer["ok"]
    assert peer["variant"] in ("use_fast_accum=False", "use_fast_accum=True")


def test_an_implementation_that_does_not_run_gets_an_na_row(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel for this card. More text the row leaves out.")

    monkeypatch.setattr(bench, "_FUNCTIONS", {**bench._FUNCTIONS, "grouped_mm": broken})
    rows = bench.run_point("tiny", (4, 2, 32, 24), 3, device="cpu")
    na = rows[1]
    assert na["us"] is None and na["ok"] is None and na["error"] == "no kernel for this card"
    assert rows[0]["ok"] and rows[0]["best_peer"] == "loop" and rows[0]["speedup"] is None
    table = bench.format_table(rows)
    assert "n/a: grouped_mm: no kernel for this card" in table
    assert "grouped_mm n/a" in bench.format_summary(rows)


def test_floors():
    ceilings = bench.Ceilings(copy_gbps=4000, matmul_tflops=800, fp8_tflops=1600)
    assert bench.floor_us(1600e6, 1, ceilings) == pytest.approx(2.0)
    assert bench.floor_us(1600e6, 1, ceilings, fp8=True) == pytest.approx(1.0)
    assert bench.floor_us(1, 8e6, ceilings, fp8=True) == pytest.approx(2.0)
    assert bench.floor_us(1, 1, bench.Ceilings(4000, 800), fp8=True) is None
    assert bench.floor_us(1, 1, None) is None
    x, w13, w2, _, ids = bench.make_inputs(*TINY, 64, "cpu", torch.bfloat16)
    assert bench.bytes_moved(ids, w13, w2, x, 1) == (bench.bytes_moved(ids, w13, w2, x)
                                                      + 2 * x.numel() * 2) // 2
    assert "fp8 matmul 1600 TFLOP/s" in bench.describe_ceilings(ceilings)


@pytest.mark.parametrize("scheme", ["fp8-block", "fp8-channel", "fp8-tensor"])
def test_cpu_fp8_point(scheme):
    rows = bench.run_point("tiny", TINY, 5, impls=bench.QUANT_IMPLS_CPU, device="cpu",
                           dtype=torch.bfloat16, quant=scheme, rounds=2)
    assert [r["impl"] for r in rows] == list(bench.QUANT_IMPLS_CPU)
    assert [r["weights"] for r in rows] == [scheme, "bf16", "bf16"]
    for r in rows:
        assert r["us"] > 0 and r["ok"] and r["quant"] == scheme and r["error"] is None
    fp8 = rows[0]
    assert fp8["rel_diff"] <= bench.CHECK_RTOL_FP8 and fp8["vs_bf16"] == pytest.approx(
        rows[1]["us"] / fp8["us"])
    assert fp8["best_peer"] == "loop"  # fused_moe-bf16 is ours, not a peer
    assert bench.format_summary(rows).startswith(f"tiny M=5 bf16 {scheme}: fused_moe ")


def cli_quant_rows(tmp_path, monkeypatch, scheme, *flags):
    """The result rows of the CLI's --quant scheme run with --json, after
    checking the record names the scheme and the command line."""
    out = tmp_path / "bench.json"
    argv = [*TINY_ARGS, "--quant", scheme, *flags, "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["fused_moe", *argv])  # the record's command line
    assert cli_main(argv) == 0
    record = json.loads(out.read_text())
    assert record["quant"] == scheme and record["command"] == " ".join(["python -m fused_moe", *argv])
    return record["results"]


@pytest.mark.parametrize("scheme", ["fp8-block", "fp8-channel", "fp8-tensor"])
def test_cli_quant_writes_json(tmp_path, capsys, monkeypatch, scheme):
    rows = cli_quant_rows(tmp_path, monkeypatch, scheme, "--rounds", "2")
    assert [(r["M"], r["impl"]) for r in rows] == [
        (m, impl) for m in (1, 5) for impl in bench.QUANT_IMPLS_CPU]
    assert all(r["ok"] and r["us"] > 0 and r["dtype"] == "bf16" for r in rows)
    assert {"extra_mib", "weights", "variant", "vs_bf16", "target_us"} <= set(rows[0])
    printed = capsys.readouterr().out
    assert f"custom M=5 bf16 {scheme}: fused_moe " in printed and "over fused_moe-bf16" in printed


def test_cli_quant_flags_are_checked(capsys):
    for argv, message in (([*TINY_ARGS, "--quant", "int4"], "invalid choice: 'int4'"),
                          ([*TINY_ARGS, "--impl", "scaled_grouped_mm"], "needs an FP8 scheme")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def run_bench_moe(*argv):
    """benchmarks/bench_moe.py in a fresh interpreter that imports this fused_moe."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_moe.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(fused_moe.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True,
                          text=True, timeout=120)


def test_bench_moe_checks_its_flags():
    for argv, message in ((["--impls", "scaled_grouped_mm"], "needs an FP8 scheme"),
                          (["--quant", "fp8-block", "--impls", "vllm"], "unknown implementations"),
                          (["--quant", "fp8-blocks"], "invalid choice")):
        result = run_bench_moe(*argv)
        assert result.returncode == 2 and message in result.stderr, result.stderr


CONTRACT_KWARGS = {  # per scheme: the FP8 keyword arguments of fused_experts and their shapes
    "fp8-block": dict(w13_scale=(4, 2, 2), w2_scale=(4, 2, 1), block_shape=(128, 128),
                      per_act_token_quant=False),
    "fp8-channel": dict(w13_scale=(4, 256), w2_scale=(4, 256), block_shape=None,
                        per_act_token_quant=True),
    "fp8-tensor": dict(w13_scale=(4,), w2_scale=(4,), a13_scale=(1,), a2_scale=(1,),
                       block_shape=None, per_act_token_quant=False),
}


@pytest.mark.parametrize("scheme", sorted(CONTRACT_KWARGS))
def test_fused_moe_gets_the_contract_kwargs(monkeypatch, scheme):
    """fused_moe's FP8 call as the contract has it, with a stand-in that
    checks the arguments and computes on the dequantized weights."""
    seen = []

    def fp8_fused_experts(x, w13, w2, topk_weights, topk_ids, **kwargs):
        assert w13.dtype == w2.dtype == quant.FP8_DTYPE and w13.shape == (4, 256, 256)
        shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        seen.append(shapes)
        block = kwargs["block_shape"]
        w13, w2 = (quant.dequantize_weight(w, kwargs[name], block, x.dtype)
                   for w, name in ((w13, "w13_scale"), (w2, "w2_scale")))
        return bench.loop_experts(x, w13, w2, topk_weights, topk_ids)

    monkeypatch.setattr(bench, "_FUNCTIONS", {**bench._FUNCTIONS, "fused_moe": fp8_fused_experts})
    rows = bench.run_point("tiny", TINY, 7, device="cpu", dtype=torch.bfloat16, quant=scheme)
    assert seen[0] == CONTRACT_KWARGS[scheme]
    assert [r["impl"] for r in rows] == list(bench.QUANT_IMPLS_CPU) and all(r["ok"] for r in rows)
    assert rows[0]["rel_diff"] <= bench.CHECK_RTOL_FP8 and rows[0]["weights"] == scheme


# --- 4-bit schemes ----------------------------------------------------------------------

QUANTS_4BIT = ["mxfp4", "int4-g128", "int4-g64", "int4-g32", "int4-g128-asym"]


def test_4bit_schemes_are_quants():
    assert list(bench.QUANTS_4BIT) == QUANTS_4BIT and set(QUANTS_4BIT) <= set(bench.QUANTS)
    assert bench.quant_config("mxfp4") == quant.QuantConfig.mxfp4()
    assert bench.quant_config("int4-g128-asym") == quant.QuantConfig.int4(128, symmetric=False)
    assert bench.quant4_config("int4-g8-asym") == quant.QuantConfig.int4(8, symmetric=False)
    assert bench.fit_4bit_group("int4-g128", 2880, 2880) == "int4-g64"  # PERF.md's gpt-oss group
    assert bench.fit_4bit_group("int4-g128-asym", 32, 24) == "int4-g8-asym"
    assert bench.fit_4bit_group("int4-g128", 4096, 1536) == "int4-g128"
    assert bench.fit_4bit_group("mxfp4", 2880, 2880) == "mxfp4"


@pytest.mark.parametrize("scheme", QUANTS_4BIT)
def test_cpu_4bit_point(scheme):
    rows = bench.run_point("tiny", TINY, 5, device="cpu", dtype=torch.bfloat16, quant=scheme,
                           rounds=2)
    assert [r["impl"] for r in rows] == list(bench.QUANT4_IMPLS_CPU) == [
        "fused_moe", "fused_moe-bf16", "fused_moe-fp8", "loop"]
    assert [r["weights"] for r in rows] == [scheme, "bf16", "fp8-block", "bf16"]
    for r in rows:
        assert r["us"] > 0 and r["ok"] and r["quant"] == scheme and r["error"] is None
    ours, bf16, fp8 = rows[:3]
    assert ours["rel_diff"] <= bench.CHECK_RTOL_4BIT  # against the loop on its dequantized weights
    assert fp8["rel_diff"] <= bench.CHECK_RTOL_FP8
    assert ours["vs_bf16"] == pytest.approx(bf16["us"] / ours["us"])
    assert ours["vs_fp8"] == pytest.approx(fp8["us"] / ours["us"])
    assert ours["best_peer"] == "loop"  # fused_moe-bf16 and fused_moe-fp8 are ours
    assert ours["target_us"] is None and ours["vllm_us"] is None  # no PERF.md point on a CPU
    summary = bench.format_summary(rows)
    assert summary.startswith(f"tiny M=5 bf16 {scheme}: fused_moe ")
    assert "over fused_moe-fp8" in summary and summary.endswith("no torch peer")
    assert bench.NO_TORCH_PEER in bench.format_table(rows)


def test_4bit_check_is_against_the_dequantized_weights(monkeypatch):
    """A 4-bit fused_moe that computed on the unquantized weights would be
    about 0.2 off the scheme's reference: flagged."""
    def bf16_instead(x, w13, w2, topk_weights, topk_ids, **kwargs):
        return bench.loop_experts(x, *full, topk_weights, topk_ids)

    args = bench.make_inputs(*TINY, 5, "cpu", torch.bfloat16)
    full = args[1:3]
    monkeypatch.setattr(bench, "_FUNCTIONS", {**bench._FUNCTIONS, "fused_moe": bf16_instead})
    rows = bench.run_point("tiny", TINY, 5, device="cpu", dtype=torch.bfloat16, quant="mxfp4",
                           impls=("fused_moe", "loop"))
    assert not rows[0]["ok"] and rows[0]["rel_diff"] > bench.CHECK_RTOL_4BIT


@pytest.mark.parametrize("scheme", ["mxfp4", "int4-g128", "int4-g128-asym"])
def test_4bit_floor_counts_packed_bytes_and_scales(scheme):
    ceilings = bench.Ceilings(copy_gbps=4000, matmul_tflops=800, fp8_tflops=1600)
    rows = bench.run_point("tiny", TINY, 64, device="cpu", dtype=torch.bfloat16, quant=scheme,
                           ceilings=ceilings, impls=("fused_moe", "fused_moe-bf16", "loop"))
    E, K, H, I = TINY
    group = 32 if scheme == "mxfp4" else 128
    per_n = lambda k: k // 2 + k // group * (1 if scheme == "mxfp4" else 2) + (  # noqa: E731
        k // group if scheme.endswith("-asym") else 0)
    expert = 2 * I * per_n(H) + H * per_n(I)  # packed codes, scales (e8m0 or bf16), zero points
    x, w13, w2, _, ids = bench.make_inputs(*TINY, 64, "cpu", torch.bfloat16)
    moved = torch.unique(ids).numel() * expert + 2 * x.numel() * 2
    floor = max(bench.flops(K, H, I, 64) / 800e6, moved / 4000e3)
    assert all(r["floor_us"] == pytest.approx(floor) for r in rows)
    ours, bf16 = rows[:2]
    assert ours["gbps"] == pytest.approx(moved / ours["us"] / 1e3)
    assert bf16["gbps"] == pytest.approx(bench.bytes_moved(ids, w13, w2, x) / bf16["us"] / 1e3)
    assert ours["pct_of_floor"] == pytest.approx(100 * floor / ours["us"])


def test_4bit_targets_and_vllm_from_perf_md():
    def row(M, us, impl="fused_moe", scheme="mxfp4"):
        return dict(shape="qwen3-30b-a3b", M=M, impl=impl, us=us, dtype="bf16", device="cuda",
                    quant=scheme)
    rows = [row(1, 7.0), row(1, 99.0, "grouped_mm"), row(8, 40.0), row(32, None)]
    bench._add_targets(rows)
    assert [r["target_us"] for r in rows] == [8, None, 35, 77]
    assert [r["meets_target"] for r in rows] == [True, None, False, False]
    assert rows[0]["vllm_us"] == 132 and rows[0]["vs_vllm"] == pytest.approx(132 / 7)
    text = bench.format_targets(rows)
    assert text.splitlines()[0] == "targets met: 1 of 3 (mxfp4; PERF.md's H200 targets)"
    assert "qwen3-30b-a3b M=8: 40 us > 35 us" in text
    assert bench.target_us("gpt-oss-120b", 8192, "int4-g128") == 2710
    assert bench.target_us("gpt-oss-120b", 1, "int4-g32") is None  # not the table's bytes
    assert bench.vllm_4bit_us("deepseek-v3", 128, "int4-g32") == 17996
    assert bench.vllm_4bit_us("deepseek-v3", 128, "fp8-block") is None
    assert all(len(t) == len(bench.TOKENS) for t in bench.TARGETS_US["4bit"].values())
    assert set(bench.TARGETS_US["4bit"]) == set(bench.VLLM_4BIT_US) == set(bench.MODELS)
    summary_rows = [dict(row(1, 7.0), E=128, K=8, H=2048, I=768), dict(
        row(1, 14.0, "fused_moe-bf16"), E=128, K=8, H=2048, I=768), dict(
        row(1, 99.0, "grouped_mm"), E=128, K=8, H=2048, I=768)]
    bench._add_speedups(summary_rows)
    bench._add_targets(summary_rows)
    line = bench.format_summary(summary_rows)
    assert "2.00x over fused_moe-bf16; no torch peer; PERF.md's vLLM Triton W4A16 (H200) " \
           "132 us, 18.86x" in line


def test_impls_with_a_4bit_scheme():
    bench.check_impls(bench.QUANT4_IMPLS, "mxfp4")
    with pytest.raises(ValueError, match="scaled_grouped_mm needs an FP8 scheme.*no torch peer"):
        bench.check_impls(["fused_moe", "scaled_grouped_mm"], "int4-g128")
    with pytest.raises(ValueError, match="fused_moe-fp8 needs a 4-bit scheme"):
        bench.check_impls(["fused_moe-fp8"])
    with pytest.raises(ValueError, match="fused_moe-fp8 needs a 4-bit scheme"):
        bench.check_impls(["fused_moe-fp8"], "fp8-block")
    with pytest.raises(ValueError, match="unknown quant 'int4-g256'"):
        bench.check_impls(["fused_moe"], "int4-g256")
    assert bench.default_impls("mxfp4", cuda=True) == (
        "fused_moe", "fused_moe-bf16", "fused_moe-fp8", "grouped_mm")
    assert bench.default_impls("int4-g128", cuda=False) == bench.QUANT4_IMPLS_CPU


def test_4bit_that_does_not_fit_gets_an_na_row():
    rows = bench.run_point("tiny", (4, 2, 32, 24), 3, device="cpu", dtype=torch.bfloat16,
                           quant="mxfp4")  # 24 is not a multiple of mxfp4's 32
    ours = rows[0]
    assert ours["us"] is None and "32" in ours["error"] and ours["weights"] == "mxfp4"
    assert all(r["ok"] for r in rows[1:]) and ours["floor_us"] is None
    assert "n/a: fused_moe:" in bench.format_table(rows)
    int4 = bench.run_point("tiny", (4, 2, 32, 24), 3, device="cpu", dtype=torch.bfloat16,
                           quant="int4-g128")
    assert int4[0]["weights"] == "int4-g8" and int4[0]["ok"]


@pytest.mark.parametrize("scheme", ["mxfp4", "int4-g128", "int4-g128-asym"])
def test_fused_moe_gets_the_4bit_contract_kwargs(monkeypatch, scheme):
    """fused_moe's 4-bit call as int4_contract.md has it: uint8 [E, N, K/2]
    weights, [E, N, K/g] scales (uint8 e8m0 or bf16), zero points only for
    asymmetric int4, no FP8 options."""
    seen = []

    def fp4_fused_experts(x, w13, w2, topk_weights, topk_ids, **kwargs):
        if w13.dtype != torch.uint8:  # fused_moe-fp8
            return fused_moe.fused_experts(x, w13, w2, topk_weights, topk_ids, **kwargs)
        seen.append({k: (tuple(v.shape), v.dtype) for k, v in kwargs.items()})
        assert w13.shape == (4, 256, 128) and w2.shape == (4, 256, 64)
        w13, w2 = (quant.dequantize_packed4(w, kwargs[f"{n}_scale"], kwargs.get(f"{n}_zp"), x.dtype)
                   for w, n in ((w13, "w13"), (w2, "w2")))
        return bench.loop_experts(x, w13, w2, topk_weights, topk_ids)

    monkeypatch.setattr(bench, "_FUNCTIONS", {**bench._FUNCTIONS, "fused_moe": fp4_fused_experts,
                                              "fused_moe-fp8": fp4_fused_experts})
    rows = bench.run_point("tiny", TINY, 7, device="cpu", dtype=torch.bfloat16, quant=scheme)
    g, dtype = (32, torch.uint8) if scheme == "mxfp4" else (128, torch.bfloat16)
    expected = dict(w13_scale=((4, 256, 256 // g), dtype), w2_scale=((4, 256, 128 // g), dtype))
    if scheme.endswith("-asym"):
        expected.update(w13_zp=((4, 256, 2), torch.uint8), w2_zp=((4, 256, 1), torch.uint8))
    assert seen[0] == expected
    assert all(r["ok"] for r in rows) and rows[0]["rel_diff"] <= 1e-6


@pytest.mark.parametrize("scheme", ["mxfp4", "int4-g128"])
def test_cli_4bit_writes_json(tmp_path, capsys, monkeypatch, scheme):
    rows = cli_quant_rows(tmp_path, monkeypatch, scheme)
    assert [(r["M"], r["impl"]) for r in rows] == [
        (m, impl) for m in (1, 5) for impl in bench.QUANT4_IMPLS_CPU]
    assert all(r["ok"] and r["us"] > 0 and r["dtype"] == "bf16" for r in rows)
    assert [r["weights"] for r in rows[:4]] == [scheme, "bf16", "fp8-block", "bf16"]
    assert {"vs_fp8", "vllm_us", "target_us", "floor_us"} <= set(rows[0])
    printed = capsys.readouterr().out
    assert f"custom M=5 bf16 {scheme}: fused_moe " in printed and "over fused_moe-fp8" in printed
    assert bench.NO_TORCH_PEER in printed


def test_cli_4bit_flags_are_checked(capsys):
    for argv, message in (([*TINY_ARGS, "--quant", "int4-g256"], "invalid choice: 'int4-g256'"),
                          ([*TINY_ARGS, "--quant", "mxfp4", "--impl", "scaled_grouped_mm"],
                           "no torch peer"),
                          ([*TINY_ARGS, "--impl", "fused_moe-fp8"], "needs a 4-bit scheme")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_moe_takes_the_4bit_schemes():
    run = run_bench_moe
    for argv, message in ((["--quant", "mxfp4", "--impls", "scaled_grouped_mm"], "no torch peer"),
                          (["--impls", "fused_moe-fp8"], "needs a 4-bit scheme"),
                          (["--quant", "int4-g256"], "invalid choice")):
        result = run(*argv)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    if not torch.cuda.is_available():  # the flags are taken; the script itself needs a GPU
        for scheme in ("mxfp4", "int4-g128", "int4-g128-asym"):
            result = run("--quant", scheme, "--impls", "fused_moe,fused_moe-fp8", "--ms", "1")
            assert result.returncode == 1 and "needs a CUDA GPU" in result.stderr, result.stderr
