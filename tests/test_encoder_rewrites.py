"""torch-cuda's lean encoder (imedsam_cuda/encoder_rewrites.py): the same function as the model's encoder
and as segment-anything's modules, in fewer kernels."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import replace

import numpy as np
import pytest
import torch

from imedsam_cuda.encoder_rewrites import LeanBlock, NeckNHWC, PatchGEMM, lean_block, lean_encoder


def _power_of_two_model(input_size: int = 160):
    """A small model whose heads are 16 wide (scale 1/4, as vit_b's 1/8): a 10 x 10 token grid in windows of 4
    (padded to 12) and one global block."""
    from imedsam_train.build import build_from_config
    from imedsam_train.config import EncoderConfig, tiny_config

    cfg = tiny_config(input_size)
    enc = EncoderConfig(embed_dim=64, depth=2, num_heads=4, global_attn_indexes=(1,), window_size=4, out_chans=32)
    torch.manual_seed(0)
    model, _ = build_from_config(dataclasses.replace(cfg, encoder=enc))
    with torch.no_grad():  # SAM's zero-initialised position tables would hide any indexing slip
        for b in model.image_encoder.blocks:
            b.attn.rel_pos_h.normal_(0, 0.3)
            b.attn.rel_pos_w.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize(("grid", "window"), [(24, 14), (28, 14), (24, 0)])
def test_lean_block_equals_segment_anythings_block(grid, window):
    """vit_b widths: padded windows (24 -> 28 tokens at 384 px), unpadded windows, global attention; batch 2,
    random relative-position tables. Within fp32 rounding of segment-anything's Block, and within bf16 rounding
    of our plain Block under bf16 autocast (its values, not its kernels)."""
    from segment_anything.modeling.image_encoder import Block as SamBlock

    from imedsam_cuda.encoder_attention import inference_attention
    from imedsam_train.config import FrequencyConfig, LoraConfig
    from imedsam_train.model.encoder import Block

    torch.manual_seed(0)
    sam = SamBlock(768, 12, use_rel_pos=True, window_size=window, input_size=(grid, grid)).eval()
    ours = Block(768, 12, 4.0, window, grid, LoraConfig(enabled=False), FrequencyConfig(enabled=False)).eval()
    with torch.no_grad():
        for p in sam.parameters():
            p.normal_(0, 0.05)
    ours.load_state_dict(sam.state_dict(), strict=True)
    inference_attention(ours, True, None)
    lean = lean_block(ours, grid, torch.float32)
    lean16 = lean_block(ours, grid, torch.bfloat16)
    assert isinstance(lean, LeanBlock) and isinstance(lean16, LeanBlock)
    x = torch.randn(2, grid, grid, 768)
    with torch.no_grad():
        ref = sam(x)
        got, _ = lean(x, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain16, _ = ours(x, None)
            got16, _ = lean16(x, None)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    # bf16: as far from the fp32 output as the plain block is (both round the same products to bf16)
    err_plain = (plain16.float() - ref).norm() / ref.norm()
    err_lean = (got16.float() - ref).norm() / ref.norm()
    assert err_lean <= 1.1 * err_plain, (err_lean, err_plain)
    assert err_lean < 1e-2


def test_lean_block_leaves_what_it_cannot_rewrite_exactly():
    """A scale that is not a power of two (the tiny model's 32-wide heads: 1/sqrt(32)) and an unmerged LoRA
    branch keep the plain Block."""
    from imedsam_train.build import build
    from imedsam_train.model.lora import LoRAQKV

    model, _ = build("tiny", input_size=64)
    blk = model.image_encoder.blocks[0]
    assert lean_block(blk, model.image_encoder.grid, torch.float32) is blk  # 1/sqrt(32)
    pm = _power_of_two_model()
    blk = pm.image_encoder.blocks[0]
    assert isinstance(blk.attn.qkv, LoRAQKV) and not blk.attn.qkv.merged
    assert lean_block(blk, pm.image_encoder.grid, torch.float32) is blk
    blk.attn.qkv.merge()
    assert isinstance(lean_block(blk, pm.image_encoder.grid, torch.float32), LeanBlock)


def test_patch_gemm_equals_the_patch_embedding():
    """RGB images and the frequency path's expanded single channel; fp32 and bf16 autocast."""
    from segment_anything.modeling.image_encoder import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(in_chans=3, embed_dim=96).eval()
    gemm = PatchGEMM(pe)
    for x in (torch.rand(2, 3, 64, 48), torch.rand(2, 1, 64, 64).expand(-1, 3, -1, -1)):
        with torch.no_grad():
            torch.testing.assert_close(gemm(x), pe(x), atol=1e-5, rtol=1e-5)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got, want = gemm(x), pe(x)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="not a patch embedding"):
        PatchGEMM(PatchEmbed(kernel_size=(16, 16), stride=(8, 8)))


def test_neck_nhwc_equals_segment_anythings_neck():
    model = _power_of_two_model()
    neck = model.image_encoder.neck
    with torch.no_grad():
        for p in neck.parameters():
            p.normal_(0.5, 0.2)
    lean = NeckNHWC(copy.deepcopy(neck))
    tokens = torch.randn(2, 10, 10, 64)
    with torch.no_grad():
        want = neck(tokens.permute(0, 3, 1, 2))
        got = lean(tokens.permute(0, 3, 1, 2))
    assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lean_encoder_equals_the_encoder():
    """The whole encoder (frequency adapters, LoRA merged, windows padded 10 -> 12), batch 2: within fp32 rounding
    of the plain encoder, in fp32; under bf16 autocast no further from the fp32 embedding than the plain
    encoder is (the neck's norms now run in fp32)."""
    from imedsam_export.merge import merge_for_export

    folded, _ = merge_for_export(_power_of_two_model())
    enc = folded.image_encoder
    lean = copy.deepcopy(enc)
    assert lean_encoder(lean) == {"lean_blocks": 2, "patch_gemm": 1, "neck_nhwc": 1}
    assert lean_encoder(lean) == {"lean_blocks": 0, "patch_gemm": 0, "neck_nhwc": 0}  # idempotent
    lean16 = copy.deepcopy(enc)
    lean_encoder(lean16, torch.bfloat16)
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        want = enc(x)
        torch.testing.assert_close(lean(x), want, atol=2e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain16, got16 = enc(x), lean16(x)
    err = [float((e.float() - want).norm() / want.norm()) for e in (plain16, got16)]
    assert err[1] <= 1.1 * err[0] and err[1] < 2e-2, err


def test_torch_backend_with_the_lean_layers_gives_the_same_masks():
    """Through the backend (fp32, CPU): the lean encoder's embedding within fp32 rounding of the plain one, and
    with the lean box part (tests/test_box_part_rewrites.py) too, the same full-grid mask."""
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_models import model_artifact
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_deploy.runtime import Segmenter

    model = _power_of_two_model()
    img = (torch.rand(96, 128, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(2)).numpy()
    boxes = np.array([[20.0, 15.0, 90.0, 80.0]], np.float32)
    out = {}
    for lean in (False, True):
        be = TorchBackend(copy.deepcopy(model), "cpu", TorchCudaSettings(
            precision="fp32", lean_encoder=lean, lean_box_part=lean))
        assert be.settings.lean_encoder is be.settings.lean_box_part is lean
        assert ("lean encoder" in be.description) is ("lean box part" in be.description) is lean
        seg = Segmenter(be, model_artifact(model, 1), query="full")
        res = seg.segment(img, boxes, out_hw=(96, 128))
        out[lean] = (np.asarray(be.encode(x)[0]), res.objects[0].logits > 0)
    np.testing.assert_allclose(out[True][0], out[False][0], atol=2e-5, rtol=1e-5)
    assert out[True][1].shape == out[False][1].shape and (out[True][1] == out[False][1]).mean() > 0.9999


def test_lean_encoder_compiles_whole():
    """torch-cuda's compile option captures the encoder with fullgraph=True (a graph break is an error): the
    lean encoder traces whole, autocast queries included, and computes what it computes eagerly. aot_eager:
    the capture without code generation."""
    from imedsam_export.merge import merge_for_export

    folded, _ = merge_for_export(_power_of_two_model())
    enc = folded.image_encoder
    lean_encoder(enc, torch.bfloat16)
    compiled = torch.compile(enc, fullgraph=True, dynamic=False, backend="aot_eager")
    x = torch.rand(1, 3, 160, 160)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = enc(x), compiled(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gelu_epilogues_equal_the_mlps_and_switch_back():
    """use_gelu_epilogue: each block's lin1 + GELU as one ``_addmm_activation`` (on a CPU the exact GELU after the
    GEMM; on CUDA cuBLASLt's epilogue), on the plain and the lean encoder: within fp32 rounding of the MLPs in
    fp32, the same under bf16 autocast to bf16 rounding; one op a block in place of the GELU and the lin1
    GEMM's own; switched off, the class's forward again. Through the backend: configured with gelu_epilogue, the embedding
    within fp32 rounding and 'GELU epilogues' in its description."""
    from benchmarks.op_count import OpCounter
    from imedsam_cuda.encoder_rewrites import use_gelu_epilogue
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_export.merge import merge_for_export

    folded, _ = merge_for_export(_power_of_two_model())
    x = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    for lean in (False, True):
        enc = copy.deepcopy(folded.image_encoder)
        if lean:
            lean_encoder(enc)
        with torch.no_grad():
            want = enc(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                want16 = enc(x)
            with OpCounter() as plain_ops:
                enc(x)
            assert use_gelu_epilogue(enc) == len(enc.blocks) == 2
            with OpCounter() as ops:
                got = enc(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got16 = enc(x)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert float((got16.float() - want16.float()).norm() / want16.float().norm()) < 1e-2
        assert ops.ops["_addmm_activation"] == 2 and ops.ops["gelu"] == plain_ops.ops["gelu"] - 2
        assert sum(ops.ops.values()) <= sum(plain_ops.ops.values()) - 2
        assert use_gelu_epilogue(enc, False) == 0 and all("forward" not in b.mlp.__dict__ for b in enc.blocks)

    be = TorchBackend(copy.deepcopy(_power_of_two_model()), "cpu", TorchCudaSettings(
        precision="fp32", lean_encoder=True))
    base = np.asarray(be.encode(x[:1].numpy())[0])
    be.configure(replace(be.settings, gelu_epilogue=True))
    assert be.settings.gelu_epilogue and "GELU epilogues" in be.description
    np.testing.assert_allclose(np.asarray(be.encode(x[:1].numpy())[0]), base, atol=2e-5, rtol=1e-5)
    be.configure(replace(be.settings, gelu_epilogue=False))
    assert not be.settings.gelu_epilogue and "GELU" not in be.description
