"""torch-cuda's on-device paths against the runtime's host ones, run here on the CPU (the same torch code the
CUDA graphs capture): the sparse planner on the device (imedsam_cuda/torch_sparse.py; identical
decisions, query counts and, within float32 rounding, logits; a level over its point budget is reported,
never silently different) and the UGS merge on the device for the full and box modes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imedsam_cuda import torch_sparse
from imedsam_cuda.torch_sparse import DevicePlanner
from imedsam_deploy.sparse import SparseConfig, sparse_decode

from .conftest import SAMPLE_DATA, read_rgb

REPO = Path(__file__).resolve().parents[1]


def sample_frame(i: int, box: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Sample image i (sorted by name) and one box given as fractions of its width and height."""
    stem = sorted(p.stem for p in (SAMPLE_DATA / "images").iterdir())[i]
    rgb = read_rgb(SAMPLE_DATA / "images" / f"{stem}.jpg")
    h, w = rgb.shape[:2]
    return rgb, np.array([[box[0] * w, box[1] * h, box[2] * w, box[3] * h]])


def record_answers(backend: object, method: str) -> list:
    """Wrap ``backend.method`` so that every answer it gives is appended to the returned list."""
    answers: list = []
    inner = getattr(backend, method)
    setattr(backend, method, lambda *a: answers.append(inner(*a)) or answers[-1])
    return answers


def _field(rng: np.random.Generator, k: int):
    """A smooth random field per class with wavy edges and heads that disagree near them (numpy, float64
    inside, float32 out), and the same values as torch tensors for the device planner."""
    cx, cy, rad, fr = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0.1, 0.6), rng.uniform(3, 30)

    def dec(c: np.ndarray):
        x, y = c[:, 0].astype(np.float64), c[:, 1].astype(np.float64)
        lg = np.stack([(rad - np.hypot(x - cx, y - cy + 0.1 * i)) * 20 + 0.5 * np.sin(fr * x) * np.cos(fr * y)
                       for i in range(k)])
        return (lg.astype(np.float32), (lg + 0.2 * np.sin(7 * y)).astype(np.float32),
                (np.exp(-lg**2) + 0.01 * np.cos(9 * x)).astype(np.float32))

    def tdec(c: torch.Tensor):
        return tuple(torch.from_numpy(o) for o in dec(c.numpy()))

    return dec, tdec


