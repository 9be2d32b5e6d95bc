"""The encoder's fused residual-add + LayerNorm kernel (``imedsam_cuda.fused_add_norm``) against torch.

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
from imedsam_cuda.fused_add_norm import add_norm
from imedsam_cuda.torch_cuda import TorchBackend
from imedsam_cuda.torch_settings import TorchCudaSettings
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
import imedsam_cuda.fused_add_norm as fan
calls = []
kernel = fan.add_norm
def counted(*args, **kw):
    calls.append(kw.get("write_sum", True))
    return kernel(*args, **kw)
fan.add_norm = counted
emb = {}
for fused in (False, True):
    be = TorchBackend(copy.deepcopy(model), "cpu", TorchCudaSettings(
        precision="fp32", lean_encoder=True, overlap_frequency=True, fused_norms=fused))
    emb[fused] = np.asarray(be.encode(img)[0])
    out.setdefault("description", []).append(be.description)
plain = TorchBackend(copy.deepcopy(model), "cpu", TorchCudaSettings(precision="fp32", lean_encoder=False,
                                                                   overlap_frequency=False))
ref = np.asarray(plain.encode(img)[0])
out["add_norm_calls"] = list(calls)
calls.clear()  # without the side stream, the fused steps still run (the encoder's chain-first loop, in line)
be = TorchBackend(copy.deepcopy(model), "cpu", TorchCudaSettings(precision="fp32", lean_encoder=True,
                                                                overlap_frequency=False, fused_norms=True))
out["encoder_fused_no_stream_vs_fused"] = float(np.abs(np.asarray(be.encode(img)[0]) - emb[True]).max())
out["add_norm_calls_no_stream"] = list(calls)
out["encoder_fused_vs_unfused"] = float(np.abs(emb[True] - emb[False]).max())
out["encoder_fused_vs_plain"] = float(np.abs(emb[True] - ref).max())
out["encoder_scale"] = float(np.abs(ref).max())

# the box part's norm-then-positional-add: z = LN(x + a) + post, post per image or one image's for all
from imedsam_cuda.fused_add_norm import add_norm_post
x3, a3 = torch.randn(2, 7, 96) * 2 + 0.5, torch.randn(2, 7, 96)
for name, (aa, post) in {"post": (a3, torch.randn(2, 7, 96)), "post, one image's": (a3, torch.randn(1, 7, 96)),
                         "post, no a": (None, torch.randn(2, 7, 96))}.items():
    with torch.no_grad():
        want = ln(x3 + aa if aa is not None else x3)
        y, z = add_norm_post(x3, aa, ln, post, torch.float32)
    out[name] = {"fp32_max": float((y - want).abs().max()), "z_bitwise": bool(torch.equal(z, y + post))}
try:
    add_norm_post(x3, a3, ln, torch.randn(1, 6, 96), torch.float32)
    out["bad_post"] = "accepted"
except ValueError as e:
    out["bad_post"] = str(e)

# the fp32 box part through the backend: its two-way transformer's norms fused or not (tiny model, 64 wide)
from imedsam_train.build import build
torch.manual_seed(0)
tiny, _ = build("tiny", input_size=64)
with torch.no_grad():  # away from the identity norms of a fresh model
    for m in tiny.mask_decoder.transformer.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.normal_(1, 0.2)
            m.bias.normal_(0, 0.2)
tiny = tiny.eval()
boxes = np.array([[5.0, 8.5, 40.0, 50.0], [0.0, 3.0, 63.0, 30.0]], np.float32)
emb_in = torch.randn(2, 64, 4, 4)
ups, calls_box = {}, {}
post_calls = []
post_kernel = fan.add_norm_post
def counted_post(*args, **kw):
    post_calls.append(1)
    return post_kernel(*args, **kw)
fan.add_norm_post = counted_post
for name, fp32_box, fused in (("fp32 box", True, False), ("fp32 box, fused", True, True),
                              ("bf16 box, fused", False, True)):
    be = TorchBackend(copy.deepcopy(tiny), "cpu", TorchCudaSettings(
        precision="bf16", lean_encoder=True, lean_box_part=True, fp32_box_part=fp32_box, fused_norms=fused))
    calls.clear(), post_calls.clear()
    ups[name] = be.box_features(emb_in, boxes).float()
    calls_box[name] = [len(calls), len(post_calls), be.description]
# the fp32 box part switched on at run time (as the tuner does) on the bf16 box part with fused norms: the same
# kernels, the same features as the backend built with it
calls.clear(), post_calls.clear()
be.configure(dataclasses.replace(be.settings, fp32_box_part=True))
switched = be.box_features(emb_in, boxes).float()
calls_box["switched on"] = [len(calls), len(post_calls), be.description]
out["switched_bitwise"] = bool(torch.equal(switched, ups["fp32 box, fused"]))
ref_up = ups["fp32 box"]
out["box_fused_vs_unfused"] = float((ups["fp32 box, fused"] - ref_up).norm() / ref_up.norm())
out["box_calls"] = calls_box
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
    and of the plain one, with the frequency stream or without (the fused steps then run in line); the
    description says it."""
    assert compared["encoder_fused_vs_unfused"] < 1e-5 * max(1.0, compared["encoder_scale"])
    assert compared["encoder_fused_vs_plain"] < 3e-5 * max(1.0, compared["encoder_scale"])
    assert ["fused encoder norms" in d for d in compared["description"]] == [False, True]
    # one encode through the fused backend, three blocks: norm1 alone, then (x + attn, norm2) and
    # (x + mlp + add, the next norm1) per block, the last block's final sum in torch
    assert compared["add_norm_calls"] == [False, True, True, True, True, True]
    # the same without the frequency stream (fused steps run the chain-first loop in line)
    assert compared["add_norm_calls_no_stream"] == compared["add_norm_calls"]
    assert compared["encoder_fused_no_stream_vs_fused"] == 0.0


