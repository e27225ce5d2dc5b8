"""fused_moe.bench's timing rounds: implementations take turns, each keeps its best median."""

import itertools

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
