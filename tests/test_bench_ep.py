"""benchmarks/bench_ep.py, run as a user would: expert-parallel ranks spawned
by the script itself, gloo on the CPU, the tiny layer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fused_moe

# The script runs the fused_moe build the tests imported (installed, or a source tree).
PACKAGE_PARENT = Path(fused_moe.__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ep.py"
TOKENS = (3, 17)  # odd counts: nothing lines up with the experts or ranks by chance
CONFIGS = {"linear", "linear+eplb4", "round_robin", "round_robin+eplb4"}


def bench_ep(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4])
def test_expert_parallel_matches_the_unsharded_layer(nproc, tmp_path):
    out = tmp_path / "ep.json"
    result = bench_ep("--small", "--cpu", "--nproc", str(nproc),
                      "--tokens", ",".join(map(str, TOKENS)), "--iters", "2", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == len(CONFIGS) * len(TOKENS), result.stdout
    assert all(line.startswith("PASS") for line in verdicts), result.stdout

    record = json.loads(out.read_text())
    assert record["world_size"] == nproc and record["backend"] == "gloo"
    assert record["date"] and record["card"].startswith("cpu")
    rows = record["results"]
    assert {(r["config"], r["tokens_per_rank"]) for r in rows} == \
        {(c, t) for c in CONFIGS for t in TOKENS}
    for r in rows:
        assert r["step_us"] > 0 and r["comm_us"] > 0
        assert r["comm_share"] == pytest.approx(r["comm_us"] / r["step_us"])
        assert 0 <= r["rel_err"] <= 1e-4 and r["passed"]
