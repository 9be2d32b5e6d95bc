"""The ``lite`` preset (I-MedSAM on LiteMedSAM): untrained it is zero-shot LiteMedSAM on real polyps; LoRA
updates the q and v of each head; checkpoints hold only what was trained and reload identically on the same
base file only; phase 1 (decoder on cached embeddings) resumes to identical weights; its best.pt starts as
the base and ``imedsam-eval`` scores it beside LiteMedSAM (its export: test_lite_export.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from imedsam_core.errors import UserError
from imedsam_core.paths import BEST_CHECKPOINT, CHECKPOINT_DIR, LAST_CHECKPOINT
from imedsam_train.build import build, safe_torch_load
from imedsam_train.checkpoint import load_checkpoint, model_payload, save_checkpoint
from imedsam_train.data import kvasir_dataset
from imedsam_train.data.boxes import jitter_box, mask_box, stable_seed
from imedsam_train.evaluate import predict_logits
from imedsam_train.model.lite import HeadInterleavedLoRAQKV, LiteIMedSAM
from imedsam_train.preprocess import input_boxes, prepare_image, to_input
from imedsam_train.pretrained import LiteMedSAMBaseline, lite_medsam
from imedsam_train.train import Reporter, TrainConfig, train
from tests.conftest import SESSILE_STEMS as STEMS
from tests.conftest import child_env, encode_once, read_mask, read_rgb
from tests.ddp_helpers import free_port, plain_and_ddp_world_one


@pytest.fixture(scope="module")
def lite() -> LiteIMedSAM:
    m, digest = build("lite", input_size=256)
    assert isinstance(m, LiteIMedSAM) and digest is not None
    return m.eval()


def _case(sessile: Path, stem: str, jitter: float) -> tuple[np.ndarray, np.ndarray]:
    image = read_rgb(sessile / "images" / f"{stem}.jpg")
    gt = read_mask(sessile / "masks" / f"{stem}.jpg")
    box = jitter_box(mask_box(gt), jitter, gt.shape[1], gt.shape[0], np.random.default_rng(stable_seed(0, stem)))
    return image, box


@torch.no_grad()
def test_untrained_lite_is_litemedsam_on_real_polyps(sessile, lite):
    base = LiteMedSAMBaseline(lite_medsam())
    pre = lite.cfg.preprocess
    for stem in STEMS[1:2]:
        image, box = _case(sessile, stem, 20.0)
        u8, valid = prepare_image(image, pre, 256)
        x = to_input(u8, pre, valid)[None]
        b = input_boxes(box[None], pre, image.shape[:2], 256)
        # the padded model frame, every pixel centre: LiteMedSAM's low-resolution logits themselves
        low = base.model.decode(base.model.encode(x), b)[0, 0]
        full = lite(x, b).fine[0, 0].reshape(256, 256)
        torch.testing.assert_close(full, low, atol=1e-4, rtol=0)
        # evaluation's frame (the original stretched to O x O, padding never read): its crop-and-resize
        encode = encode_once(lite)
        for out in (256, 192):
            ours = predict_logits(lite, x, b, out, valid=valid, encode=encode)[0].reshape(out, out)
            ref = base.logits(image, box[None], (out, out))[0]
            torch.testing.assert_close(ours, ref, atol=3e-4, rtol=0)
            assert torch.equal(ours > 0, ref > 0)


@torch.no_grad()
def test_zero_shot_lite_is_litemedsam_on_a_real_ct_slice(shared_data):
    """``imedsam-export --zero-shot``'s model: LiteMedSAM's weights with nothing fine-tuned and no base smoothing,
    so its logits are LiteMedSAM's own pipeline's, for every organ of a real CT slice
    (the shipped polyp model's are not: it loses to LiteMedSAM there, benchmarks/RESULTS.md); built twice, the
    same weights (LoRA's A and the adapters' inner weights are drawn from a fixed seed)."""
    from imedsam_train.data.organ_png import organ_png_dataset
    from imedsam_train.pretrained import zero_shot_lite

    m = zero_shot_lite()
    assert isinstance(m, LiteIMedSAM) and m.cfg.decoder.base_smoothing == 0.0 and not m.training
    again = zero_shot_lite().state_dict()
    assert all(torch.equal(v, again[k]) for k, v in m.state_dict().items())
    ds = organ_png_dataset(shared_data / "ct-slices-amos-totalseg")
    s = next(r for r in ds.records if r.stem == "amos_0004_75").load()
    boxes = np.stack([mask_box(mk) for _, mk in s.masks])
    assert len(boxes) >= 3  # aorta, inferior vena cava, liver
    pre, hw = m.cfg.preprocess, s.image.shape[:2]
    u8, valid = prepare_image(s.image, pre, 256)
    x = to_input(u8, pre, valid)[None]
    base, encode = LiteMedSAMBaseline(lite_medsam()), encode_once(m)
    for box in boxes:  # evaluation's frame: the slice stretched to 192 x 192 (LiteMedSAM's crop and resize)
        ours = predict_logits(m, x, input_boxes(box[None], pre, hw, 256), 192, valid=valid,
                              encode=encode)[0].reshape(192, 192)
        ref = base.logits(s.image, box[None], (192, 192))[0]
        torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)  # the export's fp32 logit tolerance; logits ~30
        assert torch.equal(ours > 0, ref > 0)


@torch.no_grad()
def test_tta_is_mirror_equivariant_and_litemedsams_own_tta_when_untrained(sessile, lite):
    """--tta: the mirrored image's logits, mirrored back, averaged in. On an image whose longest side is the input
    size (no resize: the mirrored image prepares exactly to the mirrored frame), the average is exactly
    mirror-equivariant; untrained, it is zero-shot LiteMedSAM's with ``tta`` (two mirror paths, one result); and the
    mirrored pass changes the logits (the model is not mirror-symmetric)."""
    import cv2

    from imedsam_core.contract import mirror_box
    from imedsam_train.evaluate import Case, case_logits

    image, box = _case(sessile, STEMS[1], 20.0)
    h, w = image.shape[:2]
    image = cv2.resize(image, (200, 256), interpolation=cv2.INTER_AREA)  # 256 high: no resize inside
    box = np.array([box[0] * 200 / w, box[1] * 256 / h, box[2] * 200 / w, box[3] * 256 / h])
    pre = lite.cfg.preprocess

    def case(img: np.ndarray, b: np.ndarray) -> Case:
        u8, valid = prepare_image(img, pre, 256)
        return Case("x", 0, u8, np.zeros((80, 80), bool), b, (256, 200), img, valid)

    c = case(image, box)
    cm = case(np.ascontiguousarray(image[:, ::-1]), np.array(mirror_box(box, 200)))
    assert np.array_equal(mirror_box(mirror_box(box, 200), 200), box)
    out, encode = 80, encode_once(lite)  # two distinct inputs: the image and its mirror
    plain = case_logits(lite, c, out, encode).view(out, out)
    tta = case_logits(lite, c, out, encode, tta=True).view(out, out)
    tta_m = case_logits(lite, cm, out, encode, tta=True).view(out, out)
    torch.testing.assert_close(tta_m, tta.flip(-1), atol=1e-4, rtol=0)
    assert (tta - plain).abs().max() > 0.05
    ref = LiteMedSAMBaseline(lite_medsam(), tta=True).logits(image, box[None], (out, out))[0]
    torch.testing.assert_close(tta, ref, atol=3e-4, rtol=0)


@torch.no_grad()
def test_base_smoothing_smooths_the_base_map_as_litemedsams_and_rides_in_the_checkpoint(sessile, lite, tmp_path):
    """Untrained, the lite model's logit is LiteMedSAM's: with ``base_smoothing`` it is LiteMedSAM's logit map
    through the same Gaussian (what benchmarks/base_smoothing.py scores LiteMedSAM with), at every pixel
    centre; the edge hardly moves; a checkpoint saved from the model rebuilds it with its sigma."""
    from imedsam_train.model.smoothing import LogitSmoothing

    base = LiteMedSAMBaseline(lite_medsam())
    pre = lite.cfg.preprocess
    image, box = _case(sessile, STEMS[1], 20.0)
    u8, valid = prepare_image(image, pre, 256)
    x = to_input(u8, pre, valid)[None]
    b = input_boxes(box[None], pre, image.shape[:2], 256)
    emb = lite.encode(x)
    raw = lite.base_features(emb, b)[2]
    try:
        lite.set_base_smoothing(1.5)
        assert lite.cfg.decoder.base_smoothing == 1.5
        smooth = lite.base_features(emb, b)[2]
        torch.testing.assert_close(smooth, LogitSmoothing(1.5)(raw), atol=1e-6, rtol=0)
        assert float((smooth - raw).abs().max()) > 0.1  # it did something
        lm_low, lm_valid = base.low_logits(image, box[None])
        assert lm_valid == valid
        torch.testing.assert_close(lite(x, b).fine[0, 0].reshape(256, 256), LogitSmoothing(1.5)(lm_low)[0, 0],
                                   atol=1e-4, rtol=0)
        m_s, m_r = (smooth > 0), (raw > 0)
        assert 2 * float((m_s & m_r).sum()) / float(m_s.sum() + m_r.sum()) > 0.99  # the edge stays
        path = tmp_path / "s.pt"
        save_checkpoint(path, model_payload(lite, "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
                                            "lite_medsam.pth"))
        back, _ = load_checkpoint(path)
        assert back.cfg.decoder.base_smoothing == 1.5
        assert torch.equal(back(x, b).fine, lite(x, b).fine)
        assert not any("smoothing" in k for k in safe_torch_load(path)["model"])  # the taps come from the config
    finally:
        lite.set_base_smoothing(0.0)
    assert lite.base_smoothing is None and torch.equal(lite.base_features(emb, b)[2], raw)


def test_lora_updates_q_and_v_of_each_head_and_merges():
    torch.manual_seed(0)
    q = HeadInterleavedLoRAQKV(20, 4, heads=4)
    with torch.no_grad():
        q.lora_b_q.normal_()
        q.lora_b_v.normal_()
    x = torch.randn(3, 7, 20)
    upd = (q(x) - torch.nn.functional.linear(x, q.weight, q.bias)).view(3, 7, 4, 3, 5)
    assert torch.equal(upd[..., 1, :], torch.zeros_like(upd[..., 1, :]))  # keys untouched, every head
    qd = (x @ (q.lora_b_q @ q.lora_a_q).t()).view(3, 7, 4, 5)
    torch.testing.assert_close(upd[..., 0, :], qd)
    before = q(x)
    q.merge()
    q.merge()  # idempotent
    torch.testing.assert_close(q(x), before, atol=1e-5, rtol=0)


def test_checkpoint_holds_the_trained_part_and_reloads_on_its_base_only(lite, tmp_path):
    torch.manual_seed(1)
    m, _ = build("lite", input_size=256)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    m.eval()
    path = tmp_path / "c.pt"
    save_checkpoint(path, model_payload(m, "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
                                        "lite_medsam.pth"))
    stored = safe_torch_load(path)["model"]
    enc = [k for k in stored if k.startswith("image_encoder.")]
    assert enc and all(".lora_" in k or ".freq." in k for k in enc)  # no frozen base weight nor buffer
    assert not any(k.startswith(("mask_decoder.transformer.", "mask_decoder.iou_prediction_head.")) for k in stored)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    params = dict(m.named_parameters())
    assert sum(v.numel() for k, v in stored.items() if k in params) == trainable  # + the INR's BatchNorm buffers
    back, _ = load_checkpoint(path)
    x = torch.rand(1, 3, 256, 256)
    b = torch.tensor([[40.0, 50.0, 180.0, 200.0]])
    with torch.no_grad():
        a, r = m(x, b, out_size=(64, 64)), back(x, b, out_size=(64, 64))
    assert torch.equal(a.fine, r.fine) and torch.equal(a.coarse, r.coarse)
    # the same checkpoint claiming another base: refused in one line
    ck = safe_torch_load(path)
    ck["base"]["sha256"] = "0" * 64
    other = tmp_path / "other.pt"
    save_checkpoint(other, ck)
    with pytest.raises(UserError) as e:
        load_checkpoint(other)
    assert "sha256" in str(e.value) and "\n" not in str(e.value)


def test_info_lite_prints_the_trainable_count():
    from imedsam_train.cli import app

    res = CliRunner().invoke(app, ["info", "lite"])
    assert res.exit_code == 0, res.output
    m, _ = build("lite", input_size=256)
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert f"trainable: {n}" in res.output and "lora" in res.output and "frequency_adapter" in res.output


def _weights(p: Path) -> dict[str, torch.Tensor]:
    return safe_torch_load(p)["model"]


def test_phase1_killed_and_resumed_gives_identical_weights(sessile, tmp_path, monkeypatch):
    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tr.txt").write_text("\n".join(STEMS) + "\n")
    (tmp_path / "va.txt").write_text(STEMS[0] + "\n")
    tr, va = kvasir_dataset(sessile, tmp_path / "tr.txt"), kvasir_dataset(sessile, tmp_path / "va.txt")
    cfg = TrainConfig(name="r", model="lite", input_size=256, epochs=0, decoder_epochs=2, batch_size=2, points=128,
                      warmup_steps=2)
    quiet = Reporter(echo=lambda s: None, progress=False)
    train(cfg, tr, va, root=tmp_path / "clean", reporter=quiet)
    cached = sorted((tmp_path / "cache").rglob("*.pt"))
    # 3 train inputs (the val image is one of them: the same input, the same entry)
    assert len(cached) == 3 and not list((tmp_path / "cache").rglob("*.tmp"))
    # killed during epoch 2 (2 steps an epoch): last.pt holds epoch 1; resumed, it ends where the clean run did
    assert train(cfg, tr, va, root=tmp_path / "killed", reporter=quiet, stop_after_steps=3)["stopped"]
    ck = tmp_path / "killed/runs/r" / CHECKPOINT_DIR
    assert safe_torch_load(ck / LAST_CHECKPOINT)["train"]["epoch"] == 0
    train(cfg, tr, va, root=tmp_path / "killed", resume=True, reporter=quiet)
    a = _weights(tmp_path / "killed/runs/r" / CHECKPOINT_DIR / LAST_CHECKPOINT)
    b = _weights(tmp_path / "clean/runs/r" / CHECKPOINT_DIR / LAST_CHECKPOINT)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # phase 1 trains the decoder only: the encoder's LoRA and adapters are as built
    enc = {k: v for k, v in a.items() if k.startswith("image_encoder.")}
    assert all(not v.any() for k, v in enc.items() if ".lora_b_" in k or ".up." in k)
    assert sorted(cached) == sorted((tmp_path / "cache").rglob("*.pt"))  # nothing recomputed
    # what was cached is LiteMedSAM's embedding (frozen BatchNorm statistics, not the batch's)
    m, _ = build("lite", input_size=256)
    u8, valid = prepare_image(read_rgb(sessile / "images" / f"{STEMS[0]}.jpg"), m.cfg.preprocess, 256)
    x = to_input(u8, m.cfg.preprocess, valid)
    from imedsam_train.train_lite import EmbeddingCache

    with torch.no_grad():
        ref = lite_medsam().encode(x[None])[0]
    got = EmbeddingCache(m, "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",  # type: ignore[arg-type]
                         tmp_path / "cache" / "lite-embeddings").one(x).float()
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=1e-2)


def test_untrained_best_scores_as_litemedsam_in_eval(sessile, tmp_path, monkeypatch):
    from imedsam_train.eval_cli import app

    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "one.txt").write_text(STEMS[1] + "\n")  # untrained, every case scores as LiteMedSAM: one will do
    ds = kvasir_dataset(sessile, tmp_path / "one.txt")
    cfg = TrainConfig(name="b", model="lite", input_size=256, epochs=0, decoder_epochs=0)
    out = train(cfg, ds, ds, root=tmp_path, reporter=Reporter(echo=lambda s: None, progress=False))
    assert out["best_epoch"] == 0
    best = tmp_path / "runs/b" / CHECKPOINT_DIR / BEST_CHECKPOINT
    js = tmp_path / "s.json"
    res = CliRunner().invoke(app, [str(best), "--data", str(sessile), "--split", str(tmp_path / "one.txt"),
                                   "--box-jitter", "20", "--baseline", "litemedsam", "--json", str(js)])
    assert res.exit_code == 0, res.output
    s = json.loads(js.read_text())
    assert s["input_size"] == 256 and s["n"] == 1
    assert abs(s["dice"] - s["baselines"]["litemedsam"]) < 0.01, s


def test_init_from_starts_from_another_lite_run_and_refuses_phase1_after_end_to_end(sessile, tmp_path, monkeypatch):
    """Kvasir-SEG first, then Kvasir-Sessile: the second run starts from the first's best.pt (validated as its
    epoch 0); phase 1's cached embeddings are refused after a run whose encoder was trained."""
    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tr.txt").write_text("\n".join(STEMS[:2]) + "\n")
    ds = kvasir_dataset(sessile, tmp_path / "tr.txt")
    lines: list[str] = []
    rep = Reporter(echo=lines.append, progress=False)
    first = TrainConfig(name="a", model="lite", input_size=256, epochs=0, decoder_epochs=1, batch_size=2, points=128,
                        warmup_steps=1, lr_rest=1e-3)
    train(first, ds, ds, root=tmp_path, reporter=rep)
    best_a = tmp_path / "runs/a" / CHECKPOINT_DIR / BEST_CHECKPOINT
    a_val = safe_torch_load(best_a)["train_meta"]["val_dice"]
    second = TrainConfig(name="b", model="lite", input_size=256, epochs=0, decoder_epochs=1, batch_size=2,
                         points=128, warmup_steps=1, init_from=str(best_a))
    lines.clear()
    train(second, ds, ds, root=tmp_path, reporter=rep)
    start = next(x for x in lines if x.startswith("epoch 0"))
    assert "--init-from" in start and f"{a_val:.2f}" in start  # the same weights, the same val Dice
    # a checkpoint whose LoRA moved (an end-to-end epoch): phase 1 after it is refused, --epochs only is fine
    m, _ = load_checkpoint(best_a)
    with torch.no_grad():
        next(x for x in m.modules() if isinstance(x, HeadInterleavedLoRAQKV)).lora_b_q.fill_(0.01)
    moved = tmp_path / "moved.pt"
    save_checkpoint(moved, {**model_payload(m, "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
                                            "lite_medsam.pth"), "classes": list(ds.class_names)})
    with pytest.raises(UserError) as e:
        train(dataclasses.replace(second, name="c", init_from=str(moved)), ds, ds, root=tmp_path, reporter=rep)
    assert "end to end" in str(e.value) and "\n" not in str(e.value)


