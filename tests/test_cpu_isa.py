"""The CPU tile kernels of each instruction set (FUSED_MOE_CPU_ISA caps the
choice, read once a process, so each runs in a fresh interpreter) against the
float64 reference, on shapes that leave partial vectors and tiles, and the
same bits on one thread as on two."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fused_moe

SCRIPT = """
import torch, fused_moe
from fused_moe import reference
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1.5e-2), (torch.float16, 3e-3)):
    for m, e, k, h, inter in ((1, 8, 2, 100, 36), (37, 5, 3, 72, 52), (300, 16, 4, 40, 24),
                              (200, 4, 2, 33, 17)):
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
print("ok")
"""


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_cpu_isa_matches_reference(isa):
    package_parent = Path(fused_moe.__file__).resolve().parents[1]
    env = {**os.environ, "FUSED_MOE_CPU_ISA": isa, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(package_parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
