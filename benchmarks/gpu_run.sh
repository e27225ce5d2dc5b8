#!/usr/bin/env bash
# One call on the GPU machine (the `device` tool, carrying .whl/ with a wheel
# built by `pip wheel . -w .whl --no-deps`): install that wheel, then run the
# tests and/or benchmarks; logs and JSON land in $OUT.
#   bash benchmarks/gpu_run.sh tests|bench|all [pytest args...]
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/fused_moe_out}"
mkdir -p "$out"
stage="${1:-all}"
shift || true

python3 -m pip install -q --no-index --no-deps --force-reinstall .whl/fused_moe-*.whl || exit 1
python3 -m fused_moe info 2>&1 | tee "$out/info.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv >> "$out/info.txt"

if [[ "$stage" == tests || "$stage" == all ]]; then
  python3 -m pytest -q -rfE "${@:-tests}" 2>&1 | tee "$out/tests.log" | tail -40
fi
if [[ "$stage" == bench || "$stage" == all ]]; then
  python3 benchmarks/bench_moe.py --json "$out/bench_moe.json" 2>&1 | tee "$out/bench_moe.log"
  python3 benchmarks/bench_ops.py --json "$out/bench_ops.json" 2>&1 | tee "$out/bench_ops.log" | tail -30
fi