def test_ddp_world_size_one_matches_the_plain_run_in_both_phases(sessile, tmp_path, monkeypatch):
    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tr.txt").write_text("\n".join(STEMS[:2]) + "\n")
    (tmp_path / "va.txt").write_text(STEMS[0] + "\n")  # one val image: validation is not what is compared
    ds, va = kvasir_dataset(sessile, tmp_path / "tr.txt"), kvasir_dataset(sessile, tmp_path / "va.txt")
    cfg = TrainConfig(name="w", model="lite", input_size=256, epochs=1, decoder_epochs=1, batch_size=2, points=128,
                      warmup_steps=1, lr_rest=1e-3)
    a, b = plain_and_ddp_world_one(cfg, ds, va, tmp_path, monkeypatch)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=1e-6, rtol=0, msg=k)
    # the end-to-end epoch moved LoRA: both phases ran under the DDP wrapper
    assert any(v.any() for k, v in b.items() if ".lora_b_" in k)


def test_torchrun_two_ranks_shard_the_cache_and_rank0_writes_the_run(sessile, tmp_path):
    """Two CPU processes (gloo): each encodes half of the inputs into the shared cache, gradients are averaged,
    rank 0 alone validates and writes the checkpoints and the finished marker."""
    import subprocess
    import sys

    from imedsam_core.paths import FINISHED_NAME

    data = tmp_path / "data"
    (data / "splits").mkdir(parents=True)
    for sub in ("images", "masks"):
        (data / sub).mkdir()
        for s in STEMS[:3]:
            (data / sub / f"{s}.jpg").symlink_to(sessile / sub / f"{s}.jpg")
    (data / "splits/train.txt").write_text("\n".join(STEMS[:3]) + "\n")
    (data / "splits/val.txt").write_text(STEMS[0] + "\n")
    # TMPDIR: torchrun keeps its workers' log folders (/tmp/torchelastic_*) after a run; here they go with tmp_path
    (tmp_path / "tmp").mkdir()
    env = child_env(IMEDSAM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", IMEDSAM_PROGRESS_SECONDS="1000",
                    TMPDIR=str(tmp_path / "tmp"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "imedsam_train.cli", "folder", str(data), "--model", "lite", "--name", "t2",
           "--decoder-epochs", "2", "--epochs", "0", "--batch-size", "1", "--points", "128", "--device", "cpu",
           "--threads", "1", "--warmup-steps", "1", "--lr-rest", "1e-3"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs/t2"
    assert (run / FINISHED_NAME).is_file()
    # rank 0 alone reports
    assert r.stdout.count("epoch 2/2 [decoder] loss") == 1 and r.stdout.count("done: best val Dice") == 1
    # 3 distinct inputs, rank 0 encoded its share (inputs 0 and 2 of 4: the val image is a train image)
    cached = sorted((tmp_path / "cache").rglob("*.pt"))
    assert len(cached) == 3 and not list((tmp_path / "cache").rglob("*.tmp"))
    assert "embedding cache: 2 inputs, 2 computed" in r.stdout  # rank 0: items 0 and 2 (item 0 is also val)
    ck = safe_torch_load(run / CHECKPOINT_DIR / LAST_CHECKPOINT)
    assert [h["epoch"] for h in ck["train"]["history"]] == [1, 2]
    # 3 items over 2 ranks at batch 1 (rank 1's share padded to 2): 2 steps an epoch on each rank
    assert ck["train"]["scheduler"]["last_epoch"] == 4
    dec = {k: v for k, v in ck["model"].items() if k.startswith("inr.")}
    torch.manual_seed(0)  # the run's seed: the same initial decoder
    base = {k: v for k, v in model_payload(build("lite", input_size=256)[0], "x", "y")["model"].items()
            if k.startswith("inr.")}
    assert dec.keys() == base.keys() and any(not torch.equal(dec[k], base[k]) for k in dec)
    assert all(torch.isfinite(v).all() for v in dec.values())


def test_lite_augmentation_moves_image_mask_and_box_together_and_is_a_function_of_the_seed(sessile):
    """Phase 2's augmentation acts on the letterboxed image's valid region: a flip moves the image, the mask and
    the tight box alike, the padding stays zero, and a draw depends on (seed, epoch, index) alone."""
    from torchvision.transforms import v2

    from imedsam_train.data.augment import train_transforms
    from imedsam_train.data.records import Dataset
    from imedsam_train.train_lite import augmented, item_draw, lite_items

    m, _ = build("lite", input_size=256)
    pre = m.cfg.preprocess
    ds = kvasir_dataset(sessile, "test")
    items, _ = lite_items(Dataset(ds.records[:1], ds.class_names, ds.source), pre, 256)
    it = items[0]
    h, w = it.valid
    assert (h, w) != (256, 256)  # the test needs padding to check
    flip = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.ToDtype(torch.float32, scale=True)])
    a = augmented(it, flip, 0, 256)
    assert torch.equal(a.image[:, :h, :w], it.image[:, :h, :w].flip(-1))
    assert torch.equal(a.mask[:h, :w], it.mask[:h, :w].flip(-1))
    assert not a.image[:, h:, :].any() and not a.image[:, :, w:].any() and not a.mask[h:, :].any()
    scale = 256 / max(it.orig_size)
    tb = mask_box(it.mask.numpy())
    assert tb is not None
    np.testing.assert_allclose(a.tight * scale, [w - tb[2], tb[1], w - tb[0], tb[3]])

    tf = train_transforms()
    one = item_draw(it, pre, 256, 0, 3, 7, 256, 20.0, tf)
    again = item_draw(it, pre, 256, 0, 3, 7, 256, 20.0, tf)
    other = item_draw(it, pre, 256, 0, 4, 7, 256, 20.0, tf)
    plain = item_draw(it, pre, 256, 0, 3, 7, 256, 20.0)
    for k in one:
        assert torch.equal(one[k], again[k]), k
    assert not torch.equal(one["input"], other["input"]) and not torch.equal(one["input"], plain["input"])
    assert one["labels"].any() and not one["labels"].all()  # points on both sides of the augmented boundary
