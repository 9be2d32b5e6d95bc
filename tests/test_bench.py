"""Benchmark suite: the reference is our function computed the slow way, the sparse planner's
agreement, the torch backend's CPU path, and imedsam-bench's documented outputs. Never asserts timings."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from imedsam_core.errors import UserError
from imedsam_cuda.reference import ReferenceIMedSAM, host_spectrum
from imedsam_deploy.cli_bench import app
from imedsam_deploy.sparse import SparseConfig, box_region, dense_decode, sparse_decode
from imedsam_train.checkpoint import model_payload, save_checkpoint
from imedsam_train.config import LoraConfig, preset
from imedsam_train.model import IMedSAM
from imedsam_train.model.frequency import spectrum
from imedsam_train.model.lora import LoRAQKV

from .conftest import SAMPLE_DATA, read_mask, read_rgb

S = 128
SR = 64  # reference-equality tests run smaller: the comparison is exact at any size


def tiny(seed: int = 0, size: int = S, **kw) -> IMedSAM:
    torch.manual_seed(seed)
    m = IMedSAM(preset("tiny", input_size=size).replace(**kw)).eval()
    with torch.no_grad():  # non-zero LoRA updates: the reference computes them unmerged
        for mod in m.modules():
            if isinstance(mod, LoRAQKV):
                mod.lora_b_q.normal_(0, 0.05)
                mod.lora_b_v.normal_(0, 0.05)
    return m


def sample(i: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real Kvasir-Sessile image, its mask and the mask's tight box (image pixels)."""
    stem = sorted(p.stem for p in (SAMPLE_DATA / "images").iterdir())[i]
    rgb = read_rgb(SAMPLE_DATA / "images" / f"{stem}.jpg")
    mask = read_mask(next((SAMPLE_DATA / "masks").glob(f"{stem}.*")))
    ys, xs = np.nonzero(mask)
    return rgb, mask, np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


# ---------------------------------------------------------------- reference
@pytest.mark.parametrize("gate", [False, True])
def test_reference_computes_the_same_function_as_the_model(gate):
    model = tiny(size=SR, lora=LoraConfig(rank=4, gate=gate))
    if gate:
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, LoRAQKV) and mod.gate is not None:
                    mod.gate.bias.fill_(0.7)
    ref = ReferenceIMedSAM(model)
    img = torch.rand(2, 3, SR, SR)
    boxes = torch.tensor([[5.0, 6, 45, 50], [15, 2, 60, 30]])
    with torch.no_grad():
        ours = model(img, boxes, out_size=(80, 96)).fine
        theirs = ref(img, boxes, (80, 96))
        # the host numpy FFT is the device FFT's twin
        torch.testing.assert_close(host_spectrum(img, 0), spectrum(img, 0), atol=1e-5, rtol=1e-4)
    assert theirs.shape == ours.shape == (2, 1, 80 * 96)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert ((theirs > 0) == (ours > 0)).float().mean() == 1.0


# ---------------------------------------------------------------- sparse planner
def _torch_decode(model: IMedSAM, image: np.ndarray, box_model: np.ndarray):
    with torch.no_grad():
        emb = model.encode(torch.from_numpy(image)[None])
    b = torch.from_numpy(box_model[None].astype(np.float32))

    def decode(coords: np.ndarray):
        with torch.no_grad():
            c, f, u = model.decode_dense(emb, b, torch.from_numpy(coords)[None])
        return c[0].numpy(), f[0].numpy(), u[0].numpy()

    return decode


def test_sparse_planner_is_exact_on_a_smooth_field_and_queries_few_points():
    def decode(c: np.ndarray):
        r = np.hypot(c[:, 0] - 0.1, c[:, 1] + 0.05)
        coarse = 10 * (0.3 - r)[None]
        fine = coarse + np.where(r < 0.31, 0.5, -0.5)[None]  # heads disagree only in a thin ring
        return coarse.astype(np.float32), fine.astype(np.float32), np.exp(-coarse**2).astype(np.float32)

    size = (384, 384)
    region = box_region((100, 90, 300, 280), size, 16)
    dense = dense_decode(decode, size, 0.125, region)
    res = sparse_decode(decode, size, 0.125, region, SparseConfig(stride=8, dilate=1))
    assert res.mask.shape == dense.shape == (1, 384, 384)
    assert (res.mask == dense).all()
    assert dense.sum() > 5000
    assert res.queried < 0.2 * res.region_pixels


def test_sparse_planner_finds_a_small_object_in_a_small_box():
    """A 5-pixel disc filling most of its 8-pixel box on a 256² output (a small organ section on CT): the
    box + margin region is 12 pixels wide, so a first lattice at stride 8 put its only cell corners on
    background and the planner returned an empty mask (LiteMedSAM's zero-shot export lost 14 of 343 organ
    sections of the shared CT volume that way). The first lattice now has ``min_cells_across`` (8) cells across
    the region's narrower side, so it finds the disc exactly as the full grid does, on every placement tried;
    with that floor off it misses every one."""
    from imedsam_deploy.sparse import initial_stride

    size = (256, 256)
    assert SparseConfig().min_cells_across == 8
    assert [initial_stride(8, h, w, 8) for h, w in ((12, 12), (40, 300), (64, 64), (100, 30))] == [1, 4, 8, 2]
    assert initial_stride(8, 12, 12) == 8  # without the floor: the region's only cell
    for cx, cy in ((101.5, 77.5), (130.0, 130.0), (66.5, 201.0), (200.25, 33.75)):
        def decode(c: np.ndarray, cx: float = cx, cy: float = cy):
            px, py = (c[:, 0] + 1) * size[1] / 2, (c[:, 1] + 1) * size[0] / 2  # back to output pixels
            lg = (2.5 - np.hypot(px - cx, py - cy))[None].astype(np.float32)
            return lg, lg, np.zeros_like(lg)

        region = box_region((cx - 4, cy - 4, cx + 4, cy + 4), size, 2)
        dense = dense_decode(decode, size, 0.125, region)
        res = sparse_decode(decode, size, 0.125, region, SparseConfig())
        assert dense.sum() >= 12
        assert (res.mask == dense).all(), (cx, cy, int(res.mask.sum()), int(dense.sum()))
        assert not sparse_decode(decode, size, 0.125, region, SparseConfig(min_cells_across=0)).mask.any()


