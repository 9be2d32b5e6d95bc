"""An int8 encoder for CPUs: ONNX Runtime dynamic quantisation of the ViT's weight matrices.

The encoder is ~75% fp32 GEMM on a CPU (qkv, proj and the two MLP layers of every block); int8 weights with
activations quantised per tensor at run time (``MatMulInteger``) cut that work by ~2x on AVX2 machines.
Only those weight matrices are quantised: every fp32 island of ``fp16.py`` stays float (the DFT matrices
above all: the spectrum's min-max normalisation would amplify their rounding), as do the activation x
activation products of attention, LayerNorm, softmax and the neck's convolutions.

``reduce_range`` (7-bit weights) is not optional here: without VNNI, x86 runs u8 x s8 through
``vpmaddubsw``, whose int16 pair sums saturate on full-range weights; measured on vit_b at 384 px, the
embedding's relative L2 error is 8.9% with full-range weights and 0.6% with 7-bit ones.
The decoder is left in fp32: its per-point logits are compared against the UGS threshold and the mask
boundary, where quantisation error turns straight into flipped pixels. The export measures the int8
graphs' masks and Dice against fp32 on real images (``verify.py``) and refuses to write them past the
stated tolerance.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx

from imedsam_export.fp16 import is_island

QUANTISED_OPS = ("MatMul", "Gemm")
MIN_WIDTH = 64  # narrower weights (the frequency adapters' bottlenecks) gain nothing from int8


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul / Gemm nodes whose second input is a 2-D float weight at least MIN_WIDTH wide
    on both sides, outside the fp32 islands."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in QUANTISED_OPS or len(n.input) < 2 or is_island(n):
            continue
        w = inits.get(n.input[1])
        if w is not None and w.data_type == onnx.TensorProto.FLOAT and len(w.dims) == 2 and min(w.dims) >= MIN_WIDTH:
            out.append(n.name)
    return out


def quantize_int8(src: Path, dst: Path) -> dict[str, Any]:
    """Write the dynamically quantised twin of ``src`` to ``dst``; returns what was done (for the manifest)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src), load_external_data=False)
    nodes = weight_matmuls(model)
    if not nodes:
        raise RuntimeError(f"{src}: no weight matrix to quantise")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser warns on the root logger about an optional pre-processing step
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, nodes_to_quantize=nodes, reduce_range=True,
                         per_channel=False)
    finally:
        root.setLevel(level)
    q = onnx.load(str(dst), load_external_data=False)
    return {"quantized_matmuls": len(nodes), "weights": "int8 per tensor, 7-bit range (reduce_range)",
            "activations": "uint8 per tensor, dynamic (computed at run time)",
            "int8_nodes": sum(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in q.graph.node)}
