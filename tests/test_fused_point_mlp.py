"""The fused per-point MLP kernel (``imedsam_export.fused_point_mlp``) against the unfused ``DecoderGraph``.

The kernel is Triton; on a CPU it runs in Triton's interpreter, which must be switched on before the kernel is
defined, so the comparison runs in a subprocess with ``TRITON_INTERPRET=1``. (The interpreter has no bfloat16:
fp16 stands in for the reduced-precision path here; a GPU check times and compares bf16, benchmarks/gpu_check.py.)
"""

from __future__ import annotations

import pytest

from .conftest import not_interpreted, run_in_triton_interpreter

pytest.importorskip("triton", reason="triton comes with torch's CUDA builds on Linux; this torch has none")

SCRIPT = r"""
import dataclasses, json, sys
import torch
from imedsam_export.fused_point_mlp import FusedPointMLP
from imedsam_export.graphs import DecoderGraph
from imedsam_export.merge import merge_for_export
from imedsam_train.build import build_from_config
from imedsam_train.config import preset

def decoder(classes, widths):
    torch.manual_seed(0)
    cfg = preset("tiny", input_size=64, num_classes=classes)
    cfg = cfg.replace(decoder=dataclasses.replace(cfg.decoder, **widths))
    model, _ = build_from_config(cfg)
    for m in model.inr.modules():  # non-trivial folded BatchNorms and biases
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2); m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5); m.bias.data.uniform_(-0.2, 0.2)
    folded, _ = merge_for_export(model.eval())
    return DecoderGraph(folded.eval()).eval(), folded.cfg

out = {}
for name, classes, widths in (
    ("tiny", 1, {}),
    ("odd widths, 2 classes", 2, dict(coarse_hidden=(100, 60), coarse_feature=20, fine_hidden=(40, 30, 24))),
    ("vit_b widths", 1, dict(coarse_hidden=(1024, 512), coarse_feature=256, fine_hidden=(256, 256, 128))),
):
    dec, cfg = decoder(classes, widths)
    g = cfg.grid_size
    torch.manual_seed(1)
    up = torch.randn(2, cfg.encoder.out_chans // 8, 4 * g, 4 * g)
    coords = torch.rand(2, 50, 2) * 2.2 - 1.1  # 100 points: not a multiple of the 32-point block; some off the map
    rows = {}
    with torch.no_grad():
        ref = dec.point_outputs(up, coords)
        for dt in (torch.float32, torch.float16):
            dec.point_mlp = FusedPointMLP(dec, dt)
            got = dec.point_outputs(up, coords)
            dec.point_mlp = None
            rows[str(dt)] = {
                k: {"shape": list(b.shape), "dtype": str(b.dtype), "ref_shape": list(a.shape),
                    "rel": float((a - b).abs().max() / a.abs().max()),
                    "sign": float(((a > 0) == (b > 0)).float().mean())}
                for k, a, b in zip(("coarse", "fine", "uncertainty"), ref, got)}
    out[name] = rows

# through the torch backend: a decode and a device-planned sparse box, fused against unfused (fp32, CPU)
from tests.kernel_checks import backend_runs
out["backend"] = backend_runs("fused_mlp", "set_decoder_mlp")
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def compared() -> dict:
    return run_in_triton_interpreter(SCRIPT)


@pytest.mark.parametrize("config", ["tiny", "odd widths, 2 classes", "vit_b widths"])
def test_fused_point_mlp_equals_the_unfused_decoder(compared, config):
    """fp32 (IEEE products): the unfused decoder's outputs within float32 rounding; fp16 operands with fp32
    accumulation: within fp16 rounding, and the logits' signs (the masks) agree. Shapes and dtype as the
    unfused ``point_outputs`` returns them, for every class."""
    rows = compared[config]
    for out in rows["torch.float32"].values():
        assert out["shape"] == out["ref_shape"] and out["dtype"] == "torch.float32"
        assert out["rel"] < 2e-6
        assert out["sign"] == 1.0
    for name, out in rows["torch.float16"].items():
        assert out["rel"] < 5e-3, name
        if name != "uncertainty":
            assert out["sign"] >= 0.98, name


def test_the_torch_backend_decodes_and_plans_alike_fused_or_not(compared):
    """TorchBackend(fused_mlp=True): the decoder's outputs and a device-planned sparse box (every planner
    level's decoder call through the kernel) equal the unfused backend's within fp32 rounding, with the same
    points queried and the same mask; the description says it."""
    b = compared["backend"]
    assert max(b["decode_rel"]) < 2e-6 and b["sparse_rel"] < 2e-6
    assert b["queried"][0] == b["queried"][1] > 0 and b["masks_equal"]
    assert "fused decoder MLP" in b["description"]


def test_the_kernel_compiles_for_hopper_within_its_shared_memory():
    """The interpreter runs the kernel's Python; it does not compile it. Compiled ahead of time for sm_90 (no
    GPU needed: Triton's front end, its passes and ptxas), with vit_b's decoder widths, at each block size in
    bf16 (torch-cuda's precision) and at the largest in fp32: every variant compiles (an ``Any`` annotation in
    a jitted helper compiled nowhere, seen first on an H200) and fits a Hopper block's 227 KiB of shared memory
    (fp32 at 64 points did not with two pipeline stages)."""
    import torch

    from imedsam_export.fused_point_mlp import FusedPointMLP
    from imedsam_export.graphs import DecoderGraph
    from imedsam_export.merge import merge_for_export
    from imedsam_train.build import build

    not_interpreted()
    torch.manual_seed(0)
    model, _ = build("vit_b", input_size=384)
    dec = DecoderGraph(merge_for_export(model.eval())[0])
    assert dec.first.in_features == 330 and dec.h1c == 1024  # vit_b's widths
    for dtype, block in ((torch.bfloat16, 16), (torch.bfloat16, 32), (torch.bfloat16, 64), (torch.float32, 64)):
        got = FusedPointMLP(dec, dtype, block).compile_for(90)
        assert 0 < got["shared_bytes"] <= 227 * 1024, (dtype, block, got)
