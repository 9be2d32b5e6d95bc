"""torch-cuda's autotuner (``imedsam_cuda.torch_tuning``), run on a CPU torch backend.

The frame times here come from a clock the tests drive (a cost per frame from the backend's settings), so every
verdict is decided by the test, never by this machine's speed: tests never assert wall-clock times.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imedsam_core.errors import UserError
from imedsam_cuda import torch_tuning as tt
from imedsam_cuda.torch_cuda import TorchBackend
from imedsam_cuda.torch_settings import TorchCudaSettings
from imedsam_deploy.bench import BenchOptions, FrameRunner, synthetic_inputs, tune_backends
from imedsam_deploy.cli_bench import app

from .conftest import not_interpreted
from .test_bench import tiny

S = 64


class Frames:
    """Sparse frames of a tiny CPU torch backend, each charged ``cost(be)`` ms on the test's clock."""

    def __init__(self, cost, corrupt=lambda be: False):
        from imedsam_cuda.torch_models import model_artifact

        model = tiny(size=S)
        self.be = TorchBackend(model, "cpu", TorchCudaSettings(precision="fp32"))
        art = model_artifact(model, max_batch=1)
        self.runner = FrameRunner(self.be, art, "sparse", BenchOptions())
        self.inputs = synthetic_inputs(S, 1)
        self.cost, self.corrupt, self.now, self.calls = cost, corrupt, 0.0, 0

    def clock(self) -> float:
        return self.now / 1e3

    def __call__(self) -> list[np.ndarray]:
        masks = self.runner.run(self.inputs, (S, S), None)
        self.now += self.cost(self.be)
        self.calls += 1
        return [~m for m in masks] if self.corrupt(self.be) else masks


def test_tune_keeps_the_faster_settings_and_only_those():
    """A flip that is faster is kept, one that is slower or no faster is put back; the Triton kernels, which
    cannot run on a CPU, are reported as not tried, with the backend's reason; every decoder option here is exact,
    so the masks agree with the untuned frame's everywhere."""
    not_interpreted()
    frames = Frames(lambda be: 10.0 - 3.0 * be.settings.align_matmuls + 4.0 * be.settings.relu_epilogue
                    + 0.1 * be.settings.grid_sample)
    be = frames.be
    before = tt.settings_of(be)
    assert not before["align_matmuls"] and not before["relu_epilogue"] and before["grid_sample"]  # CPU defaults
    tuning = tt.tune(be, frames, repeat=3, warmup=1, rounds=2, clock=frames.clock)
    trials = {t.knob: t for t in tuning.trials}
    assert list(trials) == list(tt.KNOB_NAMES)
    assert trials["align_matmuls"].kept and trials["align_matmuls"].ms_after < trials["align_matmuls"].ms_before
    assert not trials["relu_epilogue"].kept and trials["relu_epilogue"].note == "not faster"
    # 0.1 ms of 10 is under the 2% a flip must gain: grid_sample stays as it was
    assert not trials["grid_sample"].kept and tuning.settings["grid_sample"]
    for name in ("fused_norms", "fused_operands", "fused_frequency", "fused_features", "fused_uncertainty",
                 "fused_planner"):
        assert not trials[name].kept and trials[name].ms_before is None
        assert "needs a CUDA device" in trials[name].note or "triton is not installed" in trials[name].note
    assert "fp32 box part: the backend runs in fp32 already" in trials["fp32_box_part"].note
    assert all(t.agreement == 1.0 for t in tuning.trials if t.agreement is not None)
    assert tuning.settings == {**before, "align_matmuls": True} == tt.settings_of(be)  # the backend is left tuned
    assert tuning.key == tt.machine_key(be) and tuning.key["device"] == "cpu"


