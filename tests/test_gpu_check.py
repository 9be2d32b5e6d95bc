"""benchmarks/gpu_check.py's bookkeeping, without a GPU or torch: its arguments, the order and budget of its rows
(gpu_check_plan), the cells a timing row is made of, the saved JSON and the table printed last (gpu_check_report),
and the one direction of imports between its modules. (The dry run on a CPU, which runs every part, is in
test_benchmark_scripts.)"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gpu_check as G
from benchmarks import gpu_check_plan as P
from benchmarks import gpu_check_report as R
from benchmarks import gpu_check_runners as F
from imedsam_deploy.bench import Timings, synthetic_inputs


def test_defaults_and_quick():
    a = P.parse_args(["--out", "x"])
    assert (a.model, a.input_size, a.device, a.sizes, a.batches) == ("vit_b", 384, "cuda", [384, 896], [1, 8, 32])
    assert (a.repeat, a.ref_repeat, a.compile, a.budget_s, a.parts) == (20, 3, "after", 480.0, list(P.PARTS))
    assert (a.align_matmuls, a.lean_layers, a.triton_kernels, a.out) == (None, None, "on", "x")
    assert P.lean_of(a) is None
    q = P.parse_args(["--quick", "--repeat", "50", "--lean-layers", "off"])
    assert (q.repeat, q.ref_repeat) == (2, 1)  # a CPU dry run: few repeats whatever was asked
    assert P.lean_of(q) is False
    with pytest.raises(SystemExit):
        P.parse_args(["--parts", "nonsense"])


def test_out_defaults_to_the_out_variable(monkeypatch):
    monkeypatch.setenv("OUT", "/some/where")
    assert P.parse_args([]).out == "/some/where"


def test_timing_plan_puts_batch_one_first_then_compiled_then_throughput():
    early, late = P.timing_plan(P.parse_args(["--sizes", "896", "384", "--batches", "8", "1"]))
    assert early == [(384, 1, False), (896, 1, False)]
    assert late == [(384, 1, True), (896, 1, True), (384, 8, False), (896, 8, False)]
    early, late = P.timing_plan(P.parse_args(["--sizes", "384", "--compile", "only"]))
    assert (early, late) == ([], [(384, 1, True)])
    early, late = P.timing_plan(P.parse_args(["--sizes", "384", "--batches", "1", "--compile", "none"]))
    assert (early, late) == ([(384, 1, False)], [])
    assert P.timing_plan(P.parse_args(["--parts", "encoder", "memory"])) == ([], [])


def test_budget_of_rows_and_sections():
    assert P.row_over_budget(100, 99.9, compiled=False) is None
    assert P.row_over_budget(100, 100.1, compiled=False) == "time budget (100 s) spent"
    # a compiled row compiles first: it needs room left to start
    assert P.row_over_budget(100, 100 - P.COMPILED_ROW_ROOM_S + 1, compiled=True) == "time budget (100 s) spent"
    assert P.row_over_budget(400, 100, compiled=True) is None
    a = P.parse_args(["--budget-s", "60", "--parts", "encoder", "memory"])
    results: dict = {}
    assert P.section_wanted(a, "encoder", 59.0, results)
    assert not P.section_wanted(a, "decoder", 0.0, results)  # not asked for: not recorded as skipped
    assert not P.section_wanted(a, "memory", 61.0, results)
    assert results == {"skipped_sections": ["memory"]}
    assert not P.section_wanted(P.parse_args(["--compile", "only"]), "encoder", 0.0, results)


def test_runs_per_row():
    assert [P.timed_runs(20, b) for b in (1, 8, 32)] == [20, 5, 5]
    assert P.timed_runs(2, 1) == 2 and P.timed_runs(64, 8) == 8
    assert [P.warmup_runs(n) for n in ("reference fp32", "sparse bf16", "full bf16", "fused bf16")] == [1, 5, 2, 2]


def test_failure_is_one_line_with_the_whole_message():
    line = R.failure(ValueError("at 26:18:\n    x = tl.load(p)\n\n  cause: bad"))
    assert line == "ValueError: at 26:18: | x = tl.load(p) | cause: bad"
    assert len(R.failure(RuntimeError("y" * 2000))) == len("RuntimeError: ") + 800


def test_timing_cells_time_agreement_and_stages():
    inp = synthetic_inputs(32, 2, seed=2)
    ref = [np.zeros((1, 32, 32), bool) for _ in range(2)]
    for m in ref:
        m[0, 8:24, 8:24] = True
    ours = [m.copy() for m in ref]
    st = Timings()
    st.stages["encoder"] += [1.0, 3.0]
    st.total += [4.0, 6.0]
    st.points = 20
    stage_t = {"sparse bf16": st}
    times = {"reference fp32": [100.0, 120.0], "sparse bf16": [10.0, 30.0, 20.0], "broken": []}
    cells = R.timing_cells(times, {"reference fp32": ref, "sparse bf16": ours}, inp, 2, stage_t)
    assert list(cells) == ["reference fp32", "sparse bf16"]  # a variant with no times has no cell
    assert cells["reference fp32"] == {"p50_ms": 110.0, "min_ms": 100.0, "per_image_ms": 55.0, "n": 2}
    c = cells["sparse bf16"]
    assert (c["p50_ms"], c["min_ms"], c["per_image_ms"], c["n"]) == (20.0, 10.0, 10.0, 3)
    assert c["speedup_vs_reference"] == pytest.approx(5.5)
    assert c["agreement"]["pixel_in_box"] == 1.0 and c["agreement"]["dice"] == 1.0
    assert c["stages_p50_ms"] == {"encoder": 2.0} and c["points_per_frame"] == 10.0
    assert stage_t == {}  # taken out: the next row starts its own


def test_as_masks_reshapes_each_image():
    got = F.as_masks([np.ones((2, 16), bool)], 4)
    assert len(got) == 1 and got[0].shape == (2, 4, 4)


def test_save_and_the_table_printed_last(tmp_path):
    t_start = R.time.perf_counter() - 12.0
    results = {
        "info": {"device": "NVIDIA H200"},
        "correctness": {"full fp32": {"pixel_in_box": 0.99995, "dice": 0.99991}, "other": {"error": "E: x"}},
        "timing": [
            {"out_size": 384, "batch": 1, "compiled": False,
             "sparse bf16": {"p50_ms": 2.5, "min_ms": 2.4, "per_image_ms": 2.5, "n": 20, "speedup_vs_reference": 80.0,
                             "agreement": {"pixel_in_box": 0.9991}, "stages_p50_ms": {"encoder": 1.5, "decoder": 0.75}},
             "errors": {"fused bf16": "OutOfMemoryError: x"}, "planner_fallbacks": {"bf16": [0, 0]}},
            {"out_size": 896, "batch": 8, "compiled": False, "skipped": "time budget (390 s) spent"},
        ],
        "memory": [{"out_size": 384, "query": "full", "frame_peak_mb": 12.4, "held_mb": 300.0},
                   {"out_size": 2048, "query": "sparse"}],
    }
    R.save(results, tmp_path, t_start)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["elapsed_s"] >= 12.0 and saved["created"].endswith("Z") and saved["timing"] == results["timing"]
    lines = R.summary_lines(saved, "vit_b", 384)
    assert lines[0] == f"\n== gpu_check on NVIDIA H200 (vit_b, 384^2 input, random weights, {saved['elapsed_s']:.0f} s) =="
    assert lines[1].split() == ["out", "batch", "variant", "p50", "ms", "per", "img", "x", "ref", "in-box", "%",
                                "stages", "p50", "ms"]
    assert lines[2].split() == ["384", "1", "sparse", "bf16", "2.50", "2.50", "80.0", "99.91", "enc", "1.50", "dec",
                                "0.75"]
    assert lines[3].split() == ["384", "1", "fused", "bf16", "FAILED", "OutOfMemoryError:", "x"]
    assert lines[4] == "  896     8 skipped: time budget (390 s) spent"
    assert lines[5] == "memory full 384²: frame peak 12 MB over 300 MB held"
    assert lines[6] == "memory sparse 2048²: ran (no device memory figure on a CPU)"
    assert lines[7:] == ["correctness full fp32: 99.995% in box, Dice 0.9999", "correctness other: FAILED E: x"]


def test_help_is_the_docstring(capsys):
    with pytest.raises(SystemExit):
        G.main(["--help"])
    assert G.__doc__.splitlines()[0] in capsys.readouterr().out


def test_modules_import_in_one_direction():
    """plan, report, runners, then sweeps and profile, then the entry point: each module imports only those before
    it (no cycles), and none imports the entry point (run by path, it is __main__)."""
    order = ["gpu_check_plan", "gpu_check_report", "gpu_check_runners", "gpu_check_sweeps", "gpu_check_profile",
             "gpu_check"]
    here = Path(G.__file__).parent
    for i, name in enumerate(order):
        tree = ast.parse((here / f"{name}.py").read_text())
        got = {n.module.split(".")[1] for n in ast.walk(tree)
               if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("benchmarks.gpu_check")}
        assert got <= set(order[:i]), (name, got)
