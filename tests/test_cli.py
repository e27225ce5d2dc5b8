"""python -m fused_moe info / bench, run as a user would."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_moe

# The folder the tests imported fused_moe from (installed, or a source tree on
# PYTHONPATH), so the command line runs the same build.
PACKAGE_PARENT = Path(fused_moe.__file__).resolve().parents[1]
TINY = ["bench", "--shape", "4,2,32,24", "--tokens", "1,4"]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fused_moe", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_info_prints_every_field():
    result = cli("info")
    assert result.returncode == 0, result.stderr
    for field in ("fused_moe", "torch", "CUDA runtime", "CUTLASS", "build", "CUDA kernels", "GPU"):
        assert any(line.startswith(field) for line in result.stdout.splitlines()), field
    assert "cuda=" in result.stdout


def test_info_says_what_cuda_build_has():
    from fused_moe.__main__ import cuda_kernels
    assert cuda_kernels("cuda=0 archs= sm90_configs=").startswith("none")
    assert cuda_kernels("cuda=1 archs=80-real sm90_configs=").endswith("none (no 9.0a arch)")
    assert cuda_kernels("cuda=1 archs=90a-real sm90_configs=a,b").endswith("GEMMs: a,b")


def test_bench_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = cli(*TINY, "--json", str(out))
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert {"date", "card", "torch", "cuda", "commit", "command", "build"} <= set(record)
    assert record["command"].startswith("python -m fused_moe bench --shape 4,2,32,24")
    rows = record["results"]
    assert {r["M"] for r in rows} == {1, 4}
    assert {r["impl"] for r in rows} == {"fused_moe", "grouped_mm", "loop"}
    assert all(r["us"] > 0 and (r["E"], r["K"], r["H"], r["I"]) == (4, 2, 32, 24) for r in rows)
    assert all(r["ok"] for r in rows)  # every output checked against the per-expert loop
    assert "impl" in result.stdout and "fused_moe" in result.stdout  # the table
    assert "over the best peer" in result.stdout  # the summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode")
def test_cpu_bench_compares_three_implementations_per_dtype(tmp_path):
    out = tmp_path / "bench.json"
    result = cli(*TINY, "--dtype", "fp32,bf16", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "No GPU found: CPU mode" in result.stdout
    rows = json.loads(out.read_text())["results"]
    points = {(r["M"], r["dtype"]) for r in rows}
    assert points == {(m, d) for m in (1, 4) for d in ("fp32", "bf16")}
    for m, dtype in points:
        point = [r for r in rows if (r["M"], r["dtype"]) == (m, dtype)]
        assert [r["impl"] for r in point] == ["fused_moe", "grouped_mm", "loop"]
        assert all(r["ok"] and r["device"] == "cpu" for r in point)
        summary = f"custom M={m} {dtype}: fused_moe "
        assert summary in result.stdout
    bad = cli(*TINY, "--dtype", "fp8")
    assert bad.returncode == 2 and "unknown ['fp8']" in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_bench_plot(tmp_path):
    out = tmp_path / "bench.png"
    result = cli(*TINY, "--plot", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_shape():
    result = cli("bench", "--shape", "4,2,32")
    assert result.returncode == 2 and "expected 4 comma-separated integers" in result.stderr


def test_bench_rounds(tmp_path):
    out = tmp_path / "bench.json"
    result = cli(*TINY, "--rounds", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert all(r["us"] > 0 for r in json.loads(out.read_text())["results"])
    bad = cli(*TINY, "--rounds", "0")
    assert bad.returncode == 2 and "positive" in bad.stderr


@pytest.mark.parametrize("scheme", ["mxfp4", "int4-g128"])
def test_bench_4bit_writes_json(tmp_path, scheme):
    out = tmp_path / "bench.json"
    result = cli("bench", "--shape", "4,2,64,32", "--tokens", "1,4", "--quant", scheme,
                 "--json", str(out))
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["quant"] == scheme
    assert record["command"] == f"python -m fused_moe bench --shape 4,2,64,32 --tokens 1,4 " \
                                f"--quant {scheme} --json {out}"
    rows = record["results"]
    from fused_moe import bench
    assert [r["impl"] for r in rows] == list(bench.default_impls(scheme, torch.cuda.is_available())) * 2
    assert bench.default_impls(scheme, cuda=False) == ("fused_moe", "fused_moe-bf16",
                                                       "fused_moe-fp8", "loop")
    assert all(r["ok"] and r["us"] > 0 for r in rows)
    assert rows[0]["weights"] == ("int4-g32" if scheme == "int4-g128" else scheme)
    assert f"custom M=4 bf16 {scheme}: fused_moe " in result.stdout
    assert "no torch peer" in result.stdout
    bad = cli("bench", "--quant", "int4")
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr
