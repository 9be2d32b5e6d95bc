"""torch-cuda's lean box part (imedsam_export/box_part_rewrites.py): the same box features in fewer kernels."""

from __future__ import annotations

import copy

import torch
from segment_anything.modeling.common import LayerNorm2d

from imedsam_export.box_part_rewrites import ChannelsLastNorm, freeze_dense_pe, lean_box_part


def _model():
    from imedsam_train.build import build

    torch.manual_seed(0)
    model, _ = build("tiny", input_size=64)
    with torch.no_grad():  # away from the identity norms of a fresh model
        for p in model.mask_decoder.output_upscaling.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def test_the_frozen_dense_map_is_bitwise_the_computed_one():
    """Made once under the backend's autocast (or none): the values the prompt encoder computes each call."""
    model = _model()
    for dtype in (None, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            want = model.prompt_encoder.get_dense_pe()
        got = freeze_dense_pe(model, dtype)
        assert got is model.frozen_dense_pe and got.dtype == want.dtype and torch.equal(got, want)


def test_channels_last_norm_equals_layer_norm_2d():
    torch.manual_seed(0)
    ln = LayerNorm2d(16)
    with torch.no_grad():
        ln.weight.normal_(1, 0.3)
        ln.bias.normal_(0, 0.3)
    x = torch.randn(2, 16, 12, 10) * 3 + 1
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(ChannelsLastNorm(ln)(inp), ln(inp), atol=1e-5, rtol=1e-5)


def test_lean_box_part_gives_the_same_box_features():
    """decoder_features (the box part) with both rewrites: within fp32 rounding in fp32; under bf16 autocast no
    further from the fp32 features than the plain box part is (its upscaling norm now runs in fp32)."""
    model = _model()
    lean, lean16 = copy.deepcopy(model), copy.deepcopy(model)
    assert lean_box_part(lean, None) == {"dense_pe_frozen": 1, "channels_last_norms": 1}
    lean_box_part(lean16, torch.bfloat16)
    torch.manual_seed(1)
    emb = torch.randn(2, 64, 4, 4)
    boxes = torch.tensor([[5.0, 8.0, 40.0, 50.0], [0.0, 0.0, 63.0, 63.0]])
    with torch.no_grad():
        want, pe = model.decoder_features(emb, boxes)
        got, pe_lean = lean.decoder_features(emb, boxes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain16, _ = model.decoder_features(emb, boxes)
            got16, _ = lean16.decoder_features(emb, boxes)
    assert torch.equal(pe_lean, pe)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    err = [float((e.float() - want).norm() / want.norm()) for e in (plain16, got16)]
    assert err[1] <= 1.1 * err[0] and err[1] < 2e-2, err