def test_tune_keeps_a_flip_only_if_it_is_faster_in_every_round():
    """The machine drifts (a shared CPU): the flip is twice as fast in the first round and 5% slower in the
    second. Its median over both rounds is faster, but it is not kept."""
    knob = next(k for k in tt.KNOBS if k.name == "align_matmuls")
    # frames: 1 untuned warm-up; per round 1 warm-up + 3 timed frames off, then on; the second round from frame 9
    frames = Frames(lambda be: 10.0 if not be.settings.align_matmuls else 5.0 if frames.calls < 9 else 10.5)
    tuning = tt.tune(frames.be, frames, knobs=[knob], repeat=3, warmup=1, rounds=2, clock=frames.clock)
    (trial,) = tuning.trials
    assert frames.calls == 17 and trial.ms_after < 0.9 * trial.ms_before
    assert np.allclose(trial.rounds_ms, [[10.0, 5.0], [10.0, 10.5]])
    assert not trial.kept and trial.note == "not faster" and not frames.be.settings.align_matmuls


def test_tune_refuses_a_faster_flip_whose_masks_differ():
    """A knob whose setting is faster but changes the masks (a kernel that is wrong on this card) is put back."""
    frames = Frames(lambda be: 5.0 if be.settings.relu_epilogue else 10.0,
                    corrupt=lambda be: be.settings.relu_epilogue)
    knob = next(k for k in tt.KNOBS if k.name == "relu_epilogue")
    tuning = tt.tune(frames.be, frames, knobs=[knob], repeat=2, warmup=1, clock=frames.clock)
    (trial,) = tuning.trials
    assert trial.ms_after < trial.ms_before and trial.agreement < 0.5
    assert not trial.kept and trial.note == "masks differ" and not frames.be.settings.relu_epilogue


def test_tune_reports_a_setting_that_fails_and_keeps_the_one_that_ran():
    """A setting whose frame raises (a kernel that does not compile on this card, say) is reported in one line and
    the backend goes on with the setting it had."""
    frames = Frames(lambda be: 1.0)

    def frame():  # the aligned layers' frame fails
        if frames.be.settings.align_matmuls:
            raise RuntimeError("CompilationError: at 3:4\nmore lines")
        return frames()

    knob = next(k for k in tt.KNOBS if k.name == "align_matmuls")
    tuning = tt.tune(frames.be, frame, knobs=[knob], repeat=2, warmup=1, clock=frames.clock)
    (trial,) = tuning.trials
    assert not trial.kept and trial.note == "failed: RuntimeError: CompilationError: at 3:4"
    assert not frames.be.settings.align_matmuls


def test_tune_refuses_a_compiled_backend_and_bad_counts():
    frames = Frames(lambda be: 1.0)
    with pytest.raises(ValueError, match="repeat"):
        tt.tune(frames.be, frames, repeat=0)
    frames.be.compiled = True
    with pytest.raises(UserError, match="torch.compile'd backend"):
        tt.tune(frames.be, frames)
    assert frames.calls == 0


def test_a_saved_tuning_is_applied_when_the_backend_opens_again(tmp_path):
    """save -> apply_saved on a new backend of the same key: its settings, and 'tuned' in its description (which
    the commands skip with ``--backend-option tuned=0``: test_bench); another precision is another key, so the
    file is not read."""
    frames = Frames(lambda be: 10.0 - 3.0 * be.settings.align_matmuls)
    knob = next(k for k in tt.KNOBS if k.name == "align_matmuls")
    tuning = tt.tune(frames.be, frames, knobs=[knob], repeat=2, warmup=1, clock=frames.clock)
    path = tt.tuning_path(frames.be, tmp_path)
    tt.save(tuning, path)
    assert json.loads(path.read_text())["settings"]["align_matmuls"] is True

    fresh = TorchBackend(tiny(size=S), "cpu", TorchCudaSettings(precision="fp32"))
    assert not fresh.settings.align_matmuls and "tuned" not in fresh.description
    assert tt.apply_saved(fresh, tmp_path) == path
    assert fresh.settings.align_matmuls and fresh.description.endswith(", tuned)") and fresh.tuned_from == path
    assert not fresh.built_settings.align_matmuls  # the key: the settings it was built with
    other = TorchBackend(tiny(size=S), "cpu", TorchCudaSettings(precision="bf16"))
    assert tt.tuning_path(other, tmp_path) != path and tt.apply_saved(other, tmp_path) is None
    # built with other switchable settings (as --backend-option triton=1 builds torch-cuda): its own tuning, so an
    # explicit request is not overridden by a tuning made from the defaults
    asked = TorchBackend(tiny(size=S), "cpu", TorchCudaSettings(precision="fp32", relu_epilogue=True))
    assert tt.tuning_path(asked, tmp_path) != path and tt.apply_saved(asked, tmp_path) is None
    assert asked.settings.relu_epilogue and not asked.settings.align_matmuls