def test_the_kernel_compiles_for_hopper():
    """Compiled ahead of time for sm_90 (no GPU needed: Triton's front end, its passes and ptxas) for vit_b's
    and vit_l's widths in bf16 and fp32, every variant the encoder launches and the fp32 box part's, unspilled."""
    import torch

    from imedsam_cuda.fused_add_norm import compile_for

    not_interpreted()
    for c, dtype in ((768, torch.bfloat16), (1024, torch.bfloat16), (768, torch.float32)):
        got = compile_for(c, dtype, 90)
        assert len(got) == 7 and sum(" post" in k for k in got) == 2, got  # the encoder's four, the box part's three
        assert all(0 <= v["shared_bytes"] <= 227 * 1024 and v["spill_stores"] == 0 for v in got.values()), got


@pytest.mark.parametrize("case", ["post", "post, one image's", "post, no a"])
def test_add_norm_post_equals_torch(compared, case):
    """add_norm_post: the norm within fp32 rounding, and z is bitwise its y plus post (torch's fp32 add), with post
    per image or one image's rows for every image; a post that does not repeat over x is refused."""
    assert compared[case]["fp32_max"] < 5e-6 and compared[case]["z_bitwise"]
    assert compared["bad_post"] == "add_norm_post: post (1, 6, 96) does not repeat over x (2, 7, 96)"


def test_the_fp32_box_part_with_fused_norms_equals_it_unfused(compared):
    """TorchBackend(bf16, fp32_box_part=True, fused_norms=True): the two-way transformer's nine norms (two layers of
    four and the final one) through the kernel, six of them with their positional add; the box features within
    fp32 rounding of the unfused lean box part, and the description says it. A bf16 box part (under autocast)
    keeps segment-anything's forward: no kernel there."""
    calls = compared["box_calls"]
    assert compared["box_fused_vs_unfused"] < 1e-5
    assert calls["fp32 box"][:2] == [0, 0] and calls["bf16 box, fused"][:2] == [0, 0]
    assert calls["fp32 box, fused"][:2] == [3, 6]  # add_norm: norm2 twice and the final norm; the rest with post
    assert "(box part too)" in calls["fp32 box, fused"][2]
    assert "(box part too)" not in calls["bf16 box, fused"][2] and "fused encoder norms" in calls["bf16 box, fused"][2]
    # configure(fp32_box_part=True) on the bf16 box part with fused norms: the fused box norms come with it
    assert calls["switched on"][:2] == [3, 6] and "(box part too)" in calls["switched on"][2]
    assert compared["switched_bitwise"]
