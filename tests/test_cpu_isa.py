"""The CPU tile kernels of each instruction set (FUSED_MOE_CPU_ISA caps the
choice, read once a process, so each runs in a fresh interpreter) against the
float64 reference, on shapes that leave partial vectors and tiles (and, with
many rows an expert, packed ones), and the same bits on one thread as on two."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fused_moe

SCRIPT = """
import hashlib, torch, fused_moe
from fused_moe import reference
torch.manual_seed(0)
outs = hashlib.sha256()
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1.5e-2), (torch.float16, 3e-3)):
    for m, e, k, h, inter in ((1, 8, 2, 100, 36), (37, 5, 3, 72, 52), (300, 16, 4, 40, 24),
                              (200, 4, 2, 33, 17), (64, 2, 1, 300, 40)):
        x = torch.randn(m, h).to(dtype)
        w13 = (torch.randn(e, 2 * inter, h) / h**0.5).to(dtype)
        w2 = (torch.randn(e, h, inter) / inter**0.5).to(dtype)
        b13, b2 = torch.randn(e, 2 * inter).to(dtype) / 10, torch.randn(e, h).to(dtype) / 10
        w, ids = torch.topk(torch.randn(m, e).softmax(-1), k)
        kw = dict(w13_bias=b13, w2_bias=b2)
        out = fused_moe.fused_experts(x, w13, w2, w, ids, **kw)
        ref = reference.fused_experts(x, w13, w2, w, ids, **kw)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err <= tol, (dtype, m, e, k, h, inter, err)
        torch.set_num_threads(1)  # same bits on one thread: no reduction depends on the split
        assert torch.equal(out, fused_moe.fused_experts(x, w13, w2, w, ids, **kw))
        torch.set_num_threads(2)
        outs.update(out.view(torch.uint8 if dtype == torch.float32 else torch.int16).numpy().tobytes())
print("ok", outs.hexdigest())
"""


@functools.cache
def run_isa(isa: str) -> str:
    """SCRIPT's output with the tiles capped at isa: "ok" and a digest of its outputs."""
    package_parent = Path(fused_moe.__file__).resolve().parents[1]
    env = {**os.environ, "FUSED_MOE_CPU_ISA": isa, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(package_parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr
    return result.stdout


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_cpu_isa_matches_reference(isa):
    run_isa(isa)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split()[2:]}
    except OSError:
        return set()


@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= _cpu_flags(),
                    reason="the CPU has no AVX-512 with BF16")
def test_avx512_tiles_run():
    # 16 lanes and packed tiles sum in other orders than AVX2's 8 lanes: other bits.
    assert run_isa("avx512") != run_isa("avx2")