def test_a_bad_tuning_file_is_refused_in_one_line_naming_it(tmp_path):
    be = TorchBackend(tiny(size=S), "cpu", TorchCudaSettings(precision="fp32"))
    path = tt.tuning_path(be, tmp_path)
    path.write_text("{not json")
    with pytest.raises(UserError, match=f"{path}: not a readable tuning file") as e:
        tt.apply_saved(be, tmp_path)
    assert "\n" not in str(e.value)
    good = tt.Tuning(tt.machine_key(be), tt.settings_of(be)).to_json()
    for bad in ({**good, "version": 99}, {**good, "settings": {"align_matmuls": True}},
                {**good, "settings": {**good["settings"], "grid_sample": "yes"}}):
        path.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=f"{path}: not a tuning file of this version"):
            tt.apply_saved(be, tmp_path)
    path.write_text(json.dumps({**good, "key": {**good["key"], "device": "NVIDIA H200"}}))
    with pytest.raises(UserError, match="tuned for another machine"):
        tt.apply_saved(be, tmp_path)
    assert not be.settings.align_matmuls  # nothing applied


def test_tune_backends_needs_a_torch_backend():
    class Onnx:
        name = "ort-cpu"

    with pytest.raises(UserError, match="--tune: it tunes the torch backends .* none of ort-cpu is one"):
        tune_backends([Onnx()], None, BenchOptions(), synthetic_inputs(S, 1), S, print)  # type: ignore[list-item]


def test_bench_tune_saves_the_tuning_and_the_next_run_applies_it(tmp_path, monkeypatch):
    """``imedsam-bench --model tiny --backend torch-cpu --tune``: every knob in the report's tuning, the file
    saved in the cache; the next run, without --tune, opens the backend tuned."""
    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    args = ["--model", "tiny", "--input-size", str(S), "--backend", "torch-cpu", "--query", "sparse",
            "--out-size", str(S), "--warmup", "1", "--repeat", "3"]
    res = CliRunner().invoke(app, [*args, "--tune", "--json", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a.json").read_text())
    (tuning,) = report["tuning"]
    assert [t["knob"] for t in tuning["trials"]] == list(tt.KNOB_NAMES)
    assert tuning["tuned_on"] == {"query": "sparse", "batch": 1, "out_size": S}
    saved = Path(tuning["path"])
    assert saved.parent == tmp_path / "cache" / "tuning" and json.loads(saved.read_text())["settings"] == tuning["settings"]
    assert report["results"][0]["description"].endswith(", tuned)")
    res = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "b.json").read_text())["results"][0]
    assert row["description"].endswith(", tuned)") and "tuning" not in json.loads((tmp_path / "b.json").read_text())


TUNE_EVERY_KNOB = r"""
import dataclasses, json
import torch
from imedsam_cuda import torch_tuning as tt
from imedsam_cuda.torch_cuda import TorchBackend
from imedsam_cuda.torch_settings import TorchCudaSettings
from imedsam_cuda.torch_models import model_artifact
from imedsam_deploy.bench import BenchOptions, FrameRunner, synthetic_inputs
from imedsam_train.build import build_from_config
from imedsam_train.config import EncoderConfig, tiny_config

# heads 16 wide (a power-of-two scale): the lean blocks, which the encoder's Triton kernels need; a 96 px input
# is a 6 x 6 token grid, windows of 4 padded to 8, at little more than half the interpreter's time at 160 px
enc = EncoderConfig(embed_dim=64, depth=2, num_heads=4, global_attn_indexes=(1,), window_size=4, out_chans=32)
torch.manual_seed(0)
model, _ = build_from_config(dataclasses.replace(tiny_config(96), encoder=enc))
model = model.eval()
be = TorchBackend(model, "cpu", TorchCudaSettings(precision="fp32", lean_encoder=True, lean_box_part=True,
                                                  device_planner=True))
runner = FrameRunner(be, model_artifact(model, 1), "sparse", BenchOptions())
inputs = synthetic_inputs(model.cfg.input_size, 1)
now = [0.0]
def frame():
    masks = runner.run(inputs, (32, 32), None)
    now[0] += 20.0 - sum(k.get(be) for k in tt.KNOBS)  # each option on makes the frame a millisecond faster
    return masks
tuning = tt.tune(be, frame, repeat=1, warmup=0, rounds=1, clock=lambda: now[0] / 1e3)
print(json.dumps({"trials": [dataclasses.asdict(t) for t in tuning.trials], "settings": tuning.settings,
                  "description": be.description}))
"""


