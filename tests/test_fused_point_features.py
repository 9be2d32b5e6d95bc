"""The decoder's fused point-row kernel (``imedsam_cuda.fused_point_features``) against the unfused rows.

The kernel is Triton; on a CPU it runs in Triton's interpreter, which must be switched on before the kernel is
defined, so the comparisons run in a subprocess with ``TRITON_INTERPRET=1`` (the interpreter has no bfloat16:
fp16 stands in for the reduced-precision rows; benchmarks/gpu_check.py compares and times bf16 on a GPU).
"""

from __future__ import annotations

import pytest

from .conftest import not_interpreted, run_in_triton_interpreter, triton_before

pytest.importorskip("triton", reason="triton comes with torch's CUDA builds on Linux; this torch has none")

SCRIPT = r"""
import dataclasses, json, sys
import numpy as np
import torch
from imedsam_cuda.fused_point_features import FusedPointFeatures
from imedsam_export.graphs import DecoderGraph
from imedsam_export.merge import merge_for_export
from imedsam_train.build import build_from_config
from imedsam_train.config import preset

def decoder(**enc):
    torch.manual_seed(0)
    cfg = preset("tiny", input_size=64)
    cfg = cfg.replace(encoder=dataclasses.replace(cfg.encoder, **enc))
    model, _ = build_from_config(cfg)
    folded, _ = merge_for_export(model.eval())
    return DecoderGraph(folded.eval()).eval(), folded.cfg

out = {}
for name, enc in (("tiny", {}), ("vit_b maps", {"out_chans": 256})):
    dec, cfg = decoder(**enc)
    dec.use_grid_sample(True)
    dec.align_matmuls(True)
    g = cfg.grid_size
    torch.manual_seed(1)
    up = torch.randn(2, cfg.encoder.out_chans // 8, 4 * g, 4 * g) * 3
    # 2 x 37 points, not a multiple of the 16-point block: corners, edges, a map's exact centre, points off
    # the map (their taps outside add nothing), and random ones
    coords = torch.rand(2, 37, 2) * 2.4 - 1.2
    coords[0, :6] = torch.tensor([[-1., -1.], [1., 1.], [0., 0.], [-1.05, 0.3], [1.3, -1.3], [0.999, -0.999]])
    n_up, n_pe = up.shape[1], dec.pe_rows.shape[1]
    kern = FusedPointFeatures(dec)
    cell = {"widths": [kern.cu, kern.cp, kern.n_in, dec.feat_pad]}
    with torch.no_grad():
        ref = dec._point_rows(up, coords)  # grid_sample, Fourier, cat, zeros
        dec.use_grid_sample(False)
        gather = dec._point_rows(up, coords)  # the exported graph's Gather taps
        dec.use_grid_sample(True)
        dec.point_features = kern
        got = dec._point_rows(up, coords)
        half = kern(up, coords, ref.shape[-1], torch.float16)
        parts = {"up": slice(0, n_up), "pe": slice(n_up, n_up + n_pe), "gamma": slice(n_up + n_pe, kern.n_in),
                 "zeros": slice(kern.n_in, None)}
        cell.update({"shape": [list(ref.shape), list(got.shape)], "dtype": str(got.dtype),
                     "max_abs": {k: float((ref[..., s] - got[..., s]).abs().max()) for k, s in parts.items()},
                     "zeros_are_zero": bool((got[..., kern.n_in:] == 0).all() and (half[..., kern.n_in:] == 0).all()),
                     "vs_gather": float((gather - got).abs().max()), "scale": float(ref.abs().max()),
                     "fp16_dtype": str(half.dtype), "fp16_same": float((half == ref.half()).float().mean()),
                     "fp16_max": float((half.float() - ref).abs().max())})
        # a bad call: an up map of the wrong width
        try:
            kern(up[:, :-1], coords, ref.shape[-1], torch.float32)
            cell["refused"] = ""
        except ValueError as e:
            cell["refused"] = str(e)
        dec.point_features = None
    out[name] = cell

# through the torch backend: a decode and a device-planned sparse box, fused rows against unfused (fp32, CPU)
from tests.kernel_checks import backend_runs
out["backend"] = backend_runs("fused_features", True, align_matmuls=True, relu_epilogue=True)
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def compared() -> dict:
    return run_in_triton_interpreter(SCRIPT)


@pytest.mark.parametrize("config", ["tiny", "vit_b maps"])
def test_fused_rows_equal_the_unfused_rows(compared, config):
    """fp32: every part of the row (up-map sample, positional sample, gamma) within float32 rounding of the
    unfused path's (grid_sample, the Fourier encoding, the concatenation), and of the exported graph's Gather
    taps; the alignment zeros zero; the same shape and the first GEMM's dtype. fp16: the fp32 row rounded once
    (all but rare one-ulp ties). A wrong up map is refused by name."""
    c = compared[config]
    cu, cp, n_in, pad = c["widths"]
    assert cu == cp // 8 and n_in == cu + cp + 42 and pad == -n_in % 8
    assert c["shape"][0] == c["shape"][1] == [2, 37, n_in + pad] and c["dtype"] == "torch.float32"
    tol = 4e-7 * max(1.0, c["scale"])
    assert all(v <= tol for v in c["max_abs"].values()), c["max_abs"]
    assert c["max_abs"]["zeros"] == 0.0 and c["zeros_are_zero"]
    assert c["vs_gather"] <= 2 * tol
    assert c["fp16_dtype"] == "torch.float16" and c["fp16_same"] >= 0.999 and c["fp16_max"] < 1e-2 * c["scale"]
    assert "fused point features" in c["refused"] and "channels" in c["refused"]


def test_the_torch_backend_decodes_and_plans_alike_with_fused_rows(compared):
    """TorchBackend(fused_features=True): a decode and a device-planned sparse box (every level's decoder call
    through the kernel) equal the unfused backend's within fp32 rounding, with the same points queried and the
    same mask; the description says it; switched off, the unfused path is back, bitwise."""
    b = compared["backend"]
    assert max(b["decode_rel"]) < 2e-6 and b["sparse_rel"] < 2e-6
    assert b["queried"][0] == b["queried"][1] > 0 and b["masks_equal"]
    assert "fused point features" in b["description"]
    assert b["off_again_equal"]


def test_the_kernel_compiles_for_hopper_without_spilling():
    """Compiled ahead of time for sm_90 (Triton's front end, its passes and ptxas; no GPU needed) at vit_b's widths
    (32 + 256 channels, 42 Fourier columns, 6 alignment zeros), bf16 and fp32 rows: no shared memory, no
    register spills, and room for several programs an SM (a 32-point block with the positional map's channels
    unrolled took all 255 registers and spilled)."""
    import torch

    from imedsam_cuda.fused_point_features import FusedPointFeatures
    from imedsam_export.graphs import DecoderGraph
    from imedsam_export.merge import merge_for_export
    from imedsam_train.build import build

    not_interpreted()
    torch.manual_seed(0)
    model, _ = build("vit_b", input_size=384)
    dec = DecoderGraph(merge_for_export(model.eval())[0])
    kern = FusedPointFeatures(dec)
    assert (kern.cu, kern.cp, kern.n_in) == (32, 256, 330)
    # Triton 3.6 (the device image's) stages a row through 1 KiB (bf16) or 2 KiB (fp32) of shared memory and gives it ~20 more
    # registers; 3.8 neither. Still no spills and three or more 4-warp programs an SM under either.
    old = triton_before(3, 8)
    for dtype in (torch.bfloat16, torch.float32):
        got = kern.compile_for(336, dtype, capability=90)
        assert got["spill_stores"] == 0 and got["spill_loads"] == 0, (dtype, got)
        assert got["shared_bytes"] <= (2048 if old else 0), (dtype, got)
        assert got["registers"] <= (160 if old else 128), (dtype, got)
