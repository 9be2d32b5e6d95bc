"""The I-MedSAM model: structure, LoRA, frequency adapter, UGS, resolution freedom."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imedsam_core.contract import refine_count
from imedsam_train.build import build
from imedsam_train.config import preset
from imedsam_train.model import IMedSAM, grid_coords, to_maps, ugs_merge
from imedsam_train.model.frequency import spectrum
from imedsam_train.model.lora import LoRAQKV

from .conftest import SHARED_DATA, read_mask, read_rgb

S = 128  # tiny tests run at 128 x 128 input (8 x 8 tokens)


def tiny(**kw) -> IMedSAM:
    torch.manual_seed(0)
    return IMedSAM(preset("tiny", input_size=S).replace(**kw))


def randomise_lora(model: IMedSAM) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAQKV):
                m.lora_b_q.normal_(0, 0.05)
                m.lora_b_v.normal_(0, 0.05)


def test_forward_backward_and_freeze_policy():
    model = tiny(trainable="adapters")
    model.train()
    img = torch.rand(2, 3, S, S)
    boxes = torch.tensor([[10.0, 12, 90, 100], [30, 5, 120, 60]])
    out = model(img, boxes, out_size=(32, 32))
    assert out.coarse.shape == out.fine.shape == out.uncertainty.shape == (2, 1, 32 * 32)
    (out.coarse.mean() + out.fine.mean()).backward()
    for name, p in model.named_parameters():
        if model.is_trainable_name(name):
            assert p.requires_grad, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # every adapter kind actually receives gradient
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["image_encoder.blocks.0.attn.qkv.lora_b_q"].abs().sum() > 0
    assert grads["image_encoder.blocks.0.freq.up.weight"].abs().sum() > 0
    assert grads["inr.fine_head.weight"].abs().sum() > 0
    assert grads["mask_decoder.output_upscaling.0.weight"].abs().sum() > 0
    assert not model.image_encoder.blocks[0].mlp.lin1.weight.requires_grad


def test_trainable_all_trains_the_encoder_but_not_unused_heads():
    model = tiny(trainable="all")
    assert model.image_encoder.blocks[0].mlp.lin1.weight.requires_grad
    assert not any(p.requires_grad for p in model.mask_decoder.iou_prediction_head.parameters())


@pytest.mark.parametrize("gate", [False, True])
def test_lora_merge_matches_unmerged_and_is_idempotent(gate):
    model = tiny(lora=preset("tiny").lora.__class__(rank=4, gate=gate)).eval()
    randomise_lora(model)
    img = torch.rand(1, 3, S, S)
    with torch.no_grad():
        ref = model.encode(img)
    if gate:
        with pytest.raises(RuntimeError, match="gate"):
            model.merge_lora()
        return
    assert model.merge_lora() == model.cfg.encoder.depth
    with torch.no_grad():
        merged = model.encode(img)
        w = model.image_encoder.blocks[0].attn.qkv.weight.clone()
        model.merge_lora()  # second merge: nothing changes
        twice = model.encode(img)
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-4)  # fp32 re-association only
    assert torch.equal(model.image_encoder.blocks[0].attn.qkv.weight, w)
    assert torch.equal(twice, merged)
    # a merged state dict loaded into an unmerged model gives the same function (B was zeroed)
    fresh = tiny().eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(img), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("grid", "window"), [(24, 14), (28, 14), (24, 0)])
def test_encoder_block_equals_segment_anythings_block(grid, window, fused):
    """Our Block (windowed attention without projecting the padding tokens) vs segment-anything's own Block,
    vit_b widths: padded windows (24 -> 28 tokens at 384 px), unpadded windows, and global attention; with
    the explicit GEMMs (exported) and as one scaled_dot_product_attention call (torch-cuda)."""
    from segment_anything.modeling.image_encoder import Block as SamBlock

    from imedsam_cuda.encoder_attention import InferenceAttention, inference_attention
    from imedsam_train.config import FrequencyConfig, LoraConfig
    from imedsam_train.model.encoder import Block

    torch.manual_seed(0)
    sam = SamBlock(768, 12, use_rel_pos=True, window_size=window, input_size=(grid, grid)).eval()
    ours = Block(768, 12, 4.0, window, grid, LoraConfig(enabled=False), FrequencyConfig(enabled=False)).eval()
    with torch.no_grad():
        for p in sam.parameters():
            p.normal_(0, 0.05)
    assert ours.load_state_dict(sam.state_dict(), strict=True)
    if fused:  # torch-cuda's inference form: the trained layers, shared
        assert inference_attention(ours, True, None) == 1
    x = torch.randn(2, grid, grid, 768)
    with torch.no_grad():
        ref = sam(x)
        out, _ = ours(x, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16, _ = ours(x, None)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    # torch-cuda's inference copy precomputes the position tables (gathered, padded, in the queries' dtype):
    # the same values, so bitwise the same output, in fp32 and under bf16 autocast
    for dtype, want in ((torch.float32, out), (torch.bfloat16, out16)):
        assert inference_attention(ours, fused, dtype) == 1
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            got, _ = ours(x, None)
        assert isinstance(ours.attn, InferenceAttention) and ours.attn.frozen is not None
        assert torch.equal(got, want)


@pytest.mark.parametrize("downsample", [1, 2])
def test_prompt_attention_as_sdpa_equals_segment_anythings(downsample):
    """torch-cuda's box part runs segment-anything's two-way transformer attention as one SDPA call: the same
    function to fp32 rounding (token-to-image and image-to-token shapes), and switching back restores it."""
    from segment_anything.modeling.transformer import Attention as SamAttention

    from imedsam_cuda.prompt_attention import use_fused_prompt_attention

    torch.manual_seed(0)
    attn = SamAttention(256, 8, downsample).eval()
    tokens, image = torch.randn(2, 7, 256), torch.randn(2, 576, 256)
    with torch.no_grad():
        ref = [attn(tokens, image, image), attn(image, tokens, tokens)]
        assert use_fused_prompt_attention(attn, True) == 1
        got = [attn(tokens, image, image), attn(image, tokens, tokens)]
        use_fused_prompt_attention(attn, False)
        back = attn(tokens, image, image)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert torch.equal(back, ref[0]) and "forward" not in attn.__dict__


def test_lora_only_touches_query_and_value():
    q = LoRAQKV(16, 2)
    with torch.no_grad():
        q.lora_b_q.normal_()
        q.lora_b_v.normal_()
    d = q.delta_weight()
    assert d[16:32].abs().sum() == 0 and d[:16].abs().sum() > 0 and d[32:].abs().sum() > 0


def test_frequency_amplitude_matches_numpy(shared_data):
    rgb = read_rgb(next((shared_data / "Kvasir-Sessile" / "images").glob("*.jpg")))
    img = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=(S, S), mode="bilinear", align_corners=False)
    got = spectrum(img, channel=0, mode="amplitude")[0, 0].numpy()
    a = np.abs(np.fft.fftshift(np.fft.fft2(img[0, 0].double().numpy())))
    ref = (a - a.min()) / (a.max() - a.min())
    np.testing.assert_allclose(got, ref, atol=1e-5)
    ph = spectrum(img, channel=0, mode="phase")[0, 0].numpy()
    p = np.angle(np.fft.fftshift(np.fft.fft2(img[0, 0].double().numpy())))
    # phase is ill-defined where the amplitude vanishes; compare where it does not
    mask = a > 1e-3 * a.max()
    np.testing.assert_allclose(ph[mask], ((p - p.min()) / (p.max() - p.min()))[mask], atol=1e-4)


@pytest.mark.parametrize("mode,enabled", [("phase", True), ("amplitude", False)])
def test_frequency_options_run(mode, enabled):
    freq = preset("tiny").frequency.__class__(enabled=enabled, mode=mode)
    model = tiny(frequency=freq).eval()
    assert (model.image_encoder.blocks[0].freq is None) == (not enabled)
    with torch.no_grad():
        out = model(torch.rand(1, 3, S, S), torch.tensor([[10.0, 10, 100, 100]]), out_size=(16, 16))
    assert torch.isfinite(out.fine).all()


def _trained_tiny(steps: int = 40) -> tuple[IMedSAM, torch.Tensor, torch.Tensor]:
    """Overfit a tiny model on one real Kvasir-Sessile image so its masks mean something."""
    stem = "cju0qoxqj9q6s0835b43399p4"
    d = SHARED_DATA / "Kvasir-Sessile"
    rgb, mask = read_rgb(d / "images" / f"{stem}.jpg"), read_mask(d / "masks" / f"{stem}.jpg")
    img = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255, size=(S, S), mode="bilinear")
    m = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(S, S), mode="nearest")[0, 0]
    ys, xs = torch.nonzero(m, as_tuple=True)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    model = tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    coords = grid_coords(S, S)
    target = m.reshape(1, 1, -1)
    model.train()
    for _ in range(steps):
        out = model(img, box, coords=coords)
        loss = F.binary_cross_entropy_with_logits(out.coarse, target) + F.binary_cross_entropy_with_logits(
            out.fine, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), img, box


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return _trained_tiny()


def test_eval_uncertainty_is_real_and_refines_top_k(trained):
    model, img, box = trained
    with torch.no_grad():
        a = model(img, box, out_size=(64, 64))
        b = model(img, box, out_size=(64, 64))
    u = a.uncertainty[0, 0]
    assert u.min() >= 0 and u.std() > 0 and len(torch.unique(u)) > 64 * 64 // 2
    k = refine_count(64 * 64, model.cfg.decoder.refine_fraction)
    assert k == 512
    assert int(a.refined.sum()) == k
    top = set(u.topk(k).indices.tolist())
    assert set(torch.nonzero(a.refined[0, 0]).flatten().tolist()) == top
    assert torch.equal(a.fine, b.fine) and torch.equal(a.uncertainty, b.uncertainty)  # deterministic
    # fine differs from coarse only on refined points
    changed = a.fine != a.coarse
    assert not (changed & ~a.refined).any()
    # the export contract (fine at every point, then merge) gives the same result
    with torch.no_grad():
        emb = model.encode(img)
        coarse, fine_all, unc = model.decode_dense(emb, box, grid_coords(64, 64)[None])
    torch.testing.assert_close(ugs_merge(coarse, fine_all, unc, model.cfg.decoder.refine_fraction), a.fine)


def test_closed_form_uncertainty_matches_mc_dropout(trained):
    """The eval estimator's logit variance equals the empirical variance over many dropout masks."""
    model, img, box = trained
    inr = model.inr
    with torch.no_grad():
        up, pe = model.decoder_features(model.encode(img), box)
        feats = model.point_features(up, pe, grid_coords(16, 16)[None])
        from imedsam_train.model.inr import run_pointwise

        h = run_pointwise(inr.coarse_trunk, feats)
        torch.manual_seed(1)
        zs = torch.stack([inr.coarse_head(F.dropout(h, inr.p, training=True))[..., 0] for _ in range(4000)])
        w = inr.coarse_head.weight[0]
        closed = (inr.p / (1 - inr.p)) * (h * h) @ (w * w)
    rel = (zs.var(0) - closed).abs() / closed.clamp_min(1e-6)
    assert rel.median() < 0.1
    torch.testing.assert_close(zs.mean(0), inr.coarse_head(h)[..., 0], atol=0.15 * float(closed.sqrt().max()), rtol=0)


