"""The bench's report as people and tools read it: the summary, the log line per row, the table, and the JSON,
CSV and PNG files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_core.atomic import atomic_path, atomic_write_text
from imedsam_deploy.bench.timing import STAGES


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per backend: its fastest row at the first (batch, out_size): e2e p50, speed-up, agreement."""
    out: dict[str, Any] = {}
    if not results:
        return out
    first = (results[0]["batch"], results[0]["out_size"])
    for r in results:
        if (r["batch"], r["out_size"]) != first:
            continue
        cur = out.get(r["backend"])
        if cur is None or r["e2e_ms"]["p50"] < cur["e2e_p50_ms"]:
            out[r["backend"]] = {
                "precision": r.get("precision"), "query": r["query"], "batch": r["batch"], "out_size": r["out_size"],
                "e2e_p50_ms": r["e2e_ms"]["p50"], "fps": r["fps"],
                "speedup_vs_reference": r.get("speedup_vs_reference"),
                "pixel_agreement": (r.get("agreement") or {}).get("pixel_in_box"),
                "agreement": r.get("agreement"),
            }
    return out


def reference_name(report: dict[str, Any]) -> str:
    """What the reference rows are called: LiteMedSAM for a lite artifact's, else the released code's."""
    return "LiteMedSAM" if report["settings"].get("reference") == "litemedsam" else "reference"


def label(r: dict[str, Any]) -> str:
    """A result row's backend and precision, e.g. 'ort-cpu int8'."""
    return f"{r['backend']} {r['precision']}" if r.get("precision") else str(r["backend"])


def row_line(r: dict[str, Any]) -> str:
    st = " ".join(f"{k[:3]} {r['stages_ms'][k]['p50']:.1f}" for k in STAGES)
    extra = ""
    if "speedup_vs_reference" in r:
        ag = r["agreement"]
        extra = (f"  x{r['speedup_vs_reference']:.1f} vs ref, agree {100 * ag['pixel_in_box']:.2f}% in box, "
                 f"Dice {ag['dice_in_box']:.4f} in box")
    return (f"{label(r):<15} {r['query']:<6} b{r['batch']:<3} {r['out_size']:>5}^2  e2e p50 "
            f"{r['e2e_ms']['p50']:.1f} ms ({st}){extra}")


# ---------------------------------------------------------------- outputs
def table(report: dict[str, Any]) -> list[list[str]]:
    rows = [["backend", "query", "batch", "out", "pre", "enc", "dec", "post", "e2e p50", "p95", "p99", "fps",
             "Mpts/s", "rss MB", "speedup", "agree box"]]
    for r in report["results"]:
        st = r["stages_ms"]
        pts = r["decoder_points_per_s"]
        rows.append([
            label(r), r["query"], str(r["batch"]), str(r["out_size"]),
            *(f"{st[k]['p50']:.1f}" for k in STAGES),
            f"{r['e2e_ms']['p50']:.1f}", f"{r['e2e_ms']['p95']:.1f}", f"{r['e2e_ms']['p99']:.1f}", f"{r['fps']:.1f}",
            f"{pts / 1e6:.2f}" if pts else "-", f"{r['peak_rss_mb']:.0f}",
            f"{r['speedup_vs_reference']:.1f}x" if r.get("speedup_vs_reference") else "-",
            f"{100 * r['agreement']['pixel_in_box']:.2f}%" if r.get("agreement") else "-",
        ])
    for ref in report["reference"]:
        rows.append([reference_name(report), "full", str(ref["batch"]), str(ref["out_size"]), "", "", "", "",
                     f"{ref['e2e_ms']['p50']:.1f}", f"{ref['e2e_ms']['p95']:.1f}", f"{ref['e2e_ms']['p99']:.1f}",
                     f"{ref['fps']:.2f}", "-", "-", "1.0x", "100%"])
    return rows


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in report["results"]:
        row: dict[str, Any] = {k: r[k] for k in ("backend", "precision", "query", "batch", "out_size", "fps",
                                                 "decoder_points_per_frame", "decoder_points_per_s",
                                                 "peak_rss_mb", "gpu_peak_mb")}
        for st in STAGES:
            for p in ("p50", "p95", "p99"):
                row[f"{st}_{p}_ms"] = r["stages_ms"][st][p]
        for p in ("p50", "p95", "p99"):
            row[f"e2e_{p}_ms"] = r["e2e_ms"][p]
        row["speedup_vs_reference"] = r.get("speedup_vs_reference")
        row["pixel_agreement_in_box"] = (r.get("agreement") or {}).get("pixel_in_box")
        row["dice_in_box"] = (r.get("agreement") or {}).get("dice_in_box")
        out.append(row)
    return out


def write_outputs(report: dict[str, Any], json_path: Path | None, csv_path: Path | None,
                  png_path: Path | None) -> None:
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    if csv_path is not None:
        rows = csv_rows(report)
        with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    if png_path is not None:
        plot(report, png_path)


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: stacked per-stage p50 per backend/query (first batch and output size). Right: e2e p50 vs output
    size per backend/query (first batch), with the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if res:
        b0, o0 = res[0]["batch"], res[0]["out_size"]
        sel = [r for r in res if r["batch"] == b0 and r["out_size"] == o0]
        labels = [f"{label(r)}\n{r['query']}" for r in sel]
        bottom = np.zeros(len(sel))
        for st in STAGES:
            v = np.array([r["stages_ms"][st]["p50"] for r in sel])
            a1.bar(labels, v, bottom=bottom, label=st)
            bottom += v
        a1.set_ylabel("ms (p50)")
        a1.set_title(f"latency per stage, batch {b0}, {o0}x{o0} output")
        a1.legend()
        keys = sorted({(label(r), r["query"]) for r in res if r["batch"] == b0})
        for k in keys:
            pts = sorted((r["out_size"], r["e2e_ms"]["p50"]) for r in res if r["batch"] == b0 and (label(r), r["query"]) == k)
            a2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{k[0]} {k[1]}")
        refs = sorted((r["out_size"], r["e2e_ms"]["p50"]) for r in report["reference"] if r["batch"] == b0)
        if refs:
            a2.plot([p[0] for p in refs], [p[1] for p in refs], marker="s", color="k", label=reference_name(report))
        a2.set_xlabel("output size (pixels per side)")
        a2.set_ylabel("end-to-end ms (p50)")
        a2.set_yscale("log")
        a2.set_title(f"latency vs output size, batch {b0}")
        a2.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
