"""The encoder's frequency-adapter chain as one Triton kernel (``imedsam_cuda.fused_frequency_chain``) against
the adapters run block by block.

On a CPU the kernel runs in Triton's interpreter, in a subprocess with ``TRITON_INTERPRET=1`` (fp16 stands in for
bf16, which the interpreter lacks); benchmarks/gpu_check.py times it on a GPU.
"""

from __future__ import annotations

import pytest

from .conftest import not_interpreted, run_in_triton_interpreter

pytest.importorskip("triton", reason="triton comes with torch's CUDA builds on Linux; this torch has none")

SCRIPT = r"""
import copy, dataclasses, json, sys
import numpy as np
import torch
from torch import nn
from imedsam_cuda.torch_cuda import TorchBackend
from imedsam_cuda.torch_settings import TorchCudaSettings
from imedsam_cuda.fused_frequency_chain import FusedFrequencyChain
from imedsam_train.build import build_from_config
from imedsam_train.config import EncoderConfig, tiny_config

# a 10 x 10 token grid, 64 channels, three blocks (windows of 4 and a global one), vit_b's 4-wide adapters
cfg = tiny_config(160)
enc_cfg = EncoderConfig(embed_dim=64, depth=3, num_heads=4, global_attn_indexes=(1,), window_size=4, out_chans=32)
torch.manual_seed(0)
model, _ = build_from_config(dataclasses.replace(cfg, encoder=enc_cfg))
with torch.no_grad():  # trained-like adapters: the zero-initialised ones would hide a slip in the bottleneck
    for b in model.image_encoder.blocks:
        for p in b.freq.parameters():
            p.normal_(0, 0.3)
        b.attn.rel_pos_h.normal_(0, 0.3)
        b.attn.rel_pos_w.normal_(0, 0.3)
model = model.eval()
out = {}

def by_blocks(enc, f):
    adds = []
    for b in enc.blocks:
        f, add = b.frequency_step(f)
        adds.append(add)
    return torch.stack(adds)

f0 = torch.randn(2, 10, 10, 64) * 2 + 0.5
enc = model.image_encoder
enc16 = copy.deepcopy(enc)
for m in enc16.modules():  # the layers stored in the compute dtype, as torch-cuda stores them
    if isinstance(m, nn.Linear):
        m.to(torch.float16)
with torch.no_grad():
    ref = by_blocks(enc, f0)
    got = FusedFrequencyChain(enc)(f0)
    with torch.autocast("cpu", dtype=torch.float16):
        ref16 = by_blocks(enc16, f0)
    got16 = FusedFrequencyChain(enc16)(f0)
out["fp32"] = {"shape": list(got.shape) == list(ref.shape), "dtype": str(got.dtype),
               "max": float((got - ref).abs().max()), "scale": float(ref.abs().max())}
rel = lambda a, b: float((a - b).norm() / b.norm())
out["fp16"] = {"dtype": str(got16.dtype), "max_vs_torch16": float((got16 - ref16).abs().max()),
               "same": float((got16 == ref16).float().mean()), "err": rel(got16, ref), "err_torch": rel(ref16, ref)}

# through the backend, with and without the side stream's loop, and switched off again
import imedsam_cuda.fused_frequency_chain as ffc
calls = []
call = ffc.FusedFrequencyChain.__call__
def counted(self, f):
    calls.append(tuple(f.shape))
    return call(self, f)
ffc.FusedFrequencyChain.__call__ = counted
img = torch.rand(2, 3, 160, 160).numpy()
emb, desc = {}, {}
for overlap, chain in ((True, False), (True, True), (False, True)):
    be = TorchBackend(copy.deepcopy(model), "cpu", TorchCudaSettings(
        precision="fp32", lean_encoder=True, overlap_frequency=overlap, fused_frequency=chain))
    emb[overlap, chain] = np.asarray(be.encode(img)[0])
    desc[overlap, chain] = be.description
    if not overlap:
        be.configure(dataclasses.replace(be.settings, fused_frequency=False))
        emb["off again"] = np.asarray(be.encode(img)[0])
base = emb[True, False]
out["encoder"] = {"scale": float(np.abs(base).max()), "calls": calls,
                  "max": [float(np.abs(emb[k] - base).max()) for k in ((True, True), (False, True))],
                  "off_again_bitwise": bool(np.array_equal(emb["off again"], base)),
                  "described": [("fused frequency chain" in d) == c for (o, c), d in desc.items()]}
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def compared() -> dict:
    return run_in_triton_interpreter(SCRIPT)


def test_the_chain_equals_the_adapters_block_by_block(compared):
    """fp32: every block's addition within fp32 rounding of the adapters run one by one (twelve chained norms
    in vit_b; three here). fp16 (autocast, layers in fp16): mostly the same values, the rest one rounding apart,
    and no further from the fp32 chain than the torch ops are."""
    r = compared["fp32"]
    assert r["shape"] and r["dtype"] == "torch.float32"
    assert r["max"] < 2e-6 * max(1.0, r["scale"]), r
    h = compared["fp16"]
    assert h["dtype"] == "torch.float32" and h["same"] > 0.5 and h["max_vs_torch16"] < 2e-2, h
    assert h["err"] <= 1.1 * h["err_torch"] and h["err"] < 1e-2, h


def test_the_encoder_with_the_fused_chain_equals_the_encoder(compared):
    """TorchBackend(fused_frequency=True), with the side stream's loop and without it (the chain-first loop then
    runs in line, the kernel still used): the embedding within fp32 rounding, one launch a frame for the whole
    batch; switched off again, bitwise the backend without it; the description says it."""
    r = compared["encoder"]
    assert all(v < 1e-5 * max(1.0, r["scale"]) for v in r["max"]), r
    assert r["calls"] == [[2, 10, 10, 64]] * 2 and r["off_again_bitwise"] and all(r["described"])


def test_the_kernel_compiles_for_hopper_without_spills():
    """Compiled ahead of time for sm_90 (no GPU needed) for vit_b's twelve 768 -> 4 -> 768 adapters in bf16."""
    import torch
    from torch import nn

    from imedsam_cuda.fused_frequency_chain import FusedFrequencyChain
    from imedsam_train.build import build

    not_interpreted()
    model, _ = build("vit_b", input_size=384)
    for m in model.image_encoder.modules():
        if isinstance(m, nn.Linear):
            m.to(torch.bfloat16)
    got = FusedFrequencyChain(model.image_encoder).compile_for(90)
    assert got["spill_stores"] == got["spill_loads"] == 0 and got["registers"] < 255, got