def test_arbitrary_coordinates_match_the_grid(trained):
    model, img, box = trained
    coords = grid_coords(32, 32)
    perm = torch.randperm(coords.shape[0])
    with torch.no_grad():
        emb = model.encode(img)
        full = model.decode_dense(emb, box, coords[None])
        some = model.decode_dense(emb, box, coords[perm][None])
        one = model.decode_dense(emb, box, coords[perm[:1]][None])
    for f, s in zip(full, some, strict=True):
        torch.testing.assert_close(f[..., perm], s, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one[0], full[0][..., perm[:1]], atol=1e-5, rtol=1e-4)


def test_masks_agree_across_output_resolutions(trained):
    model, img, box = trained
    masks = {}
    with torch.no_grad():
        for r in (64, 128, 256):
            out = model(img, box, out_size=(r, r))
            masks[r] = to_maps(out.fine, r, r) > 0
    ref = masks[256].float()
    assert ref.mean() > 0.02  # the model learned a real, non-empty mask
    for r in (64, 128):
        up = F.interpolate(masks[r].float(), size=(256, 256), mode="nearest")
        agree = (up == ref).float().mean()
        inter = (up * ref).sum()
        dice = 2 * inter / (up.sum() + ref.sum())
        assert agree > 0.97 and dice > 0.9, (r, float(agree), float(dice))


