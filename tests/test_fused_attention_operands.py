"""A lean encoder block's attention operands as one Triton kernel (``imedsam_cuda.fused_attention_operands``)
against ``LeanBlock``'s torch ops, and a windowed attention's rows gathered back inside ``fused_add_norm``.

On a CPU the kernels run in Triton's interpreter, in a subprocess with ``TRITON_INTERPRET=1`` (fp16 stands in
for bf16, which the interpreter lacks); benchmarks/gpu_check.py times them on a GPU.
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
from imedsam_cuda.encoder_rewrites import lean_block
from imedsam_cuda.fused_add_norm import add_norm
from imedsam_cuda.fused_attention_operands import attention_operands
from imedsam_train.config import EncoderConfig, FrequencyConfig, LoraConfig, tiny_config
from imedsam_cuda.encoder_attention import inference_attention
from imedsam_train.model.encoder import Block

out = {"blocks": {}}
# vit_b's 64-wide heads on small grids (the interpreter takes seconds a hundred tokens): padded windows (9 -> 14
# tokens a side), unpadded windows, global attention over two heads; and four 16-wide heads in padded windows of
# 4 with no qkv bias
cases = {"padded windows": (9, 7, 64, 1, True), "unpadded windows": (14, 7, 64, 1, True),
         "global": (14, 0, 128, 2, True), "no bias": (10, 4, 64, 4, False)}
for name, (grid, window, C, heads, bias) in cases.items():
    torch.manual_seed(0)
    blk = Block(C, heads, 4.0, window, grid, LoraConfig(enabled=False), FrequencyConfig(enabled=False)).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.05)
        blk.attn.rel_pos_h.normal_(0, 0.3)  # SAM's zero tables would hide an indexing slip
        blk.attn.rel_pos_w.normal_(0, 0.3)
    if not bias:
        blk.attn.qkv.bias = None
    inference_attention(blk, True, None)
    for dt in (torch.float32, torch.float16):
        lean = lean_block(blk, grid, dt)
        for m in lean.modules():  # the layers in the compute dtype, as torch-cuda stores them
            if isinstance(m, nn.Linear):
                m.to(dt)
        qkv = torch.randn(2, grid * grid, 3 * C).to(dt)
        with torch.no_grad():
            want = lean.operands(lean.windows(qkv))
            got = attention_operands(lean, qkv)
        c = C // heads
        q, k, v = ((w.float(), g.float()) for w, g in zip(want, got))
        out["blocks"][f"{name} {str(dt)[6:]}"] = {
            "shapes": [list(g.shape) == list(w.shape) for w, g in zip(want, got)],
            "dtype": [str(g.dtype)[6:] for g in got],
            "q_scaled_bitwise": bool(torch.equal(q[0][..., :c], q[1][..., :c])),
            "q_position_max": float((q[0] - q[1]).abs().max()), "q_scale": float(q[0].abs().max()),
            "q_same": float((q[0] == q[1]).float().mean()),
            "k_bitwise": bool(torch.equal(*k)), "v_bitwise": bool(torch.equal(*v))}

# the add with a windowed attention's rows read in grid order
torch.manual_seed(1)
ln = nn.LayerNorm(96, eps=1e-6)
x = torch.randn(2, 5, 7, 96)
a = torch.randn(2, 40, 96).half()
rows = torch.randperm(40)[:35]
s, y = add_norm(x, a, None, ln, torch.float32, a_rows=rows)
want_s = x + a[:, rows].view(2, 5, 7, 96)
out["a_rows"] = {"sum_bitwise": bool(torch.equal(s, want_s)), "norm_max": float((y - ln(want_s)).abs().max())}
try:
    add_norm(x, a, None, ln, torch.float32, a_rows=rows[:30])
    out["a_rows"]["refused"] = None
except ValueError as e:
    out["a_rows"]["refused"] = str(e)

# the encoder through the backend: a 10 x 10 token grid in windows of 4 (padded to 12) and a global block
from imedsam_cuda.torch_cuda import TorchBackend
from imedsam_cuda.torch_settings import TorchCudaSettings
from imedsam_train.build import build_from_config
import imedsam_cuda.fused_attention_operands as fao

cfg = tiny_config(160)
enc = EncoderConfig(embed_dim=64, depth=3, num_heads=4, global_attn_indexes=(1,), window_size=4, out_chans=32)
torch.manual_seed(0)
model, _ = build_from_config(dataclasses.replace(cfg, encoder=enc))
with torch.no_grad():
    for b in model.image_encoder.blocks:
        b.attn.rel_pos_h.normal_(0, 0.3)
        b.attn.rel_pos_w.normal_(0, 0.3)
model = model.eval()
img = torch.rand(2, 3, 160, 160).numpy()
calls = []
kernel = fao.attention_operands
def counted(*args, **kw):
    calls.append(1)
    return kernel(*args, **kw)
fao.attention_operands = counted
emb, desc = {}, {}
for norms, ops in ((False, False), (False, True), (True, True)):
    be = TorchBackend(copy.deepcopy(model), "cpu", TorchCudaSettings(
        precision="fp32", lean_encoder=True, overlap_frequency=True, fused_norms=norms, fused_operands=ops))
    emb[norms, ops] = np.asarray(be.encode(img)[0])
    desc[norms, ops] = be.description
    if norms and ops:
        be.configure(dataclasses.replace(be.settings, fused_operands=False))
        emb["off again"] = np.asarray(be.encode(img)[0])
        be.configure(dataclasses.replace(be.settings, fused_norms=False))
        emb["both off"] = np.asarray(be.encode(img)[0])
base = emb[False, False]
out["encoder"] = {"scale": float(np.abs(base).max()), "calls": len(calls),
                  "max": {f"norms={int(n)} operands={int(o)}": float(np.abs(emb[n, o] - base).max())
                          for n, o in desc},
                  "off_again_max": float(np.abs(emb["off again"] - base).max()),
                  "off_again_bitwise": bool(np.array_equal(emb["both off"], base)),
                  "described": [("fused attention operands" in d) == o for (n, o), d in desc.items()]}
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def compared() -> dict:
    return run_in_triton_interpreter(SCRIPT)


@pytest.mark.parametrize("case", ["padded windows", "unpadded windows", "global", "no bias"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_operands_equal_the_torch_ops(compared, case, dtype):
    """The kernel's q, k, v against ``LeanBlock.operands(LeanBlock.windows(qkv))``, random position tables:
    the same shapes and dtype; s q, the keys (with their one-hot columns) and the values (with their zeros)
    bitwise; the position columns within fp32 rounding of their sums in fp32, and in fp16 the same but for
    rare one-ulp differences (each rounds the same fp32 dot product)."""
    r = compared["blocks"][f"{case} {dtype}"]
    assert all(r["shapes"]) and r["dtype"] == [dtype] * 3
    assert r["q_scaled_bitwise"] and r["k_bitwise"] and r["v_bitwise"]
    if dtype == "float32":
        assert r["q_position_max"] < 2e-6 * max(1.0, r["q_scale"])
    else:
        assert r["q_position_max"] < 2e-3 * max(1.0, r["q_scale"]) and r["q_same"] > 0.999


def test_the_add_reads_the_windows_rows_in_grid_order(compared):
    """``add_norm(a_rows=)``: x + a[:, rows] bitwise, its norm within fp32 rounding; a row table that does not
    cover x is refused."""
    r = compared["a_rows"]
    assert r["sum_bitwise"] and r["norm_max"] < 5e-6
    assert r["refused"] and "a_rows" in r["refused"]


def test_the_encoder_with_fused_operands_equals_the_encoder(compared):
    """TorchBackend(fused_operands=True), with and without fused norms: the embedding within fp32 rounding of the
    lean encoder's, the kernel called once a block (three blocks, two backends); switched off again (and the
    norms), the same, and then bitwise the backend that never had them; the description says it."""
    r = compared["encoder"]
    tol = 1e-5 * max(1.0, r["scale"])
    assert all(v < tol for v in r["max"].values()) and r["off_again_max"] < tol, r
    assert r["calls"] == 6 and r["off_again_bitwise"] and all(r["described"])


def test_the_kernel_compiles_for_hopper_without_spills():
    """Compiled ahead of time for sm_90 (no GPU needed) at vit_b's shapes in bf16: a windowed block (24 x 24
    tokens in windows of 14) and a global one; no spills."""
    import torch

    from imedsam_cuda.encoder_attention import inference_attention
    from imedsam_cuda.encoder_rewrites import lean_block
    from imedsam_cuda.fused_attention_operands import compile_for
    from imedsam_train.config import FrequencyConfig, LoraConfig
    from imedsam_train.model.encoder import Block

    not_interpreted()
    for window in (14, 0):
        blk = Block(768, 12, 4.0, window, 24, LoraConfig(enabled=False), FrequencyConfig(enabled=False)).eval()
        inference_attention(blk, True, None)
        got = compile_for(lean_block(blk, 24, torch.bfloat16), torch.bfloat16, 90)
        assert got["spill_stores"] == got["spill_loads"] == 0 and got["registers"] < 255, got
