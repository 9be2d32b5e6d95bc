"""Data loading: folder pairs, Kvasir (official boxes), CVC TIFFs, BCV volumes, AMOS organ PNGs,
boxes and jitter, augmentation of image+mask+box together, bad-data errors, seeded training items."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from imedsam_core.errors import UserError
from imedsam_train.data import (
    cvc_dataset,
    folder_dataset,
    jitter_box,
    kvasir_dataset,
    mask_box,
    read_kvasir_boxes,
    read_split,
)
from imedsam_train.data.io import read_image, read_mask
from imedsam_train.data.records import remove_specks
from imedsam_train.data.training_set import TrainSet, boundary_band, cache_dataset, sample_points
from imedsam_train.evaluate import cases_from_dataset
from tests.conftest import SAMPLE_DATA
from tests.conftest import read_mask as ref_read_mask


def _small_folder(tmp_path: Path, n: int = 4) -> Path:
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in read_split(SAMPLE_DATA / "splits" / "train.txt")[:n]:
        shutil.copy(SAMPLE_DATA / "images" / f"{stem}.jpg", root / "images")
        shutil.copy(SAMPLE_DATA / "masks" / f"{stem}.png", root / "masks")
    return root


def test_sample_folder_and_splits():
    ds = kvasir_dataset(SAMPLE_DATA, "test")
    assert [r.stem for r in ds.records] == read_split(SAMPLE_DATA / "splits" / "test.txt")
    full = folder_dataset(SAMPLE_DATA)
    assert len(full.records) == 40
    s = ds.records[0].load()
    assert s.image.dtype == np.uint8 and s.image.shape[2] == 3
    (cls, m), = s.masks
    assert cls == 0 and m.dtype == bool and m.shape == s.image.shape[:2]
    np.testing.assert_array_equal(m, ref_read_mask(ds.records[0].mask_paths[0][1]))


def test_image_without_mask_is_an_error_naming_it(tmp_path):
    root = _small_folder(tmp_path)
    victim = sorted((root / "masks").iterdir())[1]
    victim.unlink()
    with pytest.raises(UserError, match=victim.stem):
        folder_dataset(root)


def test_size_mismatch_and_unreadable_files(tmp_path):
    from PIL import Image

    root = _small_folder(tmp_path)
    mask = sorted((root / "masks").iterdir())[0]
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    ds = folder_dataset(root)
    with pytest.raises(UserError, match=f"{mask.name}.*does not match"):
        ds.records[0].load()
    bad = sorted((root / "images").iterdir())[1]
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match=bad.name):
        ds.records[1].load()
    with pytest.raises(UserError, match="stem 'nope'"):
        (root / "split.txt").write_text("nope\n")
        folder_dataset(root, root / "split.txt")


def test_empty_masks_are_skipped_and_counted(tmp_path):
    from PIL import Image

    root = _small_folder(tmp_path)
    m = sorted((root / "masks").iterdir())[0]
    shape = np.asarray(Image.open(m)).shape[:2]
    Image.fromarray(np.zeros(shape, np.uint8)).save(m)
    cache, empty = cache_dataset(folder_dataset(root), 64)
    assert empty == 1 and len(cache) == 3
    skipped: dict[str, int] = {}
    cases = list(cases_from_dataset(folder_dataset(root), 64, 64, 0.0, 0, skipped))
    assert len(cases) == 3 and skipped == {"empty_mask": 1}


def test_tiff_pillow_cannot_open_goes_through_tifffile(tmp_path):
    """CVC-ClinicDB layout with float RGB TIFFs (Pillow refuses them) and a uint8 TIFF mask."""
    import tifffile
    from PIL import Image, UnidentifiedImageError

    root = tmp_path / "CVC-ClinicDB"
    (root / "Original").mkdir(parents=True)
    (root / "Ground Truth").mkdir()
    rng = np.random.default_rng(0)
    img = rng.random((24, 32, 3)).astype(np.float32)
    tifffile.imwrite(root / "Original" / "1.tif", img, photometric="rgb")
    mask = np.zeros((24, 32), np.uint8)
    mask[5:15, 8:20] = 255
    tifffile.imwrite(root / "Ground Truth" / "1.tif", mask)
    with pytest.raises(UnidentifiedImageError), Image.open(root / "Original" / "1.tif") as im:
        im.load()
    ds = cvc_dataset(root)
    s = ds.records[0].load()
    np.testing.assert_allclose(s.image, np.round(img * 255), atol=1)
    np.testing.assert_array_equal(s.masks[0][1], mask > 127)
    (root / "Original" / "2.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(UserError, match="2.tif"):
        read_image(root / "Original" / "2.tif")


def test_kvasir_seg_official_boxes_match_mask_boxes(shared_data):
    root = shared_data / "Kvasir-SEG"
    boxes = read_kvasir_boxes(root / "kavsir_bboxes.json")
    assert len(boxes) == 1000
    single = [s for s in read_split(root / "splits" / "pranet_test.txt") if len(boxes[s]) == 1][:5]
    for stem in single:
        tight = mask_box(remove_specks(read_mask(root / "masks" / f"{stem}.jpg")))
        assert tight is not None
        # official boxes were drawn on the same masks: within a few pixels of the tight box
        assert np.abs(boxes[stem][0] - tight).max() <= 3, (stem, boxes[stem][0], tight)
    bad = Path(root.parent.parent) / "nonexistent.json"
    with pytest.raises(UserError, match="not found"):
        read_kvasir_boxes(bad)


def test_single_pixel_specks_are_removed_before_boxes(shared_data):
    """cju15wdt3zla10801odjiw7sy carries a stray pixel at (0, 0) that would make the box the whole image."""
    rec = kvasir_dataset(shared_data / "Kvasir-SEG", None).records
    r = next(r for r in rec if r.stem == "cju15wdt3zla10801odjiw7sy")
    raw = read_mask(r.mask_paths[0][1])
    clean = r.load().masks[0][1]
    assert raw[0, 0] and not clean[0, 0] and int(raw.sum()) - int(clean.sum()) == 1
    assert mask_box(clean)[0] > 250 and mask_box(raw)[0] == 0
    m = np.zeros((20, 20), bool)
    m[2:4, 2:4] = True  # 4 px: removed
    m[10:13, 10:12] = True  # 6 px: kept
    assert int(remove_specks(m).sum()) == 6


def test_read_pair_reads_as_records_do_specks_dropped_and_sizes_checked(tmp_path):
    """The benchmark scripts and export's real-image checks read by stem through read_pair: their tight boxes
    must be the ones training and evaluation take, not stretched to the corner by a stray pixel."""
    import cv2

    from imedsam_train.data.folder import read_pair

    root = _small_folder(tmp_path, 2)
    stem = folder_dataset(root).records[0].stem
    mp = root / "masks" / f"{stem}.png"
    m = cv2.imread(str(mp), cv2.IMREAD_GRAYSCALE)
    m[0, 0] = 255  # one stray pixel, as about 1 in 10 Kvasir masks carry
    cv2.imwrite(str(mp), m)
    rgb, gt = read_pair(root, stem)
    rec = next(r for r in folder_dataset(root).records if r.stem == stem).load()
    np.testing.assert_array_equal(rgb, rec.image)
    np.testing.assert_array_equal(gt, rec.masks[0][1])
    assert not gt[0, 0] and mask_box(gt)[:2].min() > 0 and mask_box(read_mask(mp))[0] == 0
    cv2.imwrite(str(mp), m[:-3])  # the mask no longer matches its image
    with pytest.raises(UserError, match=f"{stem}.png.*does not match"):
        read_pair(root, stem)
    with pytest.raises(UserError, match="no file for the stem 'nope'"):
        read_pair(root, "nope")


def test_kvasir_seg_exclusion_list_is_disjoint_from_sessile_eval(shared_data):
    excl = set(read_split(shared_data / "Kvasir-SEG/splits/train_excluding_sessile_val_test.txt"))
    held = set(read_split(shared_data / "Kvasir-Sessile/splits/val.txt")) | set(
        read_split(shared_data / "Kvasir-Sessile/splits/test.txt"))
    assert not excl & held


def test_mask_box_and_seeded_jitter():
    m = np.zeros((50, 60), bool)
    m[10:20, 5:40] = True
    box = mask_box(m)
    np.testing.assert_array_equal(box, [5, 10, 40, 20])
    assert mask_box(np.zeros((5, 5), bool)) is None
    a = jitter_box(box, 20, 60, 50, np.random.default_rng(3))
    b = jitter_box(box, 20, 60, 50, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a[0] <= box[0] and a[1] <= box[1] and a[2] >= box[2] and a[3] >= box[3]
    assert a[0] >= 0 and a[1] >= 0 and a[2] <= 60 and a[3] <= 50
    outs = np.array([jitter_box(box, 4, 1000, 1000, np.random.default_rng(s)) - box for s in range(200)])
    assert np.abs(outs).max() <= 4 and np.abs(outs).max() > 3  # spans 0..4 px


def test_augmentation_moves_image_mask_and_box_together():
    from torchvision.transforms import v2

    from imedsam_train.data.augment import apply, train_transforms

    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    img[:, 10:30, 20:50] = 200
    mask = img[0] > 0
    box = torch.tensor([20.0, 10.0, 50.0, 30.0])
    i2, m2, b2 = apply(v2.Compose([v2.RandomHorizontalFlip(p=1.0)]), img, mask, box)
    assert torch.equal(torch.from_numpy(mask_box(m2.numpy())).float(), b2)
    assert torch.equal(i2[0] > 0, m2)
    tf = train_transforms()
    for seed in range(5):
        torch.manual_seed(seed)
        i3, m3, b3 = apply(tf, img, mask, box)
        assert i3.dtype == torch.float32 and i3.min() >= 0 and i3.max() <= 1
        if m3.any():  # the transformed box encloses the transformed object
            t = mask_box(m3.numpy())
            assert b3[0] <= t[0] + 1 and b3[1] <= t[1] + 1 and b3[2] >= t[2] - 1 and b3[3] >= t[3] - 1


def test_training_items_are_seeded_and_points_concentrate_on_the_boundary():
    cache, _ = cache_dataset(kvasir_dataset(SAMPLE_DATA, "val"), 64)
    ts = TrainSet(cache, 64, seed=1, points=256, jitter_px=4)
    a, b = ts[2], ts[2]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ts.set_epoch(1)
    assert not torch.equal(ts[2]["image"], a["image"])
    mask = cache[0].masks[0][1]
    idx = sample_points(mask, torch.tensor([0.0, 0.0, 64.0, 64.0]), 400, torch.Generator().manual_seed(0))
    band = boundary_band(mask, 3).flatten()
    assert band[idx].float().mean() >= 0.5 > band.float().mean()
    full = TrainSet(cache, 64, seed=1, points=0, jitter_px=0, augment=False)[0]
    assert full["coords"].shape == (64 * 64, 2)
    assert torch.equal(full["labels"].reshape(64, 64).bool(), cache[0].masks[0][1])


# --- CT: BCV/Synapse volumes and AMOS-style organ PNGs ---

def _write_volume(root: Path, case: str, shape=(40, 30, 6)) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "label").mkdir(exist_ok=True)
    hu = np.full(shape, -1000, np.int16)
    hu[5:35, 5:25, :] = 40
    lab = np.zeros(shape, np.uint8)
    lab[10:20, 8:16, 1:3] = 6  # liver on slices 1-2
    lab[22:30, 10:14, 2:5] = 1  # spleen on slices 2-4
    nib.save(nib.Nifti1Image(hu, np.eye(4)), root / "img" / f"img{case}.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "label" / f"label{case}.nii.gz")
    return hu, lab


def test_bcv_volumes_to_slices(tmp_path):
    from imedsam_core.volume_view import CT_WINDOW
    from imedsam_train.data.volumes import BCV_CLASSES, bcv_dataset

    root = tmp_path / "BCV"
    _write_volume(root, "0001")
    _write_volume(root, "0002")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("0002\n")
    ds = bcv_dataset(root, "train")
    assert ds.class_names == BCV_CLASSES and len(BCV_CLASSES) == 13
    assert [r.stem for r in ds.records] == [f"case0002_z{z:03d}" for z in (1, 2, 3, 4)]
    assert ds.skipped == {"empty_slice": 2}
    s = {r.stem: r.load() for r in ds.records}["case0002_z002"]
    assert sorted(c for c, _ in s.masks) == [BCV_CLASSES.index("spleen"), BCV_CLASSES.index("liver")]
    assert sorted(int(m.sum()) for _, m in s.masks) == [32, 80]
    lo, hi = CT_WINDOW
    assert s.image[0, 0, 0] == 0 and s.image[15, 15, 0] == round((40 - lo) / (hi - lo) * 255)
    assert all(mask_box(m) is not None for _, m in s.masks)  # one box per organ per slice
    (root / "splits" / "val.txt").write_text("0009\n")
    with pytest.raises(UserError, match="0009"):
        bcv_dataset(root, "val")


def test_bcv_label_shape_mismatch(tmp_path):
    import nibabel as nib

    from imedsam_train.data.volumes import bcv_dataset

    root = tmp_path / "BCV"
    _write_volume(root, "0003")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), root / "label" / "label0003.nii.gz")
    with pytest.raises(UserError, match="label0003.nii.gz.*does not match"):
        bcv_dataset(root)


def test_bcv_label_stored_in_another_orientation(tmp_path):
    """Slices are taken in stored voxel order, so a label volume stored otherwise than its image is refused
    (it would not lie on the image's voxels)."""
    import nibabel as nib

    from imedsam_train.data.volumes import bcv_dataset

    root = tmp_path / "BCV"
    _, lab = _write_volume(root, "0004")
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # first axis stored right-to-left: LAS where the image is RAS
    nib.save(nib.Nifti1Image(lab[::-1], flipped), root / "label" / "label0004.nii.gz")
    with pytest.raises(UserError, match="label0004.nii.gz: stored in LAS voxel order, its image img0004.nii.gz in RAS"):
        bcv_dataset(root)


def test_bcv_reads_each_volume_once(tmp_path, monkeypatch):
    """The header's axis order comes from the volume already read, not from opening the file again."""
    import nibabel as nib

    from imedsam_train.data import volumes

    root = tmp_path / "BCV"
    _write_volume(root, "0005")
    opened: list[str] = []
    real = nib.load
    monkeypatch.setattr(nib, "load", lambda p, *a, **k: opened.append(Path(p).name) or real(p, *a, **k))
    ds = volumes.bcv_dataset(root)
    [r.load() for r in ds.records]
    assert sorted(opened) == ["img0005.nii.gz", "label0005.nii.gz"]


@pytest.mark.parametrize("data, problem", [
    (np.zeros((8, 8), np.int16), "expected a 3-D volume, got shape (8, 8)"),
    (np.zeros((8, 8, 4, 2), np.int16), "expected a 3-D volume, got shape (8, 8, 4, 2)"),
    (None, "not a readable NIfTI volume"),
])
def test_training_and_runtime_refuse_a_volume_alike(tmp_path, data, problem):
    """One reader (imedsam_core.nifti) for imedsam-train bcv and imedsam-infer: the same file, the same error."""
    import nibabel as nib

    from imedsam_deploy.volume import load_volume
    from imedsam_train.data.volumes import bcv_dataset

    root = tmp_path / "BCV"
    _write_volume(root, "0006")
    bad = root / "img" / "img0006.nii.gz"
    if data is None:
        bad.write_bytes(bad.read_bytes()[:100])  # truncated
    else:
        nib.save(nib.Nifti1Image(data, np.eye(4)), bad)
    with pytest.raises(UserError) as train_err:
        bcv_dataset(root)
    with pytest.raises(UserError) as infer_err:
        load_volume(bad)
    assert str(train_err.value).startswith(f"{bad}: {problem}"), train_err.value
    assert str(infer_err.value).startswith(f"{bad}: {problem}"), infer_err.value


def test_a_one_frame_4d_volume_reads_as_3d_in_training_and_runtime(tmp_path):
    import nibabel as nib

    from imedsam_deploy.volume import load_volume
    from imedsam_train.data.volumes import bcv_dataset

    root = tmp_path / "BCV"
    hu, _ = _write_volume(root, "0007")
    nib.save(nib.Nifti1Image(hu[..., None], np.eye(4)), root / "img" / "img0007.nii.gz")
    ds = bcv_dataset(root)
    s = {r.stem: r.load() for r in ds.records}["case0007_z002"]
    vol = load_volume(root / "img" / "img0007.nii.gz")
    assert vol.data.shape == hu.shape
    assert np.array_equal(s.image, vol.slice_rgb(2))  # training sees the runtime's picture


def test_real_ct_volume_slices(shared_data):
    import json

    from imedsam_train.data.volumes import volume_records

    root = shared_data / "ct-volume-totalseg"
    names = json.loads((root / "label_names.json").read_text())["labels"]
    want = {int(k): i for i, k in enumerate(k for k, v in names.items() if v in ("liver", "spleen"))}
    skipped: dict[str, int] = {}
    recs = volume_records(root / "images/example_ct_sm.nii.gz", root / "masks/example_seg.nii.gz", want, "ts", skipped)
    assert recs and len(recs) + skipped.get("empty_slice", 0) == 30
    s = recs[len(recs) // 2].load()
    assert s.image.shape == (101, 122, 3) and s.image.dtype == np.uint8
    assert s.masks and all(m.any() for _, m in s.masks)


def test_amos_organ_pngs(shared_data):
    from imedsam_train.data.organ_png import organ_png_dataset

    ds = organ_png_dataset(shared_data / "ct-slices-amos-totalseg")
    assert {"liver", "spleen", "aorta"} <= set(ds.class_names)
    by = {r.stem: r for r in ds.records}
    s = by["amos_0006_90"].load()
    assert sorted(ds.class_names[c] for c, _ in s.masks) == ["aorta", "inferior_vena_cava", "liver", "spleen"]
    liver = organ_png_dataset(shared_data / "ct-slices-amos-totalseg", classes=["liver"])
    cache, empty = cache_dataset(liver, 64)
    assert {c.stem for c in cache} == {"amos_0004_75", "amos_0006_90"}
    assert all(c.masks[0][0] == 0 for c in cache)


def test_synapse_slice_fixture_has_only_background(shared_data):
    ds = folder_dataset(shared_data / "bcv-synapse-slices")
    cache, empty = cache_dataset(ds, 64)
    assert cache == [] and empty == 2
