"""fp16 graphs with fp32 islands, the precision written into the ONNX graph.

TensorRT 11 builds only strongly typed networks, so precision has to live in the graph: every tensor gets
the dtype of the region that produces it, with explicit Cast nodes only where a tensor crosses from one
region to the other. (onnxconverter-common's / ONNX Runtime's float16 converter casts around *each* blocked
node separately, so a chain of fp32 nodes round-trips through fp16 between every pair: the DFT's squared
magnitudes, ~1e6 at 64x64, overflow there. Hence this small region-based pass.)

Kept in fp32:
- op types: LayerNormalization and Softmax (ViT activations overflow fp16 there) and Sin/Cos (any phase);
- every node of these modules, found through the exporter's ``pkg.torch.onnx.class_hierarchy`` metadata:
  the DFT spectrum (DC terms ~0.5*S^2, min-max normalisation), SAM's LayerNorm2d (neck), the prompt
  encoder's random-Fourier positional encoding, the decoder's sampling taps, the Fourier encoding
  (2^9 pi phases) and the closed-form uncertainty (underflows fp16, and it ranks the refined points).
Graph inputs and outputs stay float32, so the runtime feeds both precisions alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP32_OPS = ("LayerNormalization", "Softmax", "Sin", "Cos")
FP32_MODULES = (
    "imedsam_export.dft.DFTSpectrum",
    "segment_anything.modeling.common.LayerNorm2d",
    "segment_anything.modeling.prompt_encoder.PositionEmbeddingRandom",
    "imedsam_export.graphs.PointTaps",
    "imedsam_export.graphs.FourierFeatures",
    "imedsam_export.graphs.PointUncertainty",
)
HIERARCHY_KEY = "pkg.torch.onnx.class_hierarchy"
ISLAND_KEY = "imedsam.precision"  # metadata we put on every node: "fp32-island" or "fp16"
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def node_classes(node: onnx.NodeProto) -> str:
    return next((p.value for p in node.metadata_props if p.key == HIERARCHY_KEY), "")


def is_island(node: onnx.NodeProto) -> bool:
    return node.op_type in FP32_OPS or any(m in node_classes(node) for m in FP32_MODULES)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    vals = list(g.value_info) + list(g.input) + list(g.output)
    out = {v.name for v in vals if v.type.tensor_type.elem_type == F32}
    return out | {t.name for t in g.initializer if t.data_type == F32}


def to_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Region-based fp16 conversion (see the module doc). Returns the new model and node counts."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise RuntimeError("graphs with control-flow subgraphs are not supported by the fp16 pass")
    floats = _float_tensors(model)
    dtype: dict[str, int] = {}  # new dtype of every float tensor
    for i in g.input:
        if i.name in floats:
            dtype[i.name] = F32
    inits = {t.name: t for t in g.initializer}
    new_inits: list[onnx.TensorProto] = []
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []
    n16 = n32 = 0

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__to_{'fp16' if to == F16 else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"cast_{out}"))
            casts[key] = out
            dtype[out] = to
        return casts[key]

    def init_as(name: str, to: int) -> str:
        if to == F32:
            return name
        key = (name, to)
        if key not in casts:
            half = onnx.numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float16), f"{name}__fp16")
            new_inits.append(half)
            casts[key] = half.name
        return casts[key]

    for n in g.node:
        want = F32 if is_island(n) else F16
        n32 += want == F32
        n16 += want == F16
        for k, name in enumerate(n.input):
            if name not in floats:
                continue
            if name in inits:
                n.input[k] = init_as(name, want)
            elif dtype.get(name, F32) != want:
                n.input[k] = cast(name, want)
        if want == F16:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i == F32:
                    a.i = F16
                elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F32:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        for o in n.output:
            if o in floats:
                dtype[o] = want
        n.metadata_props.append(onnx.StringStringEntryProto(key=ISLAND_KEY, value="fp32-island" if want == F32 else "fp16"))
        nodes.append(n)

    # graph outputs stay float32
    rename = {}
    for o in g.output:
        if o.name in floats and dtype.get(o.name) == F16:
            rename[o.name] = f"{o.name}__fp16"
    for n in nodes:
        for k, name in enumerate(n.output):
            if name in rename:
                n.output[k] = rename[name]
        for k, name in enumerate(n.input):
            if name in rename:
                n.input[k] = rename[name]
    for final, half in rename.items():
        nodes.append(helper.make_node("Cast", [half], [final], to=F32, name=f"cast_{final}_output"))

    used = {i for n in nodes for i in n.input}
    keep = [t for t in g.initializer if t.name in used] + [t for t in new_inits if t.name in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.value_info[:]
    onnx.shape_inference.infer_shapes(model, strict_mode=True)  # every dtype now consistent
    return model, {"fp16_nodes": n16, "fp32_island_nodes": n32, "casts": len([c for c in casts if c[0] not in inits])}


def convert_fp16(src: Path, dst: Path) -> dict[str, object]:
    """Write the fp16 version of ``src`` to ``dst``; returns a summary of what stayed fp32."""
    model = onnx.load(str(src))
    half, counts = to_fp16(model)
    if not counts["fp32_island_nodes"]:
        raise RuntimeError(f"{src.name}: no fp32 island found (exporter metadata missing?)")
    onnx.save(half, str(dst))
    onnx.checker.check_model(str(dst))
    return {"fp32_ops": list(FP32_OPS), "fp32_modules": list(FP32_MODULES), **counts}
