#!/usr/bin/env bash
# The GPU session behind benchmarks/RESULTS.md, as one command for the lent
# machine (the `device` tool, carrying .whl/ with a wheel built on the CPU
# machine by `pip wheel --no-deps . -w .whl`): install that wheel, benchmark,
# test, run the sanitizers; logs and JSON land in $OUT.
#   bash benchmarks/gpu_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/fused_moe_out}"
log="$out/run.log"
mkdir -p "$out"

python3 -m pip install -q --no-index --no-deps .whl/fused_moe-*.whl >>"$log" 2>&1 || exit 1
(cd /tmp && python3 -c "import fused_moe, torch; print(torch.ops.fused_moe)") >>"$log" 2>&1
python3 -m fused_moe info >>"$log" 2>&1

timeout 200 python3 benchmarks/bench_moe.py --impls fused_moe,grouped_mm --rounds 3 \
  --json "$out/bench_moe.json" >>"$log" 2>&1
# The few-token points again with the decode path off: what it saves.
FUSED_MOE_DECODE=0 timeout 40 python3 benchmarks/bench_moe.py --impls fused_moe --ms 1,2,4 \
  --json "$out/bench_moe_chain.json" >>"$log" 2>&1
timeout 25 python3 benchmarks/bench_gemm.py --ms 1,8 --replays 20 --json "$out/bench_gemm.json" >>"$log" 2>&1
timeout 60 python3 benchmarks/bench_ops.py --json "$out/bench_ops.json" >>"$log" 2>&1
timeout 75 python3 benchmarks/bench_generate.py --json "$out/generate.json" >>"$log" 2>&1

# test_cuda_fused_experts.py holds deepseek-v3-sized weights (21 GiB a case in bf16):
# at most two workers, or they run out of GPU memory together.
timeout 400 python3 -m pytest -n 12 -q -p no:cacheprovider -p no:benchmark -rfE tests \
  --deselect tests/test_cuda_fused_experts.py >"$out/tests.log" 2>&1
timeout 170 python3 -m pytest -n 2 -q -p no:cacheprovider -p no:benchmark -rfE \
  tests/test_cuda_fused_experts.py >>"$out/tests.log" 2>&1

san="$out/sanitizer.log"
ops_subset="unaligned or empty_batch or graph_replay or out_of_range or
  (test_permute and True-True-dtype1-2048-128-8) or (test_unpermute and 256-32-4100) or
  (test_activation and 5-2050) or (test_topk_grouped and (256-8-8-4 or 60-6-4-2) and sigmoid-True) or
  (test_topk_nan_inf and 1024)"
timeout 85 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q \
  -p no:cacheprovider -p no:benchmark tests/test_cuda_ops.py -k "$ops_subset" >"$san" 2>&1
echo "memcheck rc=$?" >>"$san"
timeout 45 compute-sanitizer --tool racecheck --error-exitcode 3 python3 -m pytest -q \
  -p no:cacheprovider -p no:benchmark tests/test_cuda_ops.py \
  -k "(test_topk_grouped and (256-8-8-4 or 60-6-4-2) and sigmoid-True) or
      (test_permute and (True-True-dtype1-100-128-8 or True-True-dtype1-100-1024-8))" \
  >>"$san" 2>&1
echo "racecheck rc=$?" >>"$san"
timeout 60 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q \
  -p no:cacheprovider -p no:benchmark tests/test_cuda_grouped_gemm.py -k test_unaligned_pointers \
  >>"$san" 2>&1
echo "memcheck gemm rc=$?" >>"$san"
decode_subset="decode and (test_odd_shapes or test_activations_dtypes or test_expert_map or
  test_router_weight or matches_chain or graph)"
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q \
  -p no:cacheprovider -p no:benchmark tests/test_cuda_fused_experts.py -k "$decode_subset" \
  >>"$san" 2>&1
echo "memcheck decode rc=$?" >>"$san"
timeout 60 compute-sanitizer --tool racecheck --error-exitcode 3 python3 -m pytest -q \
  -p no:cacheprovider -p no:benchmark tests/test_cuda_fused_experts.py -k "decode and matches_chain" \
  >>"$san" 2>&1
echo "racecheck decode rc=$?" >>"$san"
tail -3 "$out/tests.log" "$san"
