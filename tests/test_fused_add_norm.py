"""The encoder's fused residual-add + LayerNorm kernel (``imedsam_export.fused_add_norm``) against torch.

The kernel is Triton; on a CPU it runs in Triton's interpreter, which must be switched on before the kernel is
defined, so the comparisons run in a subprocess with ``TRITON_INTERPRET=1`` (the interpreter has no bfloat16:
fp16 stands in for the reduced-precision path; benchmarks/gpu_check.py compares and times bf16 on a GPU).
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
from imedsam_export.fused_add_norm import add_norm
from imedsam_deploy.backends.torch_cuda import TorchBackend
from imedsam_train.build import build_from_config
from imedsam_train.config import EncoderConfig, tiny_config

out = {}
torch.manual_seed(0)
ln = nn.LayerNorm(96, eps=1e-6)
with torch.no_grad():
    ln.weight.normal_(1, 0.2)
    ln.bias.normal_(0, 0.2)
x = torch.randn(2, 5, 7, 96) * 2 + 0.5
a = torch.randn(2, 5, 7, 96).half()
b = torch.randn(2, 5, 7, 96)
with torch.no_grad():
    for name, (aa, bb, write) in {"norm only": (None, None, False), "x + a": (a, None, True),
                                  "x + a + b": (a, b, True)}.items():
        want_s = x if aa is None else (x + aa if bb is None else x + aa + bb)
        want = ln(want_s)
        s32, y32 = add_norm(x, aa, bb, ln, torch.float32, write_sum=write)
        s16, y16 = add_norm(x, aa, bb, ln, torch.float16, write_sum=write)
        out[name] = {"sum_bitwise": None if s32 is None else bool(torch.equal(s32, want_s) and torch.equal(s16, want_s)),
                     "sum_none": s32 is None and s16 is None, "fp32_max": float((y32 - want).abs().max()),
                     "fp16_dtype": str(y16.dtype), "fp16_max": float((y16.float() - want).abs().max()),
                     "fp16_same": float((y16 == want.half()).float().mean())}

# the encoder through the backend: a 10 x 10 token grid in windows of 4 and a global block, 16-wide heads
cfg = tiny_config(160)
enc = EncoderConfig(embed_dim=64, depth=3, num_heads=4, global_attn_indexes=(1,), window_size=4, out_chans=32)
torch.manual_seed(0)
model, _ = build_from_config(dataclasses.replace(cfg, encoder=enc))
model = model.eval()
img = torch.rand(2, 3, 160, 160).numpy()
import imedsam_export.fused_add_norm as fan
calls = []
kernel = fan.add_norm
def counted(*args, **kw):
    calls.append(kw.get("write_sum", True))
    return kernel(*args, **kw)
fan.add_norm = counted
emb = {}
for fused in (False, True):
    be = TorchBackend(copy.deepcopy(model), "cpu", "fp32", lean_encoder=True, overlap_frequency=True,
                      fused_norms=fused)
    emb[fused] = np.asarray(be.encode(img)[0])
    out.setdefault("description", []).append(be.description)
plain = TorchBackend(copy.deepcopy(model), "cpu", "fp32", lean_encoder=False, overlap_frequency=False)
ref = np.asarray(plain.encode(img)[0])
out["add_norm_calls"] = calls
out["encoder_fused_vs_unfused"] = float(np.abs(emb[True] - emb[False]).max())
out["encoder_fused_vs_plain"] = float(np.abs(emb[True] - ref).max())
out["encoder_scale"] = float(np.abs(ref).max())
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def compared() -> dict:
    return run_in_triton_interpreter(SCRIPT)


@pytest.mark.parametrize("case", ["norm only", "x + a", "x + a + b"])
def test_add_norm_equals_torch(compared, case):
    """The sums are torch's fp32 additions, bitwise (or not written); the norm within fp32 rounding in fp32,
    and in fp16 the fp32 result rounded, but for rare one-ulp differences."""
    r = compared[case]
    assert r["sum_none"] if case == "norm only" else r["sum_bitwise"]
    assert r["fp32_max"] < 5e-6
    assert r["fp16_dtype"] == "torch.float16" and r["fp16_max"] < 1e-2 and r["fp16_same"] >= 0.99


def test_the_encoder_with_fused_norms_equals_the_encoder(compared):
    """TorchBackend(fused_norms=True): every block's adds and norms through the kernel (the first block's norm1
    alone, the others' from the step before): the embedding within fp32 rounding of the unfused lean encoder
    and of the plain one; the description says it."""
    assert compared["encoder_fused_vs_unfused"] < 1e-5 * max(1.0, compared["encoder_scale"])
    assert compared["encoder_fused_vs_plain"] < 3e-5 * max(1.0, compared["encoder_scale"])
    assert ["fused encoder norms" in d for d in compared["description"]] == [False, True]
    # one encode through the fused backend, three blocks: norm1 alone, then (x + attn, norm2) and
    # (x + mlp + add, the next norm1) per block, the last block's final sum in torch
    assert compared["add_norm_calls"] == [False, True, True, True, True, True]


def test_the_kernel_compiles_for_hopper():
    """Compiled ahead of time for sm_90 (no GPU needed: Triton's front end, its passes and ptxas) for vit_b's
    and vit_l's widths in bf16 and fp32, every variant the encoder launches."""
    import torch

    from imedsam_export.fused_add_norm import compile_for

    not_interpreted()
    for c, dtype in ((768, torch.bfloat16), (1024, torch.bfloat16), (768, torch.float32)):
        got = compile_for(c, dtype, 90)
        assert len(got) == 4 and all(0 <= v["shared_bytes"] <= 227 * 1024 for v in got.values()), got
