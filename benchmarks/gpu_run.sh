#!/usr/bin/env bash
# The GPU benchmarks, tests and compute-sanitizer runs behind benchmarks/RESULTS.md, in one
# script, for a machine with an NVIDIA H200 (or another Hopper GPU) and torch installed.
# It installs fused_moe from a wheel in .whl/, built beforehand (on any machine with the
# CUDA toolkit) by
#   pip wheel --no-deps . -w .whl
# then benchmarks, tests and sanitizes. Logs and JSON go to $OUT (default /tmp/fused_moe_out):
# run.log, bench_*.json, generate.json, tests.log, sanitizer.log.
# From the repository root:
#   bash benchmarks/gpu_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/fused_moe_out}"
log="$out/run.log"
mkdir -p "$out"

# The wheel, without dependencies: the torch already installed is the one tested.
python3 -m pip install -q --no-index --no-deps .whl/fused_moe-*.whl >>"$log" 2>&1 || exit 1
(cd /tmp && python3 -c "import fused_moe, torch; print(torch.ops.fused_moe)") >>"$log" 2>&1
python3 -m fused_moe info >>"$log" 2>&1

# Benchmarks: the fused_experts table (RESULTS.md, "fused_experts: the PERF.md table").
timeout 200 python3 benchmarks/bench_moe.py --impls fused_moe,grouped_mm --rounds 3 \
  --json "$out/bench_moe.json" >>"$log" 2>&1
# The few-token points again with the decode path off: what it saves ("Decode path").
FUSED_MOE_DECODE=0 timeout 40 python3 benchmarks/bench_moe.py --impls fused_moe --ms 1,2,4 \
  --json "$out/bench_moe_chain.json" >>"$log" 2>&1
# The grouped GEMMs at decode sizes, the data kernels, end-to-end generate().
timeout 25 python3 benchmarks/bench_gemm.py --ms 1,8 --replays 20 --json "$out/bench_gemm.json" >>"$log" 2>&1
timeout 60 python3 benchmarks/bench_ops.py --json "$out/bench_ops.json" >>"$log" 2>&1
timeout 75 python3 benchmarks/bench_generate.py --json "$out/generate.json" >>"$log" 2>&1

# Tests. test_cuda_fused_experts.py holds deepseek-v3-sized weights (21 GiB a case in bf16):
# at most two workers, or they run out of GPU memory together.
timeout 400 python3 -m pytest -n 12 -q -p no:cacheprovider -p no:benchmark -rfE tests \
  --deselect tests/test_cuda_fused_experts.py >"$out/tests.log" 2>&1
timeout 170 python3 -m pytest -n 2 -q -p no:cacheprovider -p no:benchmark -rfE \
  tests/test_cuda_fused_experts.py >>"$out/tests.log" 2>&1

# compute-sanitizer on subsets that cover each kernel: memcheck and racecheck of the data
# kernels and routing, memcheck of the CUTLASS GEMMs on unaligned pointers, memcheck and
# racecheck of the decode path. Each tool's exit status is logged after its output.
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
# The tests' summary lines and the sanitizer exit statuses.
tail -3 "$out/tests.log" "$san"