def test_device_planner_makes_the_host_planners_decisions():
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(60):
        H, W, K = int(rng.integers(20, 140)), int(rng.integers(20, 140)), int(rng.integers(1, 3))
        dec, tdec = _field(rng, K)
        r0, c0 = int(rng.integers(0, H // 2)), int(rng.integers(0, W // 2))
        r1, c1 = int(rng.integers(r0 + 1, H + 1)), int(rng.integers(c0 + 1, W + 1))
        cfg = SparseConfig(stride=int(rng.choice([2, 4, 8, 16])), min_cells_across=0,
                           dilate=int(rng.integers(0, 3)),
                           logit_band=float(rng.choice([0.0, 0.5])))
        planner = DevicePlanner((H, W), 0.125, cfg, "cpu")
        h, w = r1 - r0, c1 - c0
        if not planner.usable(h, w):
            assert min(h, w) <= 1 or max(h, w) - 1 < cfg.stride  # only regions the host handles differently
            continue
        host = sparse_decode(dec, (H, W), 0.125, (r0, r1, c0, c1), cfg)
        val, d, queried, overflow, needs = planner.plan(tdec, torch.tensor([r0, h, c0, w]))
        assert not bool(overflow)
        budgets = planner.budget_key()  # every pass within its budget
        assert needs.shape == (len(budgets),)
        assert all(int(n) <= b for n, b in zip(needs, budgets, strict=True))
        assert host.logits is not None
        np.testing.assert_array_equal(d[:, :h, :w].numpy(), host.mask[:, r0:r1, c0:c1])
        assert int(queried) == host.queried
        np.testing.assert_allclose(val[:, :h, :w].numpy(), host.logits, rtol=1e-5, atol=1e-6)
        assert ((val[:, :h, :w] > 0) == d[:, :h, :w]).all()
        compared += 1
    assert compared >= 45


def test_device_planner_leaves_regions_under_the_cell_floor_to_the_host():
    """With the runtime's floor of cells across a region (``SparseConfig().min_cells_across``), the planner takes
    only regions the host would start at its stride (torch-cuda plans the others on the host: the same
    decisions either way), and on those it decides as the host does."""
    rng = np.random.default_rng(5)
    dec, tdec = _field(rng, 1)
    cfg = SparseConfig()
    planner = DevicePlanner((256, 256), 0.125, cfg, "cpu")
    assert planner.stride == 8 and cfg.min_cells_across == 8
    assert planner.usable(64, 64) and planner.usable(64, 200) and planner.usable(256, 256)
    assert not planner.usable(63, 200) and not planner.usable(12, 12)
    for r0, h, c0, w in ((20, 64, 30, 90), (100, 150, 0, 256)):
        host = sparse_decode(dec, (256, 256), 0.125, (r0, r0 + h, c0, c0 + w), cfg)
        val, d, queried, overflow, _ = planner.plan(tdec, torch.tensor([r0, h, c0, w]))
        assert not bool(overflow) and int(queried) == host.queried
        np.testing.assert_array_equal(d[:, :h, :w].numpy(), host.mask[:, r0 : r0 + h, c0 : c0 + w])


def test_device_planner_flags_a_level_over_its_budget():
    rng = np.random.default_rng(3)
    dec, tdec = _field(rng, 1)
    cfg = SparseConfig(min_cells_across=0)
    host = sparse_decode(dec, (256, 256), 0.125, (0, 256, 0, 256), cfg)
    tight = DevicePlanner((256, 256), 0.125, cfg, "cpu", cap_per_side=1)  # 1024 points per level (CAP_UNIT)
    roomy = DevicePlanner((256, 256), 0.125, cfg, "cpu")
    assert host.queried > 1024 + tight.n_t + 33 * 33  # more than the tight planner may evaluate
    assert bool(tight.plan(tdec, torch.tensor([0, 256, 0, 256]))[3])
    val, d, q, overflow, _ = roomy.plan(tdec, torch.tensor([0, 256, 0, 256]))
    assert not bool(overflow) and int(q) == host.queried
    np.testing.assert_array_equal(d.numpy()[:, :256, :256], host.mask)


def test_device_planner_grows_the_budgets_to_what_the_levels_needed():
    """After an overflow, ``grow(needs)`` gives the first pass over its budget room for what it needed (plus a
    quarter, in CAP_UNIT steps) and leaves every other pass's; within a few boxes the plan fits and decides as
    the host planner does, each grown budget within a quarter and a unit of the need it was grown to. The
    dilation's second pass at stride 1 has a budget of its own, far under the first pass's."""
    from imedsam_cuda.torch_sparse import CAP_UNIT

    rng = np.random.default_rng(3)
    dec, tdec = _field(rng, 1)
    cfg = SparseConfig(min_cells_across=0)
    host = sparse_decode(dec, (256, 256), 0.125, (0, 256, 0, 256), cfg)
    region = torch.tensor([0, 256, 0, 256])
    planner = DevicePlanner((256, 256), 0.125, cfg, "cpu", cap_per_side=1)
    assert planner.dilation_cap < planner.caps[1] or planner.caps[1] == CAP_UNIT
    lattice = [planner.lattice_points(s) for s in planner.levels] + [planner.lattice_points(1)]
    fallbacks = 0
    while True:
        before = planner.budget_key()
        *_, overflow, needs = planner.plan(tdec, region)
        if not bool(overflow):
            break
        fallbacks += 1
        needs_l = [int(n) for n in needs]
        planner.grow(needs_l)
        after = planner.budget_key()
        first = next(i for i, n in enumerate(needs_l) if n > before[i])
        assert [i for i in range(len(after)) if after[i] != before[i]] == [first]  # that pass alone grew
        assert min(lattice[first], needs_l[first]) <= after[first] <= needs_l[first] * 1.25 + CAP_UNIT
        assert after[first] % CAP_UNIT == 0 or after[first] == lattice[first]
        assert fallbacks <= 2 * len(after)
    assert fallbacks >= 1
    val, d, q, _, needs = planner.plan(tdec, region)
    assert int(q) == host.queried
    np.testing.assert_array_equal(d.numpy()[:, :256, :256], host.mask)
    assert all(int(n) <= b for n, b in zip(needs, planner.budget_key(), strict=True))


@pytest.fixture(scope="module")
def shipped():
    from imedsam_deploy.manifest import Artifact
    from imedsam_train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(REPO / "imedsam_train" / "weights" / "imedsam_tiny_kvasir.pt")
    cfg = model.cfg
    art = Artifact(path=Path("."), manifest={}, input_size=cfg.input_size,
                   embedding_shape=(cfg.encoder.out_chans, cfg.grid_size, cfg.grid_size), num_classes=cfg.num_classes,
                   refine_fraction=cfg.decoder.refine_fraction, max_points=65536, max_batch=1, graphs={})
    return model, art


@pytest.mark.parametrize("out", [(384, 384), (200, 300)])
def test_segmenter_sparse_on_the_device_equals_the_host_planner(shipped, out, monkeypatch):
    """The shipped model on a real image through the runtime: the torch backend's device planner gives
    the host planner's mask; a box over its budget falls back to the host planner, same mask again."""
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_deploy.runtime import Segmenter

    model, art = shipped
    rgb, box = sample_frame(0, (0.3, 0.3, 0.7, 0.65))
    masks, queried = {}, {}
    for name, dp in (("host", False), ("device", True)):
        seg = Segmenter(TorchBackend(model, "cpu", TorchCudaSettings(
            precision="fp32", device_planner=dp)), art, query="sparse")
        obj = seg.segment(rgb, box, out).objects[0]
        masks[name], queried[name] = obj.mask(), obj.queried
    assert (masks["device"] == masks["host"]).mean() >= 0.9999
    assert masks["host"].sum() > 100  # a real mask, not an empty one on both sides
    assert abs(queried["device"] - queried["host"]) <= 0.001 * queried["host"]
    # over budget: sparse_region answers None, the runtime's host planner runs, and the budgets grow until
    # the device planner fits the box
    monkeypatch.setattr(torch_sparse, "CAP_PER_SIDE", 1)
    monkeypatch.setattr(torch_sparse, "CAP_UNIT", 64)
    be = TorchBackend(model, "cpu", TorchCudaSettings(precision="fp32", device_planner=True))
    answers = record_answers(be, "sparse_region")
    seg = Segmenter(be, art, query="sparse")
    for _ in range(8):
        obj = seg.segment(rgb, box, out).objects[0]
        assert obj.queried == queried["host"] or answers[-1] is not None
        assert (obj.mask() == masks["host"]).mean() >= 0.9999
    assert answers[0] is None  # declined at first (over budget) ...
    assert answers[-1] is not None  # ... then grown to fit
    assert be.planner_fallbacks == answers.count(None) > 0


def test_compiled_backend_compiles_the_whole_planner(shipped, monkeypatch):
    """With compile on, the sparse planner is compiled whole (fullgraph: its own elementwise ops fuse with its
    decoder calls), around the raw per-point function rather than around a compiled one, and decides as the
    eager device planner does. aot_eager: the same capture without code generation."""
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_deploy.runtime import Segmenter

    compiled = []
    real_compile = torch.compile

    def recording_compile(fn, **kw):
        compiled.append((fn.__name__, kw.get("fullgraph")))
        return real_compile(fn, **kw)

    monkeypatch.setattr(torch, "compile", recording_compile)
    model, art = shipped
    rgb, box = sample_frame(0, (0.3, 0.3, 0.7, 0.65))
    objs = {}
    for name, comp in (("eager", False), ("compiled", "aot_eager")):
        be = TorchBackend(model, "cpu", TorchCudaSettings(precision="fp32", device_planner=True, compile=comp))
        calls = record_answers(be, "sparse_region")
        objs[name] = Segmenter(be, art, query="sparse").segment(rgb, box, (200, 300)).objects[0]
        assert calls and calls[0] is not None  # planned on the device, not handed back
    assert ("plan_fn", True) in compiled
    np.testing.assert_array_equal(objs["compiled"].mask(), objs["eager"].mask())
    assert objs["compiled"].queried == objs["eager"].queried


def test_region_inputs_made_on_the_host_plan_alike():
    """``DevicePlanner.region_inputs``: the region's last grid row and column and its coordinate table made on the
    host, as torch-cuda passes them: the same table as the device derives, and bitwise the same plan, for regions
    at the image's edges, narrow ones and a whole-image one."""
    def field(c: torch.Tensor):
        lg = ((0.3 - torch.hypot(c[:, 0] - 0.05, c[:, 1])) * 20 + 0.4 * torch.sin(15 * c[:, 0]))[None]
        return lg, lg + 0.1 * torch.cos(9 * c[:, 1]), torch.exp(-lg * lg)

    planner = DevicePlanner((96, 80), 0.125, SparseConfig(min_cells_across=0), "cpu")
    for r0, h, c0, w in ((10, 60, 12, 50), (0, 96, 0, 80), (40, 56, 30, 50), (5, 17, 70, 10)):
        assert planner.usable(h, w)
        reg, table = planner.region_inputs(r0, h, c0, w)
        want = planner.plan(field, torch.tensor([r0, h, c0, w]))
        got = planner.plan(field, torch.from_numpy(reg), torch.from_numpy(table))
        for g, w_ in zip(got, want, strict=True):
            assert torch.equal(g, w_), (r0, h, c0, w)
        s0 = planner.stride
        assert list(reg[4:]) == [-(-(h - 1) // s0) * s0, -(-(w - 1) // s0) * s0]
        assert table.dtype == np.float32 and table.shape == (planner.GW + planner.GH,)


def test_device_planner_is_capturable(monkeypatch):
    """What CUDA-graph capture forbids, checked on the CPU: no host synchronisation (an .item(), a
    data-dependent shape) -- torch.compile(fullgraph=True) stops at one -- and no host data copied to the
    device (torch.tensor / as_tensor / from_numpy inside the planner). The traced planner decides the same."""
    def field(c: torch.Tensor):
        lg = ((0.3 - torch.hypot(c[:, 0] - 0.05, c[:, 1])) * 20 + 0.4 * torch.sin(15 * c[:, 0]))[None]
        return lg, lg + 0.1 * torch.cos(9 * c[:, 1]), torch.exp(-lg * lg)

    planner = DevicePlanner((96, 96), 0.125, SparseConfig(min_cells_across=0), "cpu")
    region = torch.tensor([10, 60, 12, 70])
    want = planner.plan(field, region)

    def refuse(*a, **k):
        raise AssertionError("host data copied to the device inside the planner")

    with monkeypatch.context() as m:
        for name in ("tensor", "as_tensor", "from_numpy"):
            m.setattr(torch, name, refuse)
        again = planner.plan(field, region)
    traced = torch.compile(lambda reg: planner.plan(field, reg), fullgraph=True, backend="aot_eager")
    for got, same, w in zip(traced(region), again, want, strict=True):
        assert torch.equal(same, w)
        if w.dtype.is_floating_point:  # the traced fill's interpolation is decomposed: products round apart
            torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)
        else:  # decisions, query count and overflow flag: identical
            assert torch.equal(got, w)
    assert int(want[2]) > 0 and want[1].any()  # a real plan, not an empty one


@pytest.mark.parametrize("query", ["full", "box"])
def test_segmenter_merges_on_the_device_as_on_the_host(shipped, query):
    """full / box modes with the torch backend keeping the decoder outputs on the device and merging there
    (topk) vs the runtime's host merge (argpartition): the same logits, in several chunks per box."""
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_deploy.runtime import Segmenter

    model, art = shipped
    rgb, box = sample_frame(1, (0.25, 0.3, 0.7, 0.7))
    out = {}
    for dm in (False, True):
        be = TorchBackend(model, "cpu", TorchCudaSettings(precision="fp32", device_merge=dm))
        calls = record_answers(be, "decode_merged")
        seg = Segmenter(be, art, query=query, chunk=3000)
        obj = seg.segment(rgb, box, (160, 200)).objects[0]
        assert len(calls) == 1 and (calls[0] is not None) == dm  # merged on the device only when asked
        assert obj.logits.shape[-2:] == obj.region.shape
        out[dm] = obj
    assert out[True].region.size > 2 * 3000  # several chunks
    np.testing.assert_array_equal(out[True].mask(), out[False].mask())
    np.testing.assert_allclose(out[True].logits, out[False].logits, rtol=1e-5, atol=1e-5)
    assert out[True].mask().sum() > 50


FUSED_SCRIPT = r"""
import json, sys
import numpy as np
import torch
from imedsam_cuda.torch_sparse import DevicePlanner
from imedsam_deploy.sparse import SparseConfig
from tests.test_device_planner import _field

out = {"cases": [], "overflow": None, "backend": None}
rng = np.random.default_rng(11)
while len(out["cases"]) < 10:  # small outputs: the interpreter runs each program in numpy
    H, W, K = int(rng.integers(20, 72)), int(rng.integers(20, 72)), int(rng.integers(1, 3))
    dec, tdec = _field(rng, K)
    r0, c0 = int(rng.integers(0, H // 2)), int(rng.integers(0, W // 2))
    r1, c1 = int(rng.integers(r0 + 1, H + 1)), int(rng.integers(c0 + 1, W + 1))
    cfg = SparseConfig(stride=int(rng.choice([2, 4, 8, 16])), min_cells_across=0,
                       dilate=int(rng.integers(0, 3)),
                       logit_band=float(rng.choice([0.0, 0.5])), refine_on_head_disagreement=bool(rng.integers(0, 4)))
    plain, fused = (DevicePlanner((H, W), 0.125, cfg, "cpu") for _ in range(2))
    fused.fused = True
    h, w = r1 - r0, c1 - c0
    if not plain.usable(h, w):
        continue
    reg = torch.tensor([r0, h, c0, w])
    half = len(out["cases"]) % 2 == 1  # every other case: the logits in a 16-bit float, as a bf16 decoder's
    fn = (lambda c, t=tdec: tuple(o.half() if i < 2 else o for i, o in enumerate(t(c)))) if half else tdec
    # the fused plan from the region's inputs made on the host, as torch-cuda runs it
    a, b = plain.plan(fn, reg), fused.plan(fn, *(torch.from_numpy(v) for v in fused.region_inputs(r0, h, c0, w)))
    out["cases"].append({"cfg": [H, W, K, cfg.stride, cfg.dilate, cfg.logit_band, cfg.refine_on_head_disagreement,
                                 half],
                         "decisions": bool(torch.equal(a[1], b[1])),
                         "queried": [int(a[2]), int(b[2])], "needs": [a[4].tolist(), b[4].tolist()],
                         "overflow": [bool(a[3]), bool(b[3])], "scale": float(a[0].abs().max()),
                         "max_abs": float((a[0] - b[0]).abs().max())})
# a plan over its budget: flagged alike, with the same needs
dec, tdec = _field(np.random.default_rng(3), 1)
plain, fused = (DevicePlanner((128, 128), 0.125, SparseConfig(min_cells_across=0), "cpu", cap_per_side=1)
                for _ in range(2))
fused.fused = True
reg = torch.tensor([0, 128, 0, 128])
a, b = plain.plan(tdec, reg), fused.plan(tdec, reg)
out["overflow"] = {"flags": [bool(a[3]), bool(b[3])], "needs": [a[4].tolist(), b[4].tolist()]}
# through the torch backend: a decode and a sparse box with and without the kernels (tiny model, CPU, fp32)
from tests.kernel_checks import backend_runs
out["backend"] = backend_runs("fused_planner", True)
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def fused_compared() -> dict:
    pytest.importorskip("triton", reason="triton comes with torch's CUDA builds on Linux; this torch has none")
    from .conftest import run_in_triton_interpreter

    return run_in_triton_interpreter(FUSED_SCRIPT)


def test_fused_planner_kernels_plan_as_the_torch_ops(fused_compared):
    """``DevicePlanner.fused`` (each level's bookkeeping as five Triton kernels, run in Triton's interpreter) on
    random fields, output sizes, regions, strides 2-16, dilation 0-2, one or two classes, with and without the
    logit band and the heads' disagreement as ambiguity, the logits in fp32 or fp16 (the kernels widen them, the
    torch ops take them widened): the same decisions, points queried and per-pass needs (counted by the kernels)
    as the torch ops; the filled logits within fp32 rounding of ``F.interpolate``'s; an over-budget plan flagged
    alike."""
    cases = fused_compared["cases"]
    assert len(cases) == 10 and {c["cfg"][4] for c in cases} == {0, 1, 2} and {c["cfg"][2] for c in cases} == {1, 2}
    assert {c["cfg"][5] for c in cases} == {0.0, 0.5} and {c["cfg"][6] for c in cases} == {False, True}
    assert {c["cfg"][7] for c in cases} == {False, True}
    for c in cases:
        assert c["decisions"], c["cfg"]
        assert c["queried"][0] == c["queried"][1] > 0 and c["needs"][0] == c["needs"][1], c["cfg"]
        assert c["overflow"] == [False, False]
        assert c["max_abs"] <= 1e-6 * max(1.0, c["scale"]), c
    ov = fused_compared["overflow"]
    assert ov["flags"] == [True, True] and ov["needs"][0] == ov["needs"][1]


def test_the_torch_backend_plans_alike_with_the_planner_kernels(fused_compared):
    """TorchBackend(fused_planner=True): a device-planned sparse box with the same points queried, the same mask,
    logits within fp32 rounding (the decode untouched); switched off, the torch path is back, bitwise."""
    b = fused_compared["backend"]
    assert b["masks_equal"] and b["queried"][0] == b["queried"][1] > 0
    assert b["sparse_rel"] < 1e-6 and b["decode_rel"] == [0.0, 0.0, 0.0]
    assert "fused planner" in b["description"] and b["off_again_equal"]


def test_the_planner_kernels_compile_for_hopper_without_spilling():
    """Compiled ahead of time for sm_90 (no GPU needed) at every stride a 384² plan runs and two dilations, for
    one and two classes: no spills."""
    pytest.importorskip("triton", reason="triton comes with torch's CUDA builds on Linux; this torch has none")
    from imedsam_cuda.fused_planner import compile_for

    from .conftest import not_interpreted, triton_before

    not_interpreted()
    for s in (8, 4, 2, 1):
        for dilate in (1, 2):
            for k in (1, 2):
                for name, use in compile_for(s, k, dilate).items():
                    assert use["spill_stores"] == 0 and use["spill_loads"] == 0, (name, s, dilate, k, use)
                    # Triton 3.6 (the device image's) gives stride 8's cells 140 at two classes and a dilation
                    # of 2; still three or more 4-warp programs an SM
                    assert use["registers"] <= (160 if triton_before(3, 8) else 128), (name, s, dilate, k, use)


def test_configure_keeps_the_build_where_only_run_time_settings_change(shipped):
    """Switching the device planner, the device merge and the point buckets (read only as frames run:
    ``RUN_TIME_SETTINGS``) keeps the inference copy and drops only what frames made (planners, the memoised box
    part); the frames are then bitwise a fresh backend's with those settings, and those of before once switched
    back. Any other setting builds the copy anew."""
    from dataclasses import replace

    from imedsam_cuda.torch_cuda import RUN_TIME_SETTINGS, TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_deploy.runtime import Segmenter

    model, art = shipped
    rgb, box = sample_frame(0, (0.3, 0.3, 0.7, 0.65))
    base = TorchCudaSettings(precision="fp32")
    on = replace(base, device_planner=True, device_merge=True, bucket_points=True)
    assert {"device_planner", "device_merge", "bucket_points"} <= RUN_TIME_SETTINGS

    def frames(be: TorchBackend) -> list[tuple[np.ndarray, int]]:  # the planner's frame, and the merge's
        objs = [Segmenter(be, art, query=q).segment(rgb, box, (200, 300)).objects[0] for q in ("sparse", "full")]
        return [(o.mask(), o.queried) for o in objs]

    def same(a: list[tuple[np.ndarray, int]], b: list[tuple[np.ndarray, int]]) -> bool:
        return all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b, strict=True))

    be = TorchBackend(model, "cpu", base)
    copy, functions = be.model, be._fns
    before = frames(be)
    assert be._box_cache is not None and not be._planners
    be.configure(on)
    assert be.model is copy and be._fns is functions and be._box_cache is None and be.settings.device_planner
    assert same(frames(be), frames(TorchBackend(model, "cpu", on)))
    assert be._planners  # the device planner ran
    be.configure(base)
    assert be.model is copy and not be._planners and same(frames(be), before)
    be.configure(replace(base, align_matmuls=True))  # read by the build: the copy made anew
    assert be.model is not copy and be.settings.align_matmuls
