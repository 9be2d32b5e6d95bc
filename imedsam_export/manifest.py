"""manifest.json of an artifact folder (keys as in the artifact contract, notes/ARTIFACT.md)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import onnx

from imedsam_core import contract as C
from imedsam_core.atomic import atomic_write_text
from imedsam_train.build import sha256_file
from imedsam_train.config import ModelConfig

_ONNX_DTYPES: dict[int, str] = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Input/output names, shapes (symbolic axes by name) and dtypes as saved in the ONNX file."""
    g = onnx.load(str(path), load_external_data=False).graph

    def desc(v: onnx.ValueInfoProto) -> dict[str, Any]:
        t = v.type.tensor_type
        dims: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "shape": dims, "dtype": _ONNX_DTYPES.get(int(t.elem_type), str(t.elem_type))}

    return {"inputs": [desc(v) for v in g.input], "outputs": [desc(v) for v in g.output]}


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the folder (recursively) but the manifest; posix relative paths."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p != folder / C.MANIFEST_NAME:
            out[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def build_manifest(folder: Path, cfg: ModelConfig, *, opset: int, max_points: int, max_batch: int,
                   graphs: dict[str, dict[str, str]], parity: dict[str, Any], merge: dict[str, Any],
                   engines: dict[str, Any] | None = None, source: dict[str, Any] | None = None,
                   triton: str | None = None) -> dict[str, Any]:
    g = cfg.grid_size
    fp32 = graphs["fp32"]
    m: dict[str, Any] = {
        "format": C.MANIFEST_FORMAT,
        "version": C.MANIFEST_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"imedsam": _version("imedsam"), "torch": _version("torch"), "onnx": _version("onnx"),
                     "onnxruntime": _version("onnxruntime")},
        "opset": opset,
        "model": cfg.to_dict(),
        "input_size": cfg.input_size,
        "embedding_shape": [cfg.encoder.out_chans, g, g],
        "num_classes": cfg.num_classes,
        "refine_fraction": cfg.decoder.refine_fraction,
        "preprocessing": C.preprocessing_manifest(cfg.input_size, cfg.preprocess.kind),
        "max_points": max_points,
        "max_batch": max_batch,
        "graphs": graphs,
        "precision": {"fp32": "float32 throughout",
                      "fp16": "float16 with float32 islands: LayerNormalization, Softmax, LayerNorm2d, the DFT "
                              "spectrum, the prompt encoder's random-Fourier positional encoding, the point "
                              "sampling taps, the Fourier encoding and the uncertainty; graph I/O float32",
                      "int8": "encoder with int8 weight matrices (7-bit range) and uint8 activations quantised "
                              "per tensor at run time (ONNX Runtime CPU); the fp32 decoder; graph I/O float32",
                      C.OV_INT8: "OpenVINO encoder with int8 matrix products (NNCF, calibrated; convolutions, "
                                 "softmax and norms float, weights stored fp16, computed fp32; ov-cpu); the fp32 "
                                 "decoder graphs"},
        "io": {"encoder": graph_io(folder / fp32["encoder"]), "decoder": graph_io(folder / fp32["decoder"])},
        "decoder_outputs": "coarse, fine (at every point) and uncertainty; the runtime applies the UGS merge",
        "merge": merge,
        "source": source or {},
        "parity": parity,
    }
    if engines:
        m["engines"] = engines
    if triton:
        m["triton"] = triton
    m["files"] = file_table(folder)
    return m


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = folder / C.MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path
