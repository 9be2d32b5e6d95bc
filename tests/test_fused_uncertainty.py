"""The decoder's fused uncertainty kernel (``imedsam_cuda.fused_uncertainty``) against ``PointUncertainty``.

The kernel is Triton; on a CPU it runs in Triton's interpreter, which must be switched on before the kernel is
defined, so the comparisons run in a subprocess with ``TRITON_INTERPRET=1`` (the interpreter has no bfloat16:
fp16 stands in; benchmarks/gpu_check.py compares and times bf16 on a GPU).
"""

from __future__ import annotations

import pytest

from .conftest import not_interpreted, run_in_triton_interpreter

pytest.importorskip("triton", reason="triton comes with torch's CUDA builds on Linux; this torch has none")

SCRIPT = r"""
import json, sys
import numpy as np
import torch
from imedsam_cuda.fused_uncertainty import FusedUncertainty
from imedsam_export.graphs import PointUncertainty

out = {}
torch.manual_seed(0)
# vit_b's 512 hidden units and one class; odd widths with three classes; h in fp16 (bf16's stand-in) and fp32;
# the logits a strided slice of a wider head output, as in the decoder; 2 x 75 points, not a multiple of the block
for name, K, H, dtype in (("vit_b, fp16 h", 1, 512, torch.float16), ("3 classes, 100 wide, fp32 h", 3, 100, torch.float32)):
    pu = PointUncertainty(torch.randn(K, H) * 0.1, 0.5)
    fu = FusedUncertainty(pu.w2)
    head = torch.randn(2, 75, H + 8) * 4
    h = torch.relu(torch.randn(2, 75, H)).to(dtype)
    logits = head.to(dtype)[..., 8 : 8 + K]  # not contiguous
    ref = pu(h.float(), logits.float())
    got = fu(h, logits)
    kth = max(1, int(0.125 * ref.shape[1]))
    top = lambda u: set(torch.topk(u[..., 0].flatten(), kth).indices.tolist())
    out[name] = {"shape": [list(ref.shape), list(got.shape)], "dtype": str(got.dtype),
                 "rel": float((ref - got).abs().max() / ref.abs().max()), "same_top": top(ref) == top(got),
                 "strided": not logits.is_contiguous()}
try:
    fu(h[..., :-1], logits)
    out["refused"] = ""
except ValueError as e:
    out["refused"] = str(e)

# through the torch backend: a decode and a device-planned sparse box, fused uncertainty against unfused (fp32, CPU)
from tests.kernel_checks import backend_runs
out["backend"] = backend_runs("fused_uncertainty", True, align_matmuls=True, relu_epilogue=True)
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def compared() -> dict:
    return run_in_triton_interpreter(SCRIPT)


@pytest.mark.parametrize("case", ["vit_b, fp16 h", "3 classes, 100 wide, fp32 h"])
def test_fused_uncertainty_equals_point_uncertainty(compared, case):
    """From strided logits, for one class and for several: ``PointUncertainty``'s fp32 result within fp32
    rounding, the same shape and dtype, and the same points ranked most uncertain (the ones UGS refines)."""
    c = compared[case]
    assert c["strided"] and c["shape"][0] == c["shape"][1] and c["dtype"] == "torch.float32"
    assert c["rel"] < 1e-6
    assert c["same_top"]


def test_fused_uncertainty_refuses_mismatched_widths(compared):
    assert "fused uncertainty" in compared["refused"] and "(2, 75, 99)" in compared["refused"]


def test_the_torch_backend_decodes_and_plans_alike_with_fused_uncertainty(compared):
    """TorchBackend(fused_uncertainty=True): a decode (coarse and fine logits bitwise the same, the uncertainty
    within fp32 rounding) and a device-planned sparse box (same points queried, same mask) as the unfused
    backend's; the description says it; switched off, the unfused path is back, bitwise."""
    b = compared["backend"]
    assert b["decode_rel"][:2] == [0.0, 0.0] and b["decode_rel"][2] < 1e-6
    assert b["sparse_rel"] < 1e-6
    assert b["queried"][0] == b["queried"][1] > 0 and b["masks_equal"]
    assert "fused uncertainty" in b["description"]
    assert b["off_again_equal"]


def test_the_kernel_compiles_for_hopper_without_spilling():
    """Compiled ahead of time for sm_90 (no GPU needed) at vit_b's 512 hidden units, for one class and for
    BCV's 14, with bf16 and fp32 rows: no spills, within a Hopper block's shared memory."""
    import torch

    from imedsam_cuda.fused_uncertainty import FusedUncertainty

    not_interpreted()
    for classes, dtype in ((1, torch.bfloat16), (14, torch.bfloat16), (1, torch.float32)):
        got = FusedUncertainty(torch.rand(512, classes)).compile_for(dtype, capability=90)
        assert got["spill_stores"] == 0 and got["spill_loads"] == 0, (classes, dtype, got)
        assert got["shared_bytes"] <= 227 * 1024 and got["registers"] <= 192, (classes, dtype, got)
