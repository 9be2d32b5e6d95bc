"""Interruptions: SIGKILL at seeded random moments.

- a training run killed three times, resumed with --resume each time, ends with the same weights (last and
  best checkpoints) as an uninterrupted run with the same seed (CPU, one thread: deterministic);
- an export killed mid-way leaves no artifact folder that looks complete (the next export is not blocked);
- an inference killed mid-way leaves no output folder that looks complete.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imedsam_core.errors import UserError
from imedsam_core.paths import BEST_CHECKPOINT, CHECKPOINT_DIR, LAST_CHECKPOINT, latest_artifact
from imedsam_deploy.manifest import load_artifact
from imedsam_train.build import safe_torch_load
from imedsam_train.cli import app as train_app
from tests.conftest import child_env, cut_video
from tests.reliability_helpers import (
    SAMPLE_DATA,
    SAMPLE_IMAGES,
    VIDEO,
    console_argv,
    tiny_artifact,
    tiny_checkpoint,
)

SEED = 20261127  # the kill moments are drawn from this
def _popen(name: str, args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    """Console script ``name``'s real entry point (``main``: run_app) in a child process; stderr goes to a file
    (an unread pipe could fill up and stall the child), kept as ``proc.err_path``."""
    err_path = cwd.parent / f"{cwd.name}.{name}.{time.monotonic_ns()}.stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(console_argv(name, args), cwd=cwd, env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=err)
    proc.err_path = err_path  # type: ignore[attr-defined]
    return proc


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    return Path(proc.err_path).read_text(errors="replace")[-2000:]  # type: ignore[attr-defined]


def _wait_for(cond, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    pytest.fail(f"timed out or exited ({proc.returncode}) waiting for {what}: {_stderr(proc)}")


def _kill(proc: subprocess.Popen[bytes]) -> bool:
    """SIGKILL; True if the process was still running (the kill interrupted it)."""
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return alive


# ------------------------------------------------------------------ training

def _train_data(tmp: Path) -> Path:
    """5 sample pairs: 4 train (2 steps of 2 per epoch), 1 val."""
    import shutil

    d = tmp / "data"
    for sub in ("images", "masks", "splits"):
        (d / sub).mkdir(parents=True)
    stems = []
    for img in SAMPLE_IMAGES[:5]:
        shutil.copy(img, d / "images")
        shutil.copy(SAMPLE_DATA / "masks" / f"{img.stem}.png", d / "masks")
        stems.append(img.stem)
    (d / "splits" / "train.txt").write_text("\n".join(stems[:4]) + "\n")
    (d / "splits" / "val.txt").write_text(stems[4] + "\n")
    return d


def _args(data: Path) -> list[str]:
    return ["folder", str(data), "--name", "r", "--model", "tiny", "--input-size", "64", "--epochs", "5",
            "--batch-size", "2", "--points", "128", "--workers", "0", "--threads", "1", "--seed", "11",
            "--warmup-steps", "2"]


def _epochs_logged(run: Path) -> int:
    log = run / "log.csv"
    try:
        return max(0, len(log.read_text().splitlines()) - 1)
    except OSError:
        return 0


def test_training_killed_three_times_resumes_to_identical_weights(tmp_path, monkeypatch):
    data = _train_data(tmp_path)
    killed_cwd = tmp_path / "killed"
    killed_cwd.mkdir()
    run = killed_cwd / "runs" / "r"
    ck = run / CHECKPOINT_DIR
    rng = random.Random(SEED)
    kills = 0
    resume = False
    while kills < 3:
        done_before = _epochs_logged(run)
        proc = _popen("imedsam-train", _args(data) + (["--resume"] if resume else []), killed_cwd)
        # a random moment after this process saved one more epoch: mid-epoch, mid-validation or mid-write
        _wait_for(lambda d=done_before: _epochs_logged(run) > d, proc, 300, "an epoch to be saved")
        time.sleep(rng.uniform(0.0, 1.0))
        interrupted = _kill(proc)
        assert interrupted, "the run finished before the kill: too few epochs for three kills"
        kills += 1
        # whatever the moment, the checkpoint under its final name is complete and loadable
        last = safe_torch_load(ck / LAST_CHECKPOINT)
        assert last["train"]["epoch"] + 1 >= done_before + 1
        leftovers = [p.name for p in ck.iterdir() if p.name not in (LAST_CHECKPOINT, BEST_CHECKPOINT)]
        assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers), leftovers
        resume = True
    proc = _popen("imedsam-train", [*_args(data), "--resume"], killed_cwd)
    assert proc.wait(timeout=600) == 0, _stderr(proc)

    clean_cwd = tmp_path / "clean"
    clean_cwd.mkdir()
    monkeypatch.chdir(clean_cwd)
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(train_app, _args(data))
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output

    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
        a = safe_torch_load(ck / name)
        b = safe_torch_load(clean_cwd / "runs" / "r" / CHECKPOINT_DIR / name)
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
    a_log = (run / "log.csv").read_text().splitlines()
    b_log = (clean_cwd / "runs" / "r" / "log.csv").read_text().splitlines()
    assert [r.split(",")[:6] for r in a_log] == [r.split(",")[:6] for r in b_log]  # epoch, stage, losses, val Dice


# ------------------------------------------------------------------ export

def test_export_killed_midway_leaves_no_complete_looking_artifact(tmp_path_factory, tmp_path):
    ckpt = tiny_checkpoint(tmp_path_factory)
    out = tmp_path / "runs" / "r" / "export"
    rng = random.Random(SEED + 1)
    proc = _popen("imedsam-export", [str(ckpt), "--out", str(out), "--max-points", "1024", "--batch", "1"],
                  tmp_path)
    staging = lambda: [p for p in out.parent.iterdir() if p.name.startswith(".export.")] if out.parent.is_dir() else []  # noqa: E731
    _wait_for(lambda: bool(staging()), proc, 300, "the export's staging folder")
    time.sleep(rng.uniform(0.0, 2.0))
    assert _kill(proc), "the export finished before the kill"
    assert not out.exists()
    for s in staging():  # a leftover staging folder is hidden and is not an artifact
        with pytest.raises(UserError):
            load_artifact(s)
    assert latest_artifact(tmp_path) is None


# ------------------------------------------------------------------ inference

@pytest.fixture(scope="module")
def video_cut(tmp_path_factory) -> Path:
    """60 frames of the real colonoscopy video (MJPG AVI)."""
    return cut_video(tmp_path_factory.mktemp("rel_video") / "cut.avi", 60, VIDEO)


def test_inference_killed_midway_leaves_no_complete_looking_output(tmp_path_factory, tmp_path, video_cut):
    art = tiny_artifact(tmp_path_factory)
    out = tmp_path / "out"
    rng = random.Random(SEED + 2)
    proc = _popen("imedsam-infer", [str(video_cut), "--box", "150,120,300,260", "--artifact", str(art),
                                               "--out", str(out), "--backend", "ort-cpu", "-q"], tmp_path)

    def masks_written() -> int:
        return sum(len(list((s / "masks").glob("*.png"))) for s in tmp_path.glob(".out.*") if (s / "masks").is_dir())

    _wait_for(lambda: masks_written() >= 3, proc, 300, "the first masks")
    time.sleep(rng.uniform(0.0, 0.5))
    assert _kill(proc), "the inference finished before the kill"
    assert not out.exists()
    for s in tmp_path.glob(".out.*"):  # a leftover staging folder is hidden and has no results file
        assert not (s / "results.json").exists() and not (s / "results.csv").exists()


def test_inference_interrupted_with_ctrl_c_stops_its_threads_and_leaves_nothing(tmp_path_factory, tmp_path,
                                                                               video_cut):
    """Ctrl-C in the middle of a video, while frames are read ahead and outputs written behind on their own
    threads: the command says "interrupted" on one line and exits 130 promptly (no thread left running keeps
    it alive), with no traceback, no output folder and no staging folder."""
    art = tiny_artifact(tmp_path_factory)
    out = tmp_path / "out"
    proc = _popen("imedsam-infer", [str(video_cut), "--box", "150,120,300,260", "--artifact", str(art),
                                               "--out", str(out), "--backend", "ort-cpu", "-q"], tmp_path)

    def masks_written() -> int:
        return sum(len(list((s / "masks").glob("*.png"))) for s in tmp_path.glob(".out.*") if (s / "masks").is_dir())

    _wait_for(lambda: masks_written() >= 3, proc, 300, "the first masks")
    assert proc.poll() is None, "the inference finished before the interrupt"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    err = _stderr(proc)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
