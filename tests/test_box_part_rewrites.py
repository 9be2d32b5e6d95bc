"""torch-cuda's lean box part (imedsam_cuda/box_part_rewrites.py): the same box features in fewer kernels."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from segment_anything.modeling.common import LayerNorm2d

from imedsam_cuda.box_part_rewrites import ChannelsLastNorm, freeze_dense_pe, lean_box_part


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
        assert got is model.dense_pe() and got.dtype == want.dtype and torch.equal(got, want)


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
    """decoder_features (the box part) with the rewrites: within fp32 rounding in fp32; under bf16 autocast no
    further from the fp32 features than the plain box part is (its upscaling norm now runs in fp32)."""
    model = _model()
    lean, lean16 = copy.deepcopy(model), copy.deepcopy(model)
    assert lean_box_part(lean, None) == {"dense_pe_frozen": 1, "channels_last_norms": 1, "lean_two_way": 1}
    assert lean_box_part(lean16, torch.bfloat16)["lean_two_way"] == 0  # autocast: segment-anything's forward
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


def test_host_prompt_tokens_equal_the_prompt_encoders():
    """HostPromptTokens (float64 on the host): the transformer's input tokens the prompt encoder makes, within fp32
    rounding; decoder_features from them gives the same box features, with the box as a dense mask prompt (the
    tiny model's setting) and without (vit_b's: the no-mask embedding broadcast)."""
    import dataclasses

    import numpy as np

    from imedsam_cuda.box_part_rewrites import HostPromptTokens
    from imedsam_train.build import build_from_config

    boxes = np.array([[5.0, 8.5, 40.0, 50.0], [0.0, 0.0, 63.0, 63.0], [30.0, 2.0, 31.0, 3.0]], np.float32)
    model = _model()
    torch.manual_seed(2)
    emb = torch.randn(3, 64, 4, 4)
    for mask_prompt in (True, False):
        if not mask_prompt:
            cfg = dataclasses.replace(model.cfg, decoder=dataclasses.replace(model.cfg.decoder, box_mask_prompt=False))
            torch.manual_seed(0)
            model = build_from_config(cfg)[0].eval()
        with torch.no_grad():
            sparse, _ = model.prompt_encoder(points=None, boxes=torch.from_numpy(boxes), masks=None)
            md = model.mask_decoder
            out = torch.cat([md.iou_token.weight, md.mask_tokens.weight])
            want = torch.cat([out[None].expand(3, -1, -1), sparse], dim=1)
            got = HostPromptTokens(model)(boxes)
            assert got.dtype == np.float32 and got.shape == tuple(want.shape)
            assert np.abs(got - want.numpy()).max() < 5e-6 * max(1.0, float(want.abs().max()))
            up, pe = model.decoder_features(emb, torch.from_numpy(boxes))
            up_t, pe_t = model.decoder_features(emb, torch.from_numpy(boxes), torch.from_numpy(got))
        assert torch.equal(pe_t, pe)
        torch.testing.assert_close(up_t, up, atol=2e-5, rtol=1e-5)


def test_torch_backend_with_an_fp32_box_part():
    """TorchBackend(bf16, fp32_box_part=True): the box part's layers stay fp32 (the per-point layers bf16), and its
    features from an embedding are within fp32 rounding of the fp32 backend's, where the bf16 box part is ~1%
    off; the description says it. fp32 backends ignore the option (nothing to keep)."""
    import numpy as np

    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings

    model = _model()
    boxes = np.array([[5.0, 8.5, 40.0, 50.0]], np.float32)
    torch.manual_seed(3)
    emb = torch.randn(1, 64, 4, 4)
    ups = {}
    for name, precision, fp32_box in (("fp32", "fp32", False), ("bf16", "bf16", False), ("island", "bf16", True),
                                      ("fp32 asked", "fp32", True)):
        be = TorchBackend(copy.deepcopy(model), "cpu", TorchCudaSettings(
            precision=precision, lean_box_part=True, fp32_box_part=fp32_box))
        ups[name] = be.box_features(emb, boxes).float()
        if name == "island":
            m = be.model
            assert m.mask_decoder.transformer.layers[0].self_attn.q_proj.weight.dtype == torch.float32
            assert m.mask_decoder.output_upscaling[0].weight.dtype == torch.float32
            assert be.decoder.model.image_encoder.blocks[0].mlp.lin1.weight.dtype == torch.bfloat16
            assert "fp32 box part" in be.description
        if name == "fp32 asked":
            assert not be.settings.fp32_box_part and "fp32 box part" not in be.description
    ref = ups["fp32"]
    err = {k: float((v - ref).norm() / ref.norm()) for k, v in ups.items()}
    assert err["island"] < 1e-5 and err["bf16"] > 1e-3 and err["fp32 asked"] == 0.0, err


def _transformer_inputs(model, batch=2):
    t = copy.deepcopy(model.mask_decoder.transformer)
    with torch.no_grad():  # away from the identity norms of a fresh model
        for m in t.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    c = t.embedding_dim
    torch.manual_seed(5)
    emb = torch.randn(batch, c, 4, 4)
    pe = torch.randn(1, c, 4, 4).expand(batch, -1, -1, -1)  # as decoder_features passes it
    tokens = torch.randn(batch, 7, c)
    return t, (emb, pe, tokens)


def test_the_lean_two_way_transformer_is_bitwise_segment_anythings():
    """use_lean_two_way: the same queries and keys, bitwise, in fp32 (each sum made once, lin1 + ReLU as one GEMM),
    with six ops fewer for two layers (a keys + key_pe and the MLP's ReLU a layer; the queries + pe of the second
    layer's self-attention and of the final attention); under autocast it is segment-anything's forward; switched
    off, the class's forward again."""
    from benchmarks.op_count import OpCounter
    from imedsam_cuda.box_part_rewrites import use_lean_two_way

    t, inputs = _transformer_inputs(_model())
    lean = copy.deepcopy(t)
    assert use_lean_two_way(lean) and "forward" in lean.__dict__
    with torch.no_grad():
        with OpCounter() as plain_ops:
            want = t(*inputs)
        with OpCounter() as lean_ops:
            got = lean(*inputs)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert sum(plain_ops.ops.values()) - sum(lean_ops.ops.values()) == 6, (plain_ops.ops, lean_ops.ops)
    assert lean_ops.ops["_addmm_activation"] == 2 and "relu" not in lean_ops.ops
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for a, b in zip(lean(*inputs), t(*inputs), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert not use_lean_two_way(lean, False) and "forward" not in lean.__dict__
    with pytest.raises(TypeError, match="not segment-anything's TwoWayTransformer"):
        use_lean_two_way(torch.nn.Linear(2, 2))


def test_the_backend_runs_the_lean_two_way_transformer_only_without_autocast():
    """lean_box_part installs the lean transformer where the box part runs without autocast (fp32, or bf16 with an
    fp32 box part), not for a bf16 box part; the box features are within fp32 rounding of the plain box part's."""
    import numpy as np

    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings

    model = _model()
    boxes = np.array([[5.0, 8.5, 40.0, 50.0]], np.float32)
    torch.manual_seed(3)
    emb = torch.randn(1, 64, 4, 4)
    ups, lean = {}, {}
    for name, precision, lean_box, fp32_box in (("plain", "fp32", False, False), ("fp32", "fp32", True, False),
                                                ("island", "bf16", True, True), ("bf16", "bf16", True, False)):
        be = TorchBackend(copy.deepcopy(model), "cpu", TorchCudaSettings(
            precision=precision, lean_box_part=lean_box, fp32_box_part=fp32_box))
        ups[name] = be.box_features(emb, boxes).float()
        lean[name] = "forward" in be.model.mask_decoder.transformer.__dict__
    assert lean == {"plain": False, "fp32": True, "island": True, "bf16": False}
    ref = ups["plain"]
    assert float((ups["fp32"] - ref).norm() / ref.norm()) < 1e-6
    assert float((ups["island"] - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("lean_box", [True, False])
def test_the_box_precision_switched_at_run_time_is_bitwise_a_backend_built_so(lean_box):
    """configure(fp32_box_part=True) on a bf16 backend gives bitwise the box features of one built with
    fp32_box_part=True (its fp32 weights kept, the host tokens, the lean transformer where lean_box_part, the
    frozen map made without autocast), and configure(fp32_box_part=False) bitwise those of the bf16 box part again;
    the per-point layers stay bf16 throughout. An fp32 backend refuses it in one line (the tuner's 'not tried')."""
    import numpy as np

    from imedsam_core.errors import UserError
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings

    model = _model()
    boxes = np.array([[5.0, 8.5, 40.0, 50.0], [0.0, 3.0, 63.0, 20.5]], np.float32)
    torch.manual_seed(3)
    emb = torch.randn(1, 64, 4, 4)

    def built(fp32_box: bool):
        return TorchBackend(copy.deepcopy(model), "cpu", TorchCudaSettings(
            precision="bf16", lean_box_part=lean_box, fp32_box_part=fp32_box))

    want = {fp32: built(fp32).box_features(emb, boxes) for fp32 in (False, True)}
    assert want[True].dtype == want[False].dtype == torch.float32 and not torch.equal(want[True], want[False])
    # a backend built with the fp32 box part switches it on through the same call: its features are checked
    # against an fp32 backend's too, which shares none of that code
    fp32_be = TorchBackend(copy.deepcopy(model), "cpu", TorchCudaSettings(
        precision="fp32", lean_box_part=lean_box))
    ref = fp32_be.box_features(emb, boxes)
    assert float((want[True] - ref).norm() / ref.norm()) < 1e-5 < float((want[False] - ref).norm() / ref.norm())
    be = built(False)
    for fp32 in (True, False, True):
        be.configure(replace(be.settings, fp32_box_part=fp32))
        assert be.settings.fp32_box_part == fp32 and ("fp32 box part" in be.description) == fp32
        assert torch.equal(be.box_features(emb, boxes), want[fp32])  # the box part's memo was dropped too
        assert ("forward" in be.model.mask_decoder.transformer.__dict__) == (fp32 and lean_box)
        assert be.model.mask_decoder.output_upscaling[0].weight.dtype == (torch.float32 if fp32 else torch.bfloat16)
        assert be.decoder.first.weight.dtype == torch.bfloat16
    with pytest.raises(UserError, match="backend torch-cpu: fp32 box part: the backend runs in fp32 already"):
        fp32_be.configure(replace(fp32_be.settings, fp32_box_part=True))
    fp32_be.configure(replace(fp32_be.settings, fp32_box_part=False))  # nothing to do
    assert not fp32_be.settings.fp32_box_part