def test_multiclass_heads():
    model = tiny(num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, S, S), torch.tensor([[1.0, 1, 60, 60], [20, 20, 120, 90]]), out_size=(16, 16))
    assert out.fine.shape == (2, 3, 256)
    assert (out.refined.sum(-1) == refine_count(256, 0.125)).all()


def test_vit_b_trainable_parameters_in_paper_range():
    model, _ = build("vit_b")
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 1_500_000 <= n <= 1_700_000, n


def test_box_mask_prompt_rasterises_the_box_and_conditions_features():
    model = tiny().eval()
    assert model.cfg.decoder.box_mask_prompt  # the tiny (from-scratch) preset uses it; SAM sizes do not
    assert not preset("vit_b").decoder.box_mask_prompt
    boxes = torch.tensor([[16.0, 32, 64, 96], [0, 0, 128, 128]])
    m = model.box_mask(boxes)
    assert m.shape == (2, 1, 32, 32)
    cell = 128 / 32  # cell centres at (i + 0.5) * 4
    inside = m[0, 0] > 0
    ys, xs = torch.nonzero(inside, as_tuple=True)
    assert (xs.min() + 0.5) * cell >= 16 and (xs.max() + 0.5) * cell <= 64
    assert (ys.min() + 0.5) * cell >= 32 and (ys.max() + 0.5) * cell <= 96
    assert int(inside.sum()) == 12 * 16 and bool((m[1] > 0).all())
    emb = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        up_a, _ = model.decoder_features(emb, boxes[:1])
        plain = IMedSAM(preset("tiny", input_size=S).replace(
            decoder=preset("tiny").decoder.__class__(**{**model.cfg.decoder.__dict__, "box_mask_prompt": False})))
        plain.load_state_dict(model.state_dict())
        up_b, _ = plain.eval().decoder_features(emb, boxes[:1])
    assert not torch.allclose(up_a, up_b)  # the dense prompt reaches the features