def test_tune_runs_every_knob_on_one_backend_with_the_triton_kernels():
    """The tuner's whole sequence on one backend, every Triton kernel running (in Triton's interpreter, fp32: it
    has no bfloat16): each knob is set, framed and kept in the order a GPU run takes them, so the options' setters
    work together (the fused box norms with the encoder's, the planner's kernels on planners already made). The
    clock favours every option on: all are kept but the Gather taps (the other way) and the fp32 box part (an
    fp32 backend refuses it), and the masks stay those of the untuned frame."""
    from .conftest import run_in_triton_interpreter

    pytest.importorskip("triton", reason="triton comes with torch's CUDA builds on Linux; this torch has none")
    res = run_in_triton_interpreter(TUNE_EVERY_KNOB)
    trials = {t["knob"]: t for t in res["trials"]}
    assert list(trials) == list(tt.KNOB_NAMES)
    assert "runs in fp32 already" in trials.pop("fp32_box_part")["note"]
    assert not trials.pop("grid_sample")["kept"]
    assert all(t["kept"] and t["agreement"] >= 0.999 for t in trials.values()), trials
    assert {k for k, v in res["settings"].items() if not v} == {"fp32_box_part"}
    for what in ("fused encoder norms (box part too)", "fused attention operands", "fused frequency chain",
                 "GELU epilogues", "fused point features", "fused uncertainty", "fused planner"):
        assert what in res["description"]


def test_bench_refuses_a_corrupt_tuning_file_in_one_line(tmp_path, monkeypatch):
    """A tuning file that is not JSON in the cache (its backend's own name): the backend is not opened, and with
    no other backend asked for imedsam-bench stops before benchmarking: exit 2, one error line naming the file,
    the problem and what to do, and no report written."""
    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    args = ["--model", "tiny", "--input-size", str(S), "--backend", "torch-cpu", "--query", "sparse",
            "--out-size", str(S), "--warmup", "0", "--repeat", "1", "--json", str(tmp_path / "r.json")]
    res = CliRunner().invoke(app, [*args, "--tune"])
    assert res.exit_code == 0, res.output
    (saved,) = (tmp_path / "cache" / "tuning").glob("*.json")
    saved.write_text('{"format": "imedsam-torch-tuning", "vers')  # cut short
    (tmp_path / "r.json").unlink()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith(
        f"no backend could run here (torch-cpu: {saved}: not a readable tuning file (JSONDecodeError); delete it "
        "or re-run imedsam-bench --tune)"), res.output
    assert not (tmp_path / "r.json").exists()


def test_torch_cuda_refuses_letterbox_artifacts_before_anything_else(tmp_path):
    """Its on-device query paths build stretch-frame coordinates, so the runtime can ask every backend for them:
    torch-cuda never opens a lite (letterbox) artifact, whatever the machine has."""
    from types import SimpleNamespace

    from imedsam_core import contract
    from imedsam_cuda.torch_cuda import probe

    lite = SimpleNamespace(resize=contract.LETTERBOX_MODE, path=tmp_path, manifest={})
    reason = probe(lite)  # type: ignore[arg-type]
    assert reason is not None and "SAM-ViT artifacts only" in reason and str(tmp_path) in reason
    stretch = SimpleNamespace(resize=contract.RESIZE_MODE, path=tmp_path, manifest={})
    assert "SAM-ViT artifacts only" not in (probe(stretch) or "")  # type: ignore[arg-type]