def test_sparse_fill_matches_a_per_pixel_oracle(monkeypatch):
    """The block-view fill of settled cells against a per-pixel loop over its documented rule, on every
    call of random planner runs (odd region sizes, several strides, dilations and classes)."""
    from imedsam_deploy import sparse

    real = sparse._fill_settled
    calls = {"n": 0, "filled": 0}

    def checked(dec: np.ndarray, val: np.ndarray, settled: np.ndarray, s: int) -> None:
        d0, v0 = dec.copy(), val.copy()
        real(dec, val, settled, s)
        want_d, want_v = d0.copy(), v0.copy()
        nr, nc = settled.shape
        for a, b in zip(*np.nonzero(settled), strict=True):
            y0, x0 = a * s, b * s
            for dy in range(s + (a == nr - 1)):  # the far edges belong to the last cells
                for dx in range(s + (b == nc - 1)):
                    if (dy, dx) in ((0, 0), (s, s), (0, s), (s, 0)):
                        continue  # lattice points: evaluated
                    ty, tx = dy / s, dx / s
                    v = ((1 - ty) * (1 - tx) * v0[:, y0, x0] + (1 - ty) * tx * v0[:, y0, x0 + s]
                         + ty * (1 - tx) * v0[:, y0 + s, x0] + ty * tx * v0[:, y0 + s, x0 + s])
                    dd = d0[:, y0, x0]
                    want_d[:, y0 + dy, x0 + dx] = dd
                    want_v[:, y0 + dy, x0 + dx] = np.where(dd, np.maximum(v, 1e-6), np.minimum(v, 0.0))
                    calls["filled"] += 1
        np.testing.assert_array_equal(dec, want_d)
        np.testing.assert_allclose(val, want_v, rtol=1e-6, atol=1e-6)
        assert ((val > 0) == dec).all() or not settled.any()
        calls["n"] += 1

    monkeypatch.setattr(sparse, "_fill_settled", checked)
    rng = np.random.default_rng(0)
    for trial in range(12):
        H, W, K = int(rng.integers(20, 90)), int(rng.integers(20, 90)), 1 + trial % 2
        cx, cy, rad = rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.15, 0.5)

        def decode(c: np.ndarray, cx=cx, cy=cy, rad=rad, K=K):
            lg = np.stack([(rad - np.hypot(c[:, 0] - cx, c[:, 1] - cy - 0.1 * k)) * 20
                           + 0.5 * np.sin(9 * c[:, 0]) for k in range(K)])
            return lg.astype(np.float32), (lg + 0.2 * np.sin(7 * c[:, 1])).astype(np.float32), np.exp(-lg**2)
        r0, c0 = int(rng.integers(0, H // 3)), int(rng.integers(0, W // 3))
        region = (r0, int(rng.integers(r0 + 2, H + 1)), c0, int(rng.integers(c0 + 2, W + 1)))
        cfg = SparseConfig(stride=int(rng.choice([2, 4, 8])), dilate=int(rng.integers(0, 2)))
        res = sparse_decode(decode, (H, W), 0.125, region, cfg)
        assert res.logits is not None and ((res.logits > 0) == res.mask[:, r0 : region[1], c0 : region[3]]).all()
    assert calls["n"] > 10 and calls["filled"] > 1000  # the oracle really ran


def test_sparse_planner_agreement_on_a_real_image_tiny_model():
    """Random-weight tiny model on a real Kvasir image: a box-shaped mask with speckled edges (high
    Fourier frequencies, no training), the planner's worst case. Stated threshold: >= 99% of the pixels
    inside the box agree with the full grid at stride 4, querying under half of the region."""
    from imedsam_deploy.preprocess import box_to_model, to_model_input

    model = tiny(seed=0)
    rgb, _, box = sample(0)
    h, w = rgb.shape[:2]
    decode = _torch_decode(model, to_model_input(rgb, S), box_to_model(box[None], (h, w), S)[0])
    out = (128, 128)
    bo = box * [out[1] / w, out[0] / h, out[1] / w, out[0] / h]
    region = box_region(tuple(bo), out, 8)
    dense = dense_decode(decode, out, 0.125, region)
    res = sparse_decode(decode, out, 0.125, region, SparseConfig(stride=4, dilate=1))
    r0, r1, c0, c1 = int(bo[1]), int(np.ceil(bo[3])), int(bo[0]), int(np.ceil(bo[2]))
    inside = (res.mask[:, r0:r1, c0:c1] == dense[:, r0:r1, c0:c1]).mean()
    assert inside >= 0.99, inside
    assert res.queried < 0.5 * res.region_pixels
    assert not res.mask[:, : region[0]].any()  # outside the region: background, never queried


# ---------------------------------------------------------------- torch backend (CPU path)
def test_torch_backend_cpu_path_matches_the_model():
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings

    model = tiny()
    be = TorchBackend(model, "cpu", TorchCudaSettings(precision="fp32"))
    img = np.random.default_rng(0).random((2, 3, S, S), dtype=np.float32)
    embs = be.encode(img)
    assert len(embs) == 2
    boxes = np.array([[10, 12, 90, 100]], np.float32)
    coords = np.random.default_rng(1).uniform(-1, 1, (1, 300, 2)).astype(np.float32)
    c, f, u = be.decode(embs[1], boxes, coords)
    with torch.no_grad():
        emb = model.encode(torch.from_numpy(img))
        rc, rf, ru = model.decode_dense(emb[1:], torch.from_numpy(boxes), torch.from_numpy(coords))
    np.testing.assert_allclose(embs[1].numpy(), emb[1:].numpy(), atol=1e-4)
    host = be.host_embedding(embs[1])  # the video tracker's appearance check reads it
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    np.testing.assert_allclose(host, emb[1:].numpy(), atol=1e-4)
    np.testing.assert_allclose(c, rc.numpy(), atol=1e-4)
    np.testing.assert_allclose(f, rf.numpy(), atol=1e-4)
    np.testing.assert_allclose(u, ru.numpy(), rtol=1e-3, atol=1e-7)
    # the zero-padded decoder layers (on by default on CUDA only): the same outputs, and back again
    assert not be.settings.align_matmuls and "aligned" not in be.description
    be.configure(replace(be.settings, align_matmuls=True))
    assert "aligned decoder matmuls" in be.description
    for got, want in zip(be.decode(embs[1], boxes, coords), (c, f, u), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    be.configure(replace(be.settings, align_matmuls=False))
    assert be.decoder.aligned is None and np.array_equal(be.decode(embs[1], boxes, coords)[0], c)
    # the ReLU epilogues (on by default on CUDA only): the same outputs, and back again
    assert not be.settings.relu_epilogue and "ReLU epilogues" not in be.description
    be.configure(replace(be.settings, relu_epilogue=True))
    assert be.decoder.relu_epilogue and "ReLU epilogues" in be.description
    for got, want in zip(be.decode(embs[1], boxes, coords), (c, f, u), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    be.configure(replace(be.settings, relu_epilogue=False))
    assert np.array_equal(be.decode(embs[1], boxes, coords)[0], c)
    with pytest.raises(UserError, match="CUDA graphs"):
        TorchBackend(model, "cpu", TorchCudaSettings(cuda_graphs=True))


def test_point_bucket_bounds_the_captured_shapes():
    from imedsam_cuda.torch_cuda import POINT_BUCKET_MIN, point_bucket

    got = {n: point_bucket(n, 65536) for n in [*range(1, 65537, 7), 1024, 1025, 65535, 65536]}
    assert all(b >= n for n, b in got.items())  # room for every point
    assert all(b < 1.25 * n or b == POINT_BUCKET_MIN for n, b in got.items())  # under 25% padding
    assert len(set(got.values())) == 25  # 25 graphs for any N <= 65536
    assert [point_bucket(n, 65536) for n in (1025, 1300, 2049, 40000)] == [1280, 1536, 2560, 40960]
    assert point_bucket(3000, 3000) == 3000  # capped at max_points
    with pytest.raises(ValueError, match="max_points"):
        point_bucket(3001, 3000)


def test_torch_backend_padded_split_decode_is_exact_and_memoises_the_box_part():
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings

    model = tiny()
    plain = TorchBackend(model, "cpu", TorchCudaSettings(precision="fp32"))
    padded = TorchBackend(model, "cpu", TorchCudaSettings(precision="fp32", bucket_points=True))
    keys: list[tuple] = []
    run = padded._run
    padded._run = lambda key, fn, inputs: keys.append(key) or run(key, fn, inputs)  # type: ignore[method-assign]
    img = np.random.default_rng(0).random((1, 3, S, S), dtype=np.float32)
    e_plain, e_pad = plain.encode(img)[0], padded.encode(img)[0]
    box = np.array([[10, 12, 90, 100]], np.float32)
    for n in (1, 300, 1500, 4000):
        coords = np.random.default_rng(n).uniform(-1, 1, (1, n, 2)).astype(np.float32)
        for a, b in zip(plain.decode(e_plain, box, coords), padded.decode(e_pad, box, coords), strict=True):
            assert b.shape == (1, model.cfg.num_classes, n)
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    point_shapes = {k[2][1] for k in keys if k[0] == "points"}
    assert point_shapes == {1024, 1536, 4096}  # 1 and 300 share the smallest bucket
    assert [k[0] for k in keys].count("prompt") == 1  # one box part for four decodes of the same box
    padded.decode(e_pad, box + 1, coords[:, :10])  # another box: the box part runs again
    padded.decode(padded.encode(img)[0], box + 1, coords[:, :10])  # a new embedding: again
    assert [k[0] for k in keys].count("prompt") == 3


def test_torch_backend_captured_functions_copy_nothing_from_the_host(monkeypatch):
    """The functions torch-cuda captures in CUDA graphs (encoder, box part, per-point part) create no tensor
    from host data: a host-to-device copy during capture is an error there. Checked on the CPU by refusing
    torch.tensor / as_tensor / from_numpy while they run."""
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings

    be = TorchBackend(tiny(), "cpu", TorchCudaSettings(precision="fp32"))

    def refuse(*a, **k):
        raise AssertionError("host data copied to the device inside a captured function")

    calls = []
    for key, fn in list(be._fns.items()):
        def guarded(*args, fn=fn, key=key):
            calls.append(key)
            with monkeypatch.context() as m:
                for name in ("tensor", "as_tensor", "from_numpy"):
                    m.setattr(torch, name, refuse)
                return fn(*args)
        be._fns[key] = guarded
    img = np.random.default_rng(0).random((1, 3, S, S), dtype=np.float32)
    coords = np.random.default_rng(1).uniform(-1, 1, (1, 50, 2)).astype(np.float32)
    be.decode(be.encode(img)[0], np.array([[10, 12, 90, 100]], np.float32), coords)
    assert calls == ["enc", "prompt", "points"]


def test_torch_backend_stores_weights_in_the_autocast_dtype_bitwise_exactly(monkeypatch):
    """bf16 backend: Linear / conv weights and biases stored in bf16 (no per-call autocast casts), outputs
    bitwise those of letting autocast cast the fp32 weights and biases."""
    from imedsam_cuda import torch_cuda
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings

    model = tiny()
    stored = TorchBackend(model, "cpu", TorchCudaSettings(precision="bf16"))
    with monkeypatch.context() as m:
        m.setattr(torch_cuda, "store_weights_in", lambda module, dtype: 0)
        cast_per_call = TorchBackend(model, "cpu", TorchCudaSettings(precision="bf16"))
    linears = [mod for mod in stored.decoder.modules() if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d)]
    assert len(linears) > 20 and all(mod.weight.dtype == torch.bfloat16 for mod in linears)
    assert all(mod.bias.dtype == torch.bfloat16 for mod in linears if mod.bias is not None)
    assert all(mod.weight.dtype == torch.float32 for mod in cast_per_call.decoder.modules()
               if isinstance(mod, torch.nn.Linear))
    img = np.random.default_rng(0).random((1, 3, S, S), dtype=np.float32)
    box = np.array([[10, 12, 90, 100]], np.float32)
    coords = np.random.default_rng(1).uniform(-1, 1, (1, 400, 2)).astype(np.float32)
    ea, eb = stored.encode(img)[0], cast_per_call.encode(img)[0]
    assert torch.equal(ea, eb)
    for a, b in zip(stored.decode(ea, box, coords), cast_per_call.decode(eb, box, coords), strict=True):
        np.testing.assert_array_equal(a, b)


def test_torch_backend_compiles_whole_graphs():
    """compile=... captures each function whole (fullgraph=True: a graph break is an error; the fused attention
    included), and the compiled backend computes the same as the eager one. aot_eager: the capture without code
    generation."""
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings

    model = tiny()
    eager = TorchBackend(model, "cpu", TorchCudaSettings(precision="fp32"))
    comp = TorchBackend(model, "cpu", TorchCudaSettings(
        precision="fp32", compile="aot_eager", fused_attention=True, align_matmuls=True, lean_encoder=True,
        lean_box_part=True, relu_epilogue=True))  # as on CUDA: the padded layers, lean forms and epilogues traced too
    assert "torch.compile" in comp.description and "torch.compile" not in eager.description
    img = np.random.default_rng(0).random((1, 3, S, S), dtype=np.float32)
    box = np.array([[10, 12, 90, 100]], np.float32)
    coords = np.random.default_rng(1).uniform(-1, 1, (1, 500, 2)).astype(np.float32)
    ea, ca = eager.encode(img)[0], comp.encode(img)[0]
    np.testing.assert_allclose(ca.numpy(), ea.numpy(), atol=1e-5)
    for a, b in zip(eager.decode(ea, box, coords), comp.decode(ca, box, coords), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_torch_backend_encoder_options_are_exact(monkeypatch):
    """torch-cuda's encoder options on the CPU (same code): attention as one scaled_dot_product_attention call
    (to fp32 rounding; the box part's attentions too), the frequency chain issued first (bitwise: the same
    operations), and both; the decoder's outputs from those embeddings agree likewise."""
    from imedsam_cuda.encoder_loop import InferenceEncoder
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings

    calls = {"sdpa": 0, "first": 0}
    sdpa, first = torch.nn.functional.scaled_dot_product_attention, InferenceEncoder.frequency_chain_first

    def count_sdpa(*a, **k):
        calls["sdpa"] += 1
        return sdpa(*a, **k)

    def count_first(*a, **k):
        calls["first"] += 1
        return first(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", count_sdpa)
    monkeypatch.setattr(InferenceEncoder, "frequency_chain_first", count_first)
    model = tiny()
    plain = TorchBackend(model, "cpu", TorchCudaSettings(precision="fp32"))
    assert not plain.settings.fused_attention and not plain.settings.overlap_frequency  # CUDA-only defaults
    assert "SDPA" not in plain.description and "stream" not in plain.description
    img = np.random.default_rng(0).random((2, 3, S, S), dtype=np.float32)
    box = np.array([[10, 12, 90, 100]], np.float32)
    coords = np.random.default_rng(1).uniform(-1, 1, (1, 500, 2)).astype(np.float32)
    ref = plain.encode(img)
    ref_dec = plain.decode(ref[1], box, coords)
    for fused, overlap in ((False, True), (True, False), (True, True)):
        be = TorchBackend(model, "cpu", TorchCudaSettings(
            precision="fp32", fused_attention=fused, overlap_frequency=overlap))
        attns = [m for m in be.model.modules() if hasattr(m, "fused")]
        assert len(attns) == model.cfg.encoder.depth and all(m.fused == fused for m in attns)
        assert be.model.image_encoder.frequency_first == overlap
        assert ("SDPA attention" in be.description) == fused and ("frequency stream" in be.description) == overlap
        calls.update(sdpa=0, first=0)
        got = be.encode(img)
        assert calls == {"sdpa": model.cfg.encoder.depth if fused else 0, "first": int(overlap)}
        for a, b in zip(got, ref, strict=True):
            if fused:
                torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
            else:
                assert torch.equal(a, b)
        calls.update(sdpa=0)
        for a, b in zip(be.decode(got[1], box, coords), ref_dec, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert calls["sdpa"] == (7 if fused else 0)  # the box part's two-way transformer: 2 layers x 3 + final


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_backend_converts_uint8_pixels_on_the_device_bitwise(precision):
    """encode_pixels (uint8 upload, conversion inside the encoder's graph) gives bitwise the embeddings of
    encode on the host-converted floats; the base Backend's default converts on the host."""
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_deploy.backends.base import Backend
    from imedsam_deploy.preprocess import pixels_to_model

    be = TorchBackend(tiny(), "cpu", TorchCudaSettings(precision=precision))
    px = np.random.default_rng(0).integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    for a, b in zip(be.encode_pixels(px), be.encode(pixels_to_model(px)), strict=True):
        assert torch.equal(a, b)
    seen = []

    class Host(Backend):
        def encode(self, images):
            seen.append(images)
            return [images]

        def decode(self, embedding, boxes, coords):
            raise NotImplementedError

    Host(1, 1).encode_pixels(px)
    assert seen[0].dtype == np.float32 and np.array_equal(seen[0], pixels_to_model(px))
    assert seen[0].shape == (2, 3, S, S) and seen[0].flags.c_contiguous


def test_torch_backend_builds_region_coordinates_on_the_device_bitwise():
    """decode_merged's device coordinates are the host's (preprocess.region_chunk_coords), bit for bit, for
    regions and chunk bounds anywhere on odd and even output grids."""
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_deploy.preprocess import Region, region_chunk_coords

    be = TorchBackend(tiny(), "cpu", TorchCudaSettings(precision="fp32"))
    rng = np.random.default_rng(0)
    for out_hw in ((384, 384), (201, 333), (896, 640)):
        for _ in range(20):
            r0, r1 = sorted(rng.integers(0, out_hw[0] + 1, 2))
            c0, c1 = sorted(rng.integers(0, out_hw[1] + 1, 2))
            region = Region(int(r0), int(c0), int(r1) + 1, int(c1) + 1)
            region = Region(region.r0, region.c0, min(region.r1, out_hw[0]), min(region.c1, out_hw[1]))
            n = region.size
            s, e = sorted(rng.integers(0, n + 1, 2))
            want = region_chunk_coords(region, out_hw[0], out_hw[1], int(s), int(e))
            got = be._chunk_coords(region, out_hw, int(s), int(e)).numpy()
            assert got.dtype == np.float32 and np.array_equal(got, want)


def test_frame_runner_decodes_each_group_before_encoding_the_next():
    """A backend may keep one encoder output buffer (TensorRT): a handle is valid until its next encode.
    The bench's FrameRunner, with more images than max_batch, must decode each group first; and the
    runtime's embed refuses more than max_batch at once instead of handing out handles that go stale."""
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_deploy.backends.base import Backend
    from imedsam_deploy.bench import BenchOptions, FrameRunner, synthetic_inputs
    from imedsam_deploy.manifest import Artifact
    from imedsam_deploy.runtime import Segmenter

    class OneBuffer(Backend):  # the strict contract: every encode invalidates the previous handles
        def __init__(self, inner: TorchBackend) -> None:
            super().__init__(2, inner.max_points)
            self.inner, self.generation = inner, 0

        def encode(self, images):
            self.generation += 1
            return [(self.generation, e) for e in self.inner.encode(images)]

        def decode(self, embedding, boxes, coords):
            gen, emb = embedding
            assert gen == self.generation, "stale embedding handle"
            return self.inner.decode(emb, boxes, coords)

    model = tiny()
    cfg = model.cfg
    art = Artifact(path=Path("."), manifest={}, input_size=S, embedding_shape=(cfg.encoder.out_chans,
                   cfg.grid_size, cfg.grid_size), num_classes=cfg.num_classes,
                   refine_fraction=cfg.decoder.refine_fraction, max_points=65536, max_batch=2, graphs={})
    be = OneBuffer(TorchBackend(model, "cpu", TorchCudaSettings(precision="fp32")))
    inp = synthetic_inputs(S, 5, seed=3)
    runner = FrameRunner(be, art, "box", BenchOptions())
    together = runner.run(inp, (64, 64), None)
    assert len(together) == 5
    for i in range(5):  # the same masks as one image at a time
        one = type(inp)(inp.images[i : i + 1], inp.boxes[i : i + 1])
        np.testing.assert_array_equal(runner.run(one, (64, 64), None)[0], together[i])
    with pytest.raises(ValueError, match="max_batch"):
        Segmenter(be, art).embed(inp.images[:3])


def test_frame_runner_times_gpu_stages_with_events_and_no_synchronisation_inside_a_frame():
    """On a torch CUDA backend the bench's stage split uses CUDA events, so a frame runs as imedsam-infer runs
    it: no synchronisation between encoder and decoder (which would stop the host queueing the next graph
    while the GPU runs the last), one at the end. Checked with a stand-in for torch.cuda that logs calls and
    timestamps each event."""
    from types import SimpleNamespace

    from imedsam_deploy.backends.base import Backend
    from imedsam_deploy.bench import BenchOptions, FrameRunner, Timings, synthetic_inputs
    from imedsam_deploy.manifest import Artifact

    log: list[str] = []
    clock = iter(range(1000))

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            self.t = next(clock)  # ms on the fake GPU timeline
            log.append("mark")

        def synchronize(self):
            log.append("wait-event")

        def elapsed_time(self, other):
            return float(other.t - self.t)

    fake_torch = SimpleNamespace(cuda=SimpleNamespace(Event=Event, synchronize=lambda dev: log.append("sync")))

    class FakeCuda(Backend):
        torch = fake_torch
        device = SimpleNamespace(type="cuda")

        def encode(self, images):
            log.append("encode")
            return [None] * len(images)

        def encode_pixels(self, pixels):
            next(clock)  # the encoder takes 1 ms longer than a mark
            return self.encode(pixels)

        def decode(self, embedding, boxes, coords):
            raise AssertionError("the device planner answers")

        def sparse_region(self, embedding, boxes, region, out_hw, fraction, cfg):
            log.append("plan")
            next(clock), next(clock)
            r0, r1, c0, c1 = region
            return np.ones((1, r1 - r0, c1 - c0), np.float32), 7

    art = Artifact(path=Path("."), manifest={}, input_size=S, embedding_shape=(8, 4, 4), num_classes=1,
                   refine_fraction=0.125, max_points=4096, max_batch=2, graphs={})
    t = Timings()
    masks = FrameRunner(FakeCuda(2, 4096), art, "sparse", BenchOptions()).run(synthetic_inputs(S, 2), (48, 48), t)
    assert len(masks) == 2 and all(m.any() for m in masks)
    assert log[: log.index("sync")] == ["mark", "encode", "mark"] + ["mark", "plan", "mark"] * 2  # no sync inside
    assert log.count("sync") == 1 and "wait-event" in log[log.index("sync") :]
    assert t.stages["encoder"] == [2.0] and t.stages["decoder"] == [6.0]  # from the events: 2 ms, 2 x 3 ms
    assert t.points == 14


def test_torch_cuda_backend_refuses_clearly_without_cuda():
    from imedsam_cuda.torch_cuda import TorchBackend

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the no-CUDA error path cannot be exercised here")
    with pytest.raises(UserError, match="no CUDA device"):
        TorchBackend(tiny(), "cuda")


@pytest.mark.parametrize(("option", "what"), [("fused_norms", "fused encoder norms"),
                                             ("fused_operands", "fused attention operands"),
                                             ("fused_frequency", "fused frequency chain"),
                                             ("fused_features", "fused point features"),
                                             ("fused_uncertainty", "fused uncertainty"), ("fused_planner", "fused planner")])
def test_triton_options_are_refused_clearly_without_a_gpu(option, what):
    """Each of torch-cuda's Triton kernels asked for on a CPU (without Triton's interpreter): one line naming the
    option and why (no CUDA device, or no triton at all)."""
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings

    from .conftest import not_interpreted

    not_interpreted()
    with pytest.raises(UserError, match=f"backend torch-cpu: {what}: (the Triton kernel needs a CUDA device|triton is "
                                        "not installed)"):
        TorchBackend(tiny(), "cpu", TorchCudaSettings(precision="fp32", lean_encoder=True, **{option: True}))


def test_compile_and_the_triton_kernels_are_refused_together():
    """torch.compile and the hand-written Triton kernels are alternatives: asked for both (in settings made by
    hand, say), the backend says so in one line before it builds anything."""
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings

    with pytest.raises(UserError, match="torch.compile .* and the hand-written Triton kernels .* are alternatives"):
        TorchBackend(tiny(), "cpu", TorchCudaSettings(
            precision="fp32", compile="aot_eager", fused_features=True))


@pytest.mark.parametrize(("given", "want"), [
    ({}, (False, False)), ({"compile": True}, (True, False)), ({"triton": True}, (False, True)),
    ({"compile": False, "triton": False, "tuned": False}, (False, False))])
def test_torch_cuda_opt_ins_come_from_the_backend_options(given, want):
    """``--backend-option compile=1`` and ``triton=1`` switch torch-cuda's opt-in paths on, as ``imedsam-infer``,
    ``imedsam-bench`` and ``imedsam-serve`` open the backend: torch.compile, and the six Triton options together,
    with the fp32 box part; both at once are refused in one line naming the options."""
    from imedsam_cuda.torch_settings import OpenOptions, TorchCudaSettings

    got = OpenOptions.of(given).apply(TorchCudaSettings(precision="fp16", max_points=1024))
    assert got.compile == want[0]
    triton = ("fused_norms", "fused_operands", "fused_frequency", "fused_features", "fused_uncertainty", "fused_planner")
    assert [getattr(got, k) for k in triton] == [want[1]] * 6
    assert got.fp32_box_part == want[1]  # the box part's fused norms need it
    assert (got.precision, got.max_points) == ("fp16", 1024)  # the rest as given
    with pytest.raises(UserError, match="--backend-option compile=1 and triton=1: .* alternatives"):
        OpenOptions.of({"compile": True, "triton": True})


# ---------------------------------------------------------------- imedsam-bench CLI
@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory) -> Path:
    """A tiny (64 px) model exported from a checkpoint, so the manifest names its PyTorch weights."""
    from imedsam_export.api import export_artifact

    root = tmp_path_factory.mktemp("bench")
    model = tiny(size=64)
    ck = root / "tiny.pt"
    save_checkpoint(ck, model_payload(model, None))
    return export_artifact(ck, root / "art", verify=False, max_points=4096, batch=2, int8=True)


STAGE_KEYS = {"p50", "p95", "p99"}


def test_bench_cli_reference_json(tiny_artifact, tmp_path):
    out = tmp_path / "o"
    js = tmp_path / "r.json"
    res = CliRunner().invoke(app, [
        str(tiny_artifact), "--backend", "ort-cpu", "--query", "full", "--query", "sparse", "--query", "box",
        "--out-size", "64", "--out-size", "96", "--repeat", "2", "--warmup", "0", "--reference",
        "--json", str(js), "--out", str(out), "--threads", "2",
    ])
    assert res.exit_code == 0, res.output
    rep = json.loads(js.read_text())
    assert {r["query"] for r in rep["results"]} == {"full", "sparse", "box"}
    assert {r["out_size"] for r in rep["results"]} == {64, 96}
    # no --precision: ort-cpu runs the int8 encoder beside fp32, each timed against the reference
    assert {r["precision"] for r in rep["results"]} == {"fp32", "int8"}
    for r in rep["results"]:
        assert set(r["stages_ms"]) == {"preprocess", "encoder", "decoder", "postprocess"}
        assert all(set(v) >= STAGE_KEYS for v in r["stages_ms"].values())
        assert r["fps"] > 0 and r["decoder_points_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["speedup_vs_reference"] > 0
        assert 0.0 <= r["agreement"]["pixel_in_box"] <= 1.0
        if r["query"] == "full":  # the same function, ONNX vs eager: identical masks up to fp32 rounding
            assert r["agreement"]["pixel_all"] >= 0.995
        if r["query"] == "box":
            assert r["decoder_points_per_frame"] < r["out_size"] ** 2  # the box restriction queried less
    summary = rep["backends"]["ort-cpu"]
    assert {"e2e_p50_ms", "speedup_vs_reference", "pixel_agreement", "precision"} <= set(summary)
    assert rep["reference"] and rep["reference"][0]["e2e_ms"]["p50"] > 0
    assert (out / "bench.csv").read_text().startswith("backend,")
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_default_out_sizes_sweep_without_the_reference_only():
    from imedsam_deploy.bench import default_out_sizes

    assert default_out_sizes(384, reference=False) == (384, 128, 896)
    assert default_out_sizes(384, reference=True) == (384,)
    assert default_out_sizes(1, reference=False) == (1, 1, 2)


def test_bench_cli_no_arguments_uses_latest_artifact_and_reports_skips(tiny_artifact, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_artifact, tmp_path / "runs" / "demo" / "export")
    m = json.loads((tmp_path / "runs" / "demo" / "export" / "manifest.json").read_text())
    run = tmp_path / "runs" / "demo"  # the export of a finished run's checkpoint: the default
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.pt").write_bytes(b"stand-in")
    (run / "finished.json").write_text(json.dumps({"finished": True, "sha256": {"best.pt": m["source"].get("sha256") or "x"}}))
    res = CliRunner().invoke(app, ["--repeat", "1", "--warmup", "0", "--query", "sparse"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "runs" / "bench" / "bench.json").read_text())
    assert rep["artifact"].endswith("export") and "(newest export of a finished run)" in res.output
    ran = {r["backend"] for r in rep["results"]}
    assert "ort-cpu" in ran
    # no --out-size: the input size, then the paper's cross-resolution settings (384 -> 128 / 896) scaled to it
    S = rep["input_size"]
    assert rep["settings"]["out_sizes"] == [S, round(S / 3), round(7 * S / 3)]
    for b in ran:
        assert sorted({r["out_size"] for r in rep["results"] if r["backend"] == b}) == sorted(rep["settings"]["out_sizes"])
    assert all(v["out_size"] == S for v in rep["backends"].values())  # the summary stays at the input size
    # every registry backend either ran or is listed with its reason
    from imedsam_deploy.backends import NAMES

    assert set(NAMES) <= ran | set(rep["skipped"])
    assert all(isinstance(v, str) and v for v in rep["skipped"].values())
    if "tensorrt" in rep["skipped"]:
        assert "skipped tensorrt" in res.output
    # each reason on one whole line, in the log and in the closing list (rich must not wrap them at 80 columns)
    said = [ln for ln in res.output.splitlines() if ln.startswith("skipped ")]
    assert said and all(ln in {f"skipped {n}: {why}" for n, why in rep["skipped"].items()} for ln in said)


@pytest.mark.parametrize("args, msg", [
    (["--precision", "fp8"], "--precision"),
    (["--model", "vit_z"], "--model"),
    (["--query", "dense"], "query mode"),
    (["--image", "/nonexistent.png"], "no such image"),
    (["--threads", "0"], "--threads 0: must be at least 1"),  # as imedsam-infer and imedsam-serve
    # --backend-option: a key none of the backends timed takes, a bad value or form, a missing checkpoint
    (["--backend", "ort-cpu", "--backend-option", "compile=1"],
     "--backend-option compile=1: no backend timed takes it (ort-cpu takes none)"),
    (["--backend-option", "speed=2"], "--backend-option speed=2: no backend timed takes it ("),
    (["--backend", "torch-cpu", "--backend-option", "triton=1"], "(torch-cpu takes compile, tuned)"),
    (["--backend-option", "compile=perhaps"], "--backend-option compile=perhaps: expected on or off (1 or 0)"),
    (["--backend-option", "tuned"], "--backend-option 'tuned': expected KEY=VALUE"),
    (["--backend", "ort-cpu", "--reference", "--backend-option", "checkpoint=/nonexistent.pt"],
     "--backend-option checkpoint=/nonexistent.pt: no such file"),
    # the released code's reference has no mirrored average: refused before anything is timed
    (["--backend", "ort-cpu", "--reference", "--tta"], "--tta with --reference: the released code's reference"),
])
def test_bench_cli_bad_input_is_one_line(tiny_artifact, tmp_path, args, msg):
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, [str(tiny_artifact), "--repeat", "1", "--out", str(out), *args])
    assert res.exit_code == 2
    assert msg in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_bench_backend_options_reach_the_torch_backend(tmp_path, monkeypatch):
    """``--backend-option tuned=0`` opens torch-cpu (``--model``: the model in process) with its defaults although a
    tuning is saved for it, which it otherwise opens with; the report records the options given."""
    from imedsam_cuda import torch_tuning as tt
    from imedsam_cuda.torch_cuda import open_model
    from imedsam_cuda.torch_models import in_process_artifact

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path / "cache"))
    art, model = in_process_artifact("tiny", 64, max_batch=8)  # what the command below opens: the tuning's key
    be = open_model(model, "cpu", "fp32", art)
    tt.save(tt.Tuning(tt.machine_key(be), {**tt.settings_of(be), "align_matmuls": True}),
            tt.tuning_path(be, tt.default_root()))

    def row(*options: str) -> tuple[dict, dict]:
        out = tmp_path / "bench"
        res = CliRunner().invoke(app, ["--model", "tiny", "--input-size", "64", "--backend", "torch-cpu",
                                       "--out-size", "64", "--query", "sparse", "--repeat", "1", "--warmup", "0",
                                       "--out", str(out), *options])
        assert res.exit_code == 0, res.output
        rep = json.loads((out / "bench.json").read_text())
        return rep["results"][0], rep["settings"]

    tuned, settings = row()
    assert tuned["description"].endswith("aligned decoder matmuls, tuned)") and settings["backend_options"] == {}
    untuned, settings = row("--backend-option", "tuned=0")
    assert "tuned" not in untuned["description"] and "aligned" not in untuned["description"]
    assert settings["backend_options"] == {"tuned": "0"}


def test_bench_tta_times_what_infer_runs_and_refuses_a_one_image_artifact(tiny_artifact, tmp_path):
    """``--tta``: the bench's frame gives ``Segmenter(tta=True)``'s masks (the mirror made in preprocessing, each
    image with its mirror in one encoder call), with more points decoded than without; an artifact that takes one
    image a call is refused in one line, nothing written."""
    from imedsam_deploy.backends import open_backend
    from imedsam_deploy.bench import BenchOptions, FrameRunner, synthetic_inputs
    from imedsam_deploy.bench.timing import Timings
    from imedsam_deploy.manifest import load_artifact
    from imedsam_deploy.runtime import Segmenter

    art = load_artifact(tiny_artifact)
    be, _ = open_backend("ort-cpu", art)
    inputs = synthetic_inputs(64, 3)  # three images: with max_batch 2, one image (and its mirror) a call
    inputs.images[1] = np.ascontiguousarray(inputs.images[1][:, 5:])  # and not all square
    points = {}
    for tta in (False, True):
        fr = FrameRunner(be, art, "sparse", BenchOptions(tta=tta))
        t = Timings()
        masks = fr.run(inputs, (80, 80), t)
        seg = Segmenter(be, art, query="sparse", tta=tta)
        for m, im, box in zip(masks, inputs.images, inputs.boxes, strict=True):
            assert np.array_equal(m[0], seg.segment(im, box[None], (80, 80)).objects[0].mask())
        points[tta] = t.points
    assert points[True] > points[False] > 0
    one = tmp_path / "one"
    shutil.copytree(tiny_artifact, one)
    m = json.loads((one / "manifest.json").read_text())
    m["max_batch"] = 1
    (one / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, [str(one), "--backend", "ort-cpu", "--tta", "--repeat", "1", "--out", str(out)])
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "--tta" in errors[0] and "--batch 2" in errors[0], res.output
    assert "Traceback" not in res.output and not out.exists()


def test_bench_reference_runs_the_checkpoint_given_as_a_backend_option(tiny_artifact, tmp_path):
    """An artifact whose source checkpoint is not at hand: ``--reference`` refuses it in one line, and runs with
    ``--backend-option checkpoint=PATH`` (taken by the reference alone here: ort-cpu takes none)."""
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    ck = Path(m["source"]["checkpoint"])
    ck = ck if ck.is_absolute() else tiny_artifact / ck
    assert ck.is_file()
    m["source"]["checkpoint"] = str(tmp_path / "gone.pt")
    (art / "manifest.json").write_text(json.dumps(m))
    args = [str(art), "--backend", "ort-cpu", "--precision", "fp32", "--query", "full", "--out-size", "64",
            "--repeat", "1", "--warmup", "0", "--reference", "--out", str(tmp_path / "bench")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--reference needs the PyTorch checkpoint" in res.output, res.output
    res = CliRunner().invoke(app, [*args, "--backend-option", f"checkpoint={ck}"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads((tmp_path / "bench" / "bench.json").read_text())["results"]
    assert row["agreement"]["pixel_all"] >= 0.995  # the reference ran the artifact's own weights


def test_sparse_logits_carry_the_decision_on_a_smooth_field():
    """SparseResult.logits > 0 equals the returned mask on the region; queried pixels keep true logits."""
    from imedsam_deploy.sparse import sparse_decode as _sd

    H, W = 96, 120

    def decode(coords):
        x, y = coords[:, 0], coords[:, 1]
        z = (0.5 - (x / 0.5) ** 2 - (y / 0.4) ** 2)[None].astype(np.float32)
        return z, z + 0.01, np.abs(z) * 0 + 1e-3

    r = (10, 80, 15, 100)
    res = _sd(decode, (H, W), 0.125, r)
    assert res.logits is not None and res.logits.shape == (1, 70, 85)
    assert np.array_equal(res.logits > 0, res.mask[:, 10:80, 15:100])
    assert res.queried < 70 * 85


def test_agreement_in_the_box_and_over_the_whole_output():
    """A box-query mask equal to the reference inside the box, background outside where the reference spills:
    the box figures are perfect, the whole-output ones are not; the box maps from image to output pixels."""
    from imedsam_deploy.bench import agreement

    ref = np.zeros((1, 40, 60), bool)
    ref[0, 10:30, 20:40] = True  # the object, inside the box
    ref[0, 0:5, :] = True  # spill far from the box
    ours = np.zeros_like(ref)
    ours[0, 10:30, 20:40] = True
    box = np.array([30.0, 15, 90, 75])  # image pixels of a 80 x 120 image: output rows 7:38, cols 15:45
    ag = agreement(ours, ref, box, (80, 120))
    assert ag["pixel_in_box"] == 1.0 and ag["dice_in_box"] == 1.0
    assert ag["pixel_all"] == 1 - 300 / 2400 and ag["dice"] == 2 * 400 / (400 + 700)
    ours[0, 12, 25] = False  # one pixel off inside the box
    ag = agreement(ours, ref, box, (80, 120))
    assert ag["pixel_in_box"] == 1 - 1 / (31 * 30) and ag["dice_in_box"] == 2 * 399 / (399 + 400)
    assert agreement(np.zeros_like(ref), np.zeros_like(ref), box, (80, 120))["dice_in_box"] == 1.0


def test_bench_model_with_torch_backends_alone_exports_nothing(tmp_path, monkeypatch):
    """``imedsam-bench --model tiny --backend torch-cpu --reference``: the torch backend runs the random-weight
    model in process, so no ONNX export is made (for vit_b on a GPU machine that export costs minutes); the
    report still has the interface other checks read (per-backend p50, speedup_vs_reference, agreement)."""
    monkeypatch.chdir(tmp_path)  # no runs/*/export here
    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["--model", "tiny", "--input-size", "64", "--backend", "torch-cpu",
                                   "--out-size", "64", "--query", "full", "--repeat", "1", "--warmup", "0",
                                   "--reference", "--out", str(out), "--json", str(out / "r.json")])
    assert res.exit_code == 0, res.output
    assert "nothing exported" in res.output
    assert not (tmp_path / "cache").exists()  # no export cached
    rep = json.loads((out / "r.json").read_text())
    assert rep["model"] == "tiny" and rep["artifact"] == "in-process-tiny-64"
    (row,) = rep["results"]
    assert row["backend"] == "torch-cpu" and row["speedup_vs_reference"] > 0
    assert row["agreement"]["pixel_in_box"] >= 0.999  # the full grid in fp32 against the fp32 reference
    assert (out / "bench.csv").is_file() and (out / "bench.png").is_file()


def test_threads_reach_the_backends_with_a_cpu_pool_and_only_those(tiny_artifact):
    """``open_backend(threads=)``: ONNX Runtime's sessions and OpenVINO's compiled encoder get that many threads
    (named or through ``auto``); a backend module that does not declare ``TAKES_THREADS`` is not given it."""
    import types

    from imedsam_deploy import backends
    from imedsam_deploy.manifest import load_artifact

    art = load_artifact(tiny_artifact)
    for name in ("ort-cpu", "ov-cpu", "auto"):
        be, _ = backends.open_backend(name, art, threads=1)
        assert be.sessions and all(s.get_session_options().intra_op_num_threads == 1 for s in be.sessions.values())
        if be.name == "ov-cpu":
            compiled = be.encoder.requests[1].get_compiled_model()
            assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
        be.close()
    assert backends._create_kwargs(types.ModuleType("gpu_only"), {}, 1) == {}


def test_machine_records_what_chooses_the_cpu_kernels(monkeypatch):
    """A result says which CPU, OpenVINO and bf16 kernel ran, the settings that change the kernels, and malloc's."""
    import openvino as ov

    from imedsam_core import malloc
    from imedsam_deploy.backends.openvino import bf16_matmul_kernel
    from imedsam_deploy.bench.timing import machine

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("IMEDSAM_MALLOC", "glibc")
    monkeypatch.setattr(malloc, "state", "left as glibc's defaults ($IMEDSAM_MALLOC=glibc)")
    info = machine()
    assert info["env"] == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "IMEDSAM_MALLOC": "glibc"}
    assert info["malloc"] == malloc.state  # what malloc was when the torch reference ran (None: torch never loaded)
    assert info["openvino"][:4].isdigit() and info["openvino_bf16_kernel"] == bf16_matmul_kernel()
    assert info["cpu"] == ov.Core().get_property("CPU", "FULL_DEVICE_NAME") and info["cpu"]
