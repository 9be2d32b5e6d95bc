"""The benchmark scripts that run where CI cannot (a lent GPU for a few minutes) are dry-run here on the CPU, so
an API change breaks them in CI rather than during a device session."""

from __future__ import annotations

import importlib.util
import json

from benchmarks import gpu_check, host_overhead


def test_gpu_check_dry_run_runs_every_variant_and_agrees(tmp_path):
    rc = gpu_check.main(["--device", "cpu", "--model", "tiny", "--quick", "--input-size", "64", "--sizes", "128",
                         "--batches", "1", "--compile", "none", "--memory-sizes", "64", "96", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    try:
        import triton

        want = triton.__version__
    except ImportError:  # a torch build without it
        want = None
    assert res["info"]["triton"] == want  # the kernels' compiler is recorded with the torch version
    assert res["correctness"]["full fp32"]["pixel_in_box"] >= 0.999  # the runtime's fp32 full grid = reference
    (row,) = res["timing"]
    assert "errors" not in row and "skipped" not in row
    variants = {k for k, v in row.items() if isinstance(v, dict) and "p50_ms" in v}
    assert variants == {"reference fp32", "full bf16", "sparse bf16", "sparse bf16 host", "box bf16", "fused bf16",
                        "fused-sparse bf16"}
    for name in variants - {"reference fp32"}:
        assert row[name]["agreement"]["pixel_in_box"] >= 0.98, name  # bf16 against the fp32 reference
        assert row[name]["speedup_vs_reference"] > 0
    # the device planner (alone, and inside the one-graph frame) decides as the host planner does, and the
    # one-graph full grid as the chunked one (to bf16 rounding: a CPU GEMM's rows may round differently with
    # the number of rows it is given); the one-graph frames run the backend's own stages (its fp32 embedding
    # and up map), so they agree with the runtime's frames all but exactly (0.16 points apart when they
    # did not)
    def in_box(name):
        return row[name]["agreement"]["pixel_in_box"]

    assert abs(in_box("sparse bf16") - in_box("sparse bf16 host")) <= 0.005
    assert abs(in_box("fused-sparse bf16") - in_box("sparse bf16")) <= 0.001
    assert abs(in_box("fused bf16") - in_box("full bf16")) <= 0.001
    assert row["planner_fallbacks"]["bf16"] == [0, 0]
    opts = res["encoder_options"]
    assert len(opts) == 12 and not any("error" in o for o in opts)
    # the CPU backends' own encoder is the plain one; then the other form (lean), both options on; then the
    # lean one with its Triton kernels (norms, operands, frequency chain), which need a GPU; last the backend's
    # own with its box part in fp32, then with the norms fused too (a GPU again)
    assert [o["lean_encoder"] for o in opts] == [False] * 4 + [True] * 6 + [False] * 2
    assert [o["fp32_box_part"] for o in opts] == [False] * 10 + [True] * 2
    skipped = opts[5:10] + opts[11:]
    assert all("needs a CUDA device" in o["skipped"] for o in skipped)
    assert [(o["fused_norms"], o["fused_operands"], o["fused_frequency"]) for o in skipped] == [
        (True, False, False), (True, True, False), (True, True, True), (True, True, True), (False, True, False),
        (True, False, False)]
    opts = opts[:5] + opts[10:11]
    assert all(o["box_part_p50_ms"] > 0 for o in opts)  # batch 1: the box part timed beside the encoder
    for o in opts:  # the frequency stream changes nothing; the fused attention and the lean encoder stay
        # within bf16 rounding
        exact = not o["fused_attention"] and not o["lean_encoder"]
        assert o["max_abs_diff_vs_plain"] == 0.0 if exact else o["max_abs_diff_vs_plain"] < 0.1
    # sparse and full frames: grid_sample (default), Gather taps, zero-padded layers, with ReLU epilogues too
    opts = res["decoder_options"]
    ran = [o for o in opts if "skipped" not in o]
    assert [(o["grid_sample"], o["align_matmuls"], o["relu_epilogue"], o["query"]) for o in ran] == [
        (True, False, False, "sparse"), (True, False, False, "full"), (False, False, False, "sparse"),
        (False, False, False, "full"), (True, True, False, "sparse"), (True, True, False, "full"),
        (True, True, True, "sparse"), (True, True, True, "full")]
    assert not any("error" in o for o in ran) and all("mask_agreement" not in o for o in ran[:2])
    assert all(o["mask_agreement"] >= 0.999 for o in ran[2:])
    # then the fused point rows on top, which need a GPU
    skipped = [o for o in opts if "skipped" in o]  # the fused rows, then the fused uncertainty, then the planner
    assert [(o["fused_features"], o["fused_uncertainty"], o["fused_planner"]) for o in skipped] == [
        (True, False, False), (True, True, False), (True, True, True)]
    assert all("needs a CUDA device" in o["skipped"] for o in skipped)
    mem = res["memory"]  # every mode at each output size ran (the figures themselves need a GPU)
    assert [(m["out_size"], m["query"]) for m in mem] == [(o, q) for o in (64, 96) for q in ("full", "sparse")]
    assert not any("error" in m for m in mem)
    for name in ("encoder", "sparse frame", "full frame"):
        prof = res["kernel_profiles"][name]
        assert prof["kernels_per_call"] > 10 and prof["kernel_ms_per_call"] > 0 and prof["top"]


def test_host_overhead_runs(capsys):
    assert host_overhead.main(["--frames", "80x60", "--repeat", "3"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[:2] for r in rows] == [["80x60", q] for q in ("sparse", "box", "full")]
    assert all(float(v) >= 0 for r in rows for v in r[2:])


def test_op_count_counts_each_stage(capsys):
    from benchmarks import op_count

    assert op_count.main(["--model", "tiny", "--input-size", "64", "--out-sizes", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    counts = {line[:22].strip(): int(line[22:29]) for line in lines}
    assert set(counts) == {"encoder", "box part", "one decoder call", "sparse planner 64²"}
    assert all(n > 10 for n in counts.values())
    assert counts["sparse planner 64²"] > 3 * counts["one decoder call"]  # several decoder calls inside
    assert op_count.main(["--model", "tiny", "--input-size", "64", "--out-sizes", "64", "--gather-taps"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    gather = {line[:22].strip(): int(line[22:29]) for line in lines}
    # grid_sample: one op per map where the Gather taps take dozens; the rest of the decoder is the same
    assert gather["one decoder call"] - counts["one decoder call"] >= 60
    assert gather["encoder"] == counts["encoder"]
    if importlib.util.find_spec("triton") is not None:
        # the fused point rows: one launch for the two grid_samples, the Fourier encoding and the concatenations
        assert op_count.main(["--model", "tiny", "--input-size", "64", "--out-sizes", "64", "--fused-features"]) == 0
        lines = capsys.readouterr().out.splitlines()[1:]
        rows = {line[:22].strip(): int(line[22:29]) for line in lines}
        saved = counts["one decoder call"] - rows["one decoder call"]
        assert saved >= 5 and rows["sparse planner 64²"] == counts["sparse planner 64²"] - 5 * saved
        # the fused uncertainty: one launch for its seven fp32 ops (nine in bf16, with the casts to fp32)
        assert op_count.main(["--model", "tiny", "--input-size", "64", "--out-sizes", "64", "--fused-uncertainty"]) == 0
        lines = capsys.readouterr().out.splitlines()[1:]
        unc = {line[:22].strip(): int(line[22:29]) for line in lines}
        assert counts["one decoder call"] - unc["one decoder call"] == 6
        # the planner's kernels (run in Triton's interpreter): two launches a level for its ~35 bookkeeping ops
        assert op_count.main(["--model", "tiny", "--input-size", "64", "--out-sizes", "64", "--fused-planner"]) == 0
        lines = capsys.readouterr().out.splitlines()[1:]
        plan = {line[:22].strip(): int(line[22:29]) for line in lines}
        assert plan["one decoder call"] == counts["one decoder call"]
        assert counts["sparse planner 64²"] - plan["sparse planner 64²"] >= 60


def test_encoder_precision_runs(capsys):
    from benchmarks import encoder_precision

    assert encoder_precision.main(["--model", "tiny", "--input-size", "64", "--repeat", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[:3] for r in rows] == [["plain", "fp32", "GEMMs"], ["lean", "fp32", "SDPA"], ["plain", "bf16", "GEMMs"],
                                     ["plain", "bf16", "SDPA"], ["lean", "bf16", "SDPA"]]
    assert float(rows[0][3]) == 0.0 and float(rows[1][3]) < 0.01  # the reference; the lean rewrites: fp32 rounding
    assert all(0 < float(r[3]) < 5 and float(r[4]) > 0 for r in rows[2:])  # bf16 differs from fp32, but a little
    assert all(float(r[5]) > 0 for r in rows)  # each row's median time


def test_planner_budgets_runs_both_rules(capsys):
    from benchmarks import planner_budgets

    assert planner_budgets.main(["--model", "tiny", "--input-size", "64", "--sizes", "128", "--frames", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[:2] for r in rows] == [["needs", "128"], ["former", "128"]]
    decoded = {r[0]: int(r[-5]) for r in rows}  # "... decoded / needed (t s)"
    assert 0 < decoded["needs"] <= decoded["former"]  # the dilation's own budget at least


def test_kernel_build_compiles_the_kernels_it_is_asked_for(tmp_path, capsys):
    """kernel_build (run under the device image's Triton before a GPU session): every variant of the kernels named
    compiled for sm_90, each with its registers and spills, in the table and the JSON."""
    import pytest

    pytest.importorskip("triton", reason="triton comes with torch's CUDA builds on Linux; this torch has none")
    from benchmarks import kernel_build

    from .conftest import not_interpreted

    not_interpreted()
    out = tmp_path / "kb.json"
    assert kernel_build.main(["--only", "uncertainty", "attention_operands", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["capability"] == 90 and [r["kernel"] for r in got["rows"]] == ["uncertainty"] + ["attention_operands"] * 2
    for r in got["rows"]:
        assert 0 < r["registers"] <= 255 and r["spill_stores"] == r["spill_loads"] == 0, r
    table = capsys.readouterr().out
    assert "window 14" in table and "global" in table and table.count("\n") == 2 + len(got["rows"])


def test_gpu_lite_summary_takes_medians_of_times_and_means_of_dice():
    import numpy as np

    from benchmarks.gpu_lite import dice, summary, table

    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert dice(a, b) == 50.0 and dice(a, a) == 100.0 and dice(~a & a, ~a & a) == 100.0
    rows = [{"stem": str(i), "out_size": 256, "lite_s": t, "lite_amp_s": t / 2, "litemedsam_s": 0.03,
             "dice_lite": d, "dice_lite_amp": d, "dice_litemedsam": 90.0, "dice_amp_vs_fp32": 99.0}
            for i, (t, d) in enumerate([(0.01, 92.0), (0.02, 94.0), (0.09, 96.0)])]
    (s,) = summary({"rows": rows})
    assert s["n"] == 3 and s["lite_s"] == 0.02 and s["lite_amp_s"] == 0.01 and s["dice_lite"] == 94.0
    assert abs(s["speedup_fp32"] - 1.5) < 1e-12 and abs(s["speedup_amp"] - 3.0) < 1e-12
    assert "20.00" in table([s], "H200") and "1.50x/3.00x" in table([s], "H200")


def test_video_frames_summary_counts_lost_runs_and_frames_found_by_the_search():
    from benchmarks.video_frames import summary

    status = ["given", "tracked", "lost", "lost", "tracked", "tracked", "lost"]
    notes = ["", "", "empty mask", "empty mask", "found by its appearance", "", "unlike the object"]
    recs = [{"frame": t, "object": 0, "status": s, "note": n, "area": 0 if s == "lost" else 100 + 10 * t}
            for t, (s, n) in enumerate(zip(status, notes, strict=True))]
    recs.append({"frame": 0, "object": 1, "status": "given", "note": "", "area": 5})  # another object: not counted
    got = summary(recs, area_until=5)
    assert got == {"frames": 7, "given": 1, "tracked": 3, "lost": 3, "lost_runs": [(2, 3), (6, 6)],
                   "found_by_search": [4], "area_ratio": [1.1, 1.5]}


def test_lite_speed_bound_counts_both_encoders_and_bounds_the_speed_up():
    """``lite_speed --bound``: our encoder does LiteMedSAM's TinyViT's work and more (the frequency adapter and
    LoRA), the matmul rate is a rate, and the bound with the rest of our frame is below the bound without."""
    from benchmarks.lite_speed import compute_bound
    from imedsam_train.pretrained import LiteMedSAMBaseline, lite_medsam

    b = compute_bound(LiteMedSAMBaseline(lite_medsam()), litemedsam_seconds=1.0, rest_seconds=0.07)
    assert 60 < b["litemedsam_encoder_gflop"] < b["lite_encoder_gflop"] < 1.5 * b["litemedsam_encoder_gflop"]
    assert b["matmul_gflops"] > 1
    assert b["lite_encoder_floor_seconds"] == b["lite_encoder_gflop"] / b["matmul_gflops"]
    assert b["max_speedup"] == 1.0 / b["lite_encoder_floor_seconds"]
    assert b["max_speedup_with_rest"] == 1.0 / (b["lite_encoder_floor_seconds"] + 0.07) < b["max_speedup"]


def test_appearance_cost_runs(capsys):
    from benchmarks import appearance_cost

    assert appearance_cost.main(["--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name, _, _ in appearance_cost.SHAPES)


def test_base_smoothing_chooses_on_val_and_writes_the_checkpoint_with_its_sigma(sessile, tmp_path, capsys):
    """Two real val images, sigma 0 and 1.5: the scan scores both models at both sigmas, its sigma-0 LiteMedSAM
    row is zero-shot LiteMedSAM as eval scores it, the choice follows the stated rule, and the written
    checkpoint holds that sigma and the same weights."""
    from benchmarks import base_smoothing
    from imedsam_train.build import safe_torch_load
    from imedsam_train.checkpoint import load_checkpoint
    from imedsam_train.evaluate import cases_from_dataset
    from imedsam_train.metrics import all_metrics
    from imedsam_train.pretrained import LiteMedSAMBaseline, lite_medsam
    from imedsam_train.weights import shipped_checkpoint
    from tests.conftest import SESSILE_STEMS

    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
        for stem in SESSILE_STEMS[:2]:
            (data / sub / f"{stem}.jpg").symlink_to(sessile / sub / f"{stem}.jpg")
    (data / "splits").mkdir()
    (data / "splits" / "val.txt").write_text("\n".join(SESSILE_STEMS[:2]) + "\n")
    out, js = tmp_path / "s.pt", tmp_path / "s.json"
    rc = base_smoothing.main(["--data", str(data), "--sigmas", "0", "1.5", "--threads", "1", "--json", str(js),
                              "--write", str(out)])
    assert rc == 0
    res = json.loads(js.read_text())
    val = res["scores"]["val"]
    assert set(val) == {"0", "1.5"} and "test" not in res["scores"]
    ok = [k for k in val if val[k]["ours"]["hd95"] <= val["0"]["ours"]["hd95"]]
    assert res["chosen_sigma"] == float(max(ok, key=lambda k: (round(val[k]["ours"]["dice"], 6),
                                                              -val[k]["ours"]["hd95"])))
    from imedsam_train.eval_cli import load_data

    lm = LiteMedSAMBaseline(lite_medsam())
    cases = list(cases_from_dataset(load_data(data, "auto", data / "splits" / "val.txt"), 256, 256, 20.0, 0,
                                    keep_original=True))
    ref = [all_metrics(lm(c.original, c.box, 256), c.gt)["dice"] for c in cases]
    assert abs(val["0"]["litemedsam"]["dice"] - sum(ref) / len(ref)) < 1e-9
    back, _ = load_checkpoint(out)
    assert back.cfg.decoder.base_smoothing == res["chosen_sigma"]
    new, old = safe_torch_load(out), safe_torch_load(shipped_checkpoint())
    assert new["model"].keys() == old["model"].keys()
    assert all(new["model"][k].equal(old["model"][k]) for k in old["model"])
    assert new["train_meta"]["base_smoothing"]["chosen_sigma"] == res["chosen_sigma"]
    assert "chosen on val" in capsys.readouterr().out


def test_encoder_backend_eval_scores_each_encoder_on_the_same_cases(tmp_path, capsys):
    """A tiny model and its export on the bundled sample's test split: the fp32 graphs (ONNX Runtime, OpenVINO)
    score what the checkpoint's own encoder scores, with the same masks; a checkpoint the artifact was not exported
    from is refused before anything runs."""
    import pytest
    import torch

    from benchmarks import encoder_backend_eval
    from imedsam_export.api import export_artifact
    from imedsam_train.checkpoint import model_payload, save_checkpoint
    from imedsam_train.config import preset
    from imedsam_train.model import IMedSAM
    from tests.conftest import SAMPLE_DATA

    cks = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cks.append(tmp_path / f"tiny{seed}.pt")
        save_checkpoint(cks[-1], model_payload(IMedSAM(preset("tiny", input_size=64)).eval(), None))
    art = export_artifact(cks[0], tmp_path / "art", verify=False, max_points=4096, batch=1)
    js = tmp_path / "e.json"
    args = ["--artifact", str(art), "--data", str(SAMPLE_DATA), "--threads", "1", "--json", str(js),
            "--encoder", "torch", "--encoder", "ort-fp32", "--encoder", "ov-fp32"]
    assert encoder_backend_eval.main([*args, "--checkpoint", str(cks[0])]) == 0
    res = json.loads(js.read_text())
    assert res["settings"]["cases"] == 8 and set(res["means"]) == {"torch", "ort-fp32", "ov-fp32"}
    for name in ("ort-fp32", "ov-fp32"):
        assert res["pixel_agreement"][name] >= 0.999
        assert abs(res["means"][name]["dice"] - res["means"]["torch"]["dice"]) < 0.2
    assert res["means"]["torch"]["dice"] > 1.0  # masks that are not empty, so their agreement means something
    assert "ov-fp32" in capsys.readouterr().out
    js.unlink()
    with pytest.raises(SystemExit, match="not exported from"):
        encoder_backend_eval.main([*args, "--checkpoint", str(cks[1])])
    assert not js.exists()


def test_downscaled_copy_keeps_each_pair_aligned_at_the_new_size(tmp_path, capsys):
    import cv2
    import numpy as np

    from benchmarks import downscaled_copy
    from tests.conftest import SAMPLE_DATA, read_mask

    out = tmp_path / "small"
    assert downscaled_copy.main([str(SAMPLE_DATA), "--out", str(out), "--max-side", "64"]) == 0
    stems = (SAMPLE_DATA / "splits" / "test.txt").read_text().split()
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(stems)
    assert (out / "splits" / "test.txt").read_text() == (SAMPLE_DATA / "splits" / "test.txt").read_text()
    for stem in stems:
        src = read_mask(SAMPLE_DATA / "masks" / f"{stem}.png")
        img = cv2.imread(str(out / "images" / f"{stem}.jpg"))
        m = cv2.imread(str(out / "masks" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
        assert max(img.shape[:2]) == 64 and img.shape[:2] == m.shape and set(np.unique(m)) <= {0, 255}
        h, w = src.shape
        assert abs(m.shape[1] / m.shape[0] - w / h) < 0.05  # the aspect ratio kept
        # the mask covers the same fraction of its frame as at full size (to a pixel's worth along its edge)
        assert abs((m > 0).mean() - src.mean()) < 0.03, stem
        back = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) > 0
        assert (back == src).mean() > 0.95, stem  # and in the same place (no flip, no shift)
    # an existing folder is refused in one line, and left as it was
    before = sorted(p.name for p in out.rglob("*"))
    assert downscaled_copy.main([str(SAMPLE_DATA), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and sorted(p.name for p in out.rglob("*")) == before


def test_ct_organs_scores_every_organ_against_litemedsam_on_the_same_boxes(shared_data, tmp_path, capsys):
    """benchmarks/ct_organs.py on the real CT slices and volume with the bundled tiny artifact (fast; the figures
    in RESULTS.md are the lite exports'): every labelled organ scored, one row per organ with each model's Dice,
    LiteMedSAM's difference from itself 0, and the artifact really run (its masks are not LiteMedSAM's)."""
    from benchmarks import ct_organs
    from imedsam_core.paths import SHIPPED_ARTIFACT

    vol = shared_data / "ct-volume-totalseg"
    out = tmp_path / "ct.json"
    assert ct_organs.main(["--artifact", str(SHIPPED_ARTIFACT), "--slices", str(shared_data / "ct-slices-amos-totalseg"),
                           "--volume", str(vol / "images" / "example_ct_sm.nii.gz"),
                           "--labels", str(vol / "masks" / "example_seg.nii.gz"), "--min-area", "1500",
                           "--limit", "2", "--backend", "ort-cpu", "--threads", "2", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    rows, summary = got["rows"], got["summary"]
    # the first two slices' organs, counted as imedsam-eval counts them (several k of one organ merged)
    assert [r["case"] for r in rows if r["source"] == "slices"] == ["amos_0004_75"] * 3 + ["amos_0006_90"] * 4
    assert summary["volume"]["litemedsam"]["n"] == len({r["case"] for r in rows if r["source"] == "volume"}) == 2
    assert all(r["area"] >= 1500 for r in rows if r["source"] == "volume")
    key = str(SHIPPED_ARTIFACT)
    for src in ("slices", "volume"):
        assert summary[src]["litemedsam"]["mean_minus_litemedsam"] == 0.0
        assert 0.0 <= summary[src][key]["mean"] <= 100.0
    assert any(abs(r["dice"][key] - r["dice"]["litemedsam"]) > 1 for r in rows)
    assert summary["slices"]["litemedsam"]["mean"] > 60  # LiteMedSAM does segment CT organs from tight boxes
    assert "vs LiteMedSAM" in capsys.readouterr().out


def test_ct_slice_inputs_scores_each_road_on_the_same_cases(shared_data, tmp_path, capsys):
    """benchmarks/ct_slice_inputs.py with the bundled tiny artifact on two slices of the real CT volume: every road
    scores the same organ sections; a 16-bit PNG given the CT window in its stored units is the NIfTI picture (same
    Dice), while OpenCV's top byte is another."""
    from benchmarks import ct_slice_inputs
    from imedsam_core.paths import SHIPPED_ARTIFACT

    out = tmp_path / "roads.json"
    assert ct_slice_inputs.main(["--artifact", str(SHIPPED_ARTIFACT), "--min-area", "1500", "--limit", "2",
                                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    by: dict[str, list[float]] = {}
    for r in got["rows"]:
        by.setdefault(r["road"], []).append(r["dice"])
    assert set(by) == {"nifti", "png16 top byte", "png16", "png16 --window 1064,400", "rot180", "transunet window",
                       "rot180 + transunet window"}
    assert len({len(v) for v in by.values()}) == 1 and len(by["nifti"]) >= 2
    assert by["png16 --window 1064,400"] == by["nifti"]
    assert by["png16 top byte"] != by["nifti"]
    assert "png16 top byte" in capsys.readouterr().out


def test_malloc_effect_times_each_workload_under_both_settings(tmp_path, capsys):
    """Each setting in a process of its own (malloc is set once a process), as the setting says it ran."""
    from benchmarks import malloc_effect
    from imedsam_core.malloc import is_glibc

    js = tmp_path / "m.json"
    assert malloc_effect.main(["--workload", "litemedsam", "--rounds", "1", "--repeat", "1", "--threads", "1",
                               "--json", str(js)]) == 0
    runs = json.loads(js.read_text())["runs"]["litemedsam"]
    assert runs["tuned"][0]["malloc"] == ("tuned" if is_glibc() else "left: the C library is not glibc")
    assert runs["glibc"][0]["malloc"] == "left as glibc's defaults ($IMEDSAM_MALLOC=glibc)"
    assert all(r[0]["seconds"] > 0 and r[0]["peak_rss_mb"] > 100 for r in runs.values())
    assert "litemedsam" in capsys.readouterr().out
