"""``torch.onnx.export(dynamo=True)`` of the two graphs with dynamic batch / point axes, and graph checks.

Opset 18 is pinned (and tested) for both graphs: it is the lowest opset torch's dynamo exporter emits
(17 fails: onnx has no down-converter for Pad), it has ``LayerNormalization`` and the reduce ops with axes
as inputs, TensorRT 10.x and 11.x parse it, and it stays below opset 20, whose N-d ``GridSample`` trips a
TensorRT 10.13 bug. Our decoder has no GridSample at all (bilinear sampling is written with Gather), so that
part of the pin is belt and braces. Opset 19 exports and passes parity too (checked by hand, not in CI).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from imedsam_core import contract as C
from imedsam_core.errors import UserError
from imedsam_export.graphs import DecoderGraph, EncoderGraph

DEFAULT_OPSET = 18
SUPPORTED_OPSETS = (18, 19)  # 17: not emitted by the exporter; 20+: GridSample / TensorRT 10.13 issue
# ops that must never appear: DFT (TensorRT <= 11.1, ORT CUDA), GridSample (see module doc)
FORBIDDEN_OPS = ("DFT", "STFT", "GridSample")


def check_opset(opset: int) -> int:
    if opset not in SUPPORTED_OPSETS:
        raise UserError(f"--opset {opset}: unsupported, choose one of {', '.join(map(str, SUPPORTED_OPSETS))}")
    return opset


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: tuple[str, ...],
            outputs: tuple[str, ...], dynamic_shapes: dict[str, dict[int, object]], opset: int) -> None:
    # the exporter prints progress lines and deprecation warnings: keep the CLI output to our own lines
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        prog = torch.onnx.export(
            module, args, dynamo=True, input_names=list(inputs), output_names=list(outputs),
            dynamic_shapes=dynamic_shapes, opset_version=opset, external_data=False, optimize=True,
        )
        assert prog is not None
        prog.save(str(path))
    check_graph(path, opset)


def export_encoder(graph: EncoderGraph, path: Path, input_size: int, max_batch: int, opset: int) -> None:
    batch = torch.export.Dim(C.AXIS_BATCH, min=1, max=max_batch)
    image = torch.rand(min(2, max_batch), 3, input_size, input_size)
    _export(graph.eval(), (image,), path, C.ENCODER_INPUTS, C.ENCODER_OUTPUTS,
            {C.ENC_IN_IMAGE: {0: batch}}, opset)


def _decoder_examples(embedding_shape: tuple[int, int, int], input_size: int, max_batch: int, max_points: int
                      ) -> tuple[Any, Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch Dim, points Dim, embedding, boxes, coords) for tracing either form of the decoder."""
    batch = torch.export.Dim(C.AXIS_BATCH, min=1, max=max_batch)
    points = torch.export.Dim(C.AXIS_POINTS, min=1, max=max_points)
    # example sizes other than 0/1 so that torch.export keeps the axes symbolic (callers pass maxima >= 2)
    b, n = min(2, max_batch), min(max(2, max_points // 2), max_points)
    emb = torch.randn(b, *embedding_shape)
    boxes = torch.tensor([[0.1, 0.1, 0.8, 0.9], [0.2, 0.3, 0.9, 0.7]])[:b] * input_size
    return batch, points, emb, boxes, torch.rand(b, n, 2) * 2 - 1


def compose_decoder(prompt_path: Path, points_path: Path, path: Path, opset: int) -> None:
    """The whole decoder as the split pair joined on ``box_features``: ``DecoderGraph.forward`` is exactly
    ``point_outputs(box_features(...))``, so this is that graph without a third ``torch.export`` of it (which
    took about a third of a tiny model's export and a fifth of a lite model's). Each half's internal names get
    a prefix (both traces number their values alike); inputs and outputs keep theirs. The export's parity
    check compares the result with PyTorch like any other graph."""
    prompt, points = (
        onnx.compose.add_prefix(onnx.load(str(p), load_external_data=False), prefix, rename_inputs=False,
                                rename_outputs=False)
        for prefix, p in (("prompt/", prompt_path), ("points/", points_path)))
    merged = onnx.compose.merge_models(prompt, points, io_map=[(C.DEC_BOX_FEATURES, C.DEC_BOX_FEATURES)])
    got = ([i.name for i in merged.graph.input], [o.name for o in merged.graph.output])
    if got != (list(C.DECODER_INPUTS), list(C.DECODER_OUTPUTS)):
        raise RuntimeError(f"{path.name}: composed decoder has inputs/outputs {got}")
    onnx.save(merged, str(path))
    check_graph(path, opset)


def export_split_decoder(graph: DecoderGraph, prompt_path: Path, points_path: Path,
                         embedding_shape: tuple[int, int, int], input_size: int, max_batch: int, max_points: int,
                         opset: int) -> None:
    """The decoder in two graphs: (embedding, boxes) -> box_features and (box_features, coords) -> outputs."""
    batch, points, emb, boxes, coords = _decoder_examples(embedding_shape, input_size, max_batch, max_points)
    prompt = graph.prompt_graph().eval()
    _export(prompt, (emb, boxes), prompt_path, C.PROMPT_INPUTS, C.PROMPT_OUTPUTS,
            {C.DEC_IN_EMBEDDING: {0: batch}, C.DEC_IN_BOXES: {0: batch}}, opset)
    with torch.no_grad():
        feats = prompt(emb, boxes)
    _export(graph.points_graph().eval(), (feats, coords), points_path, C.POINTS_INPUTS, C.DECODER_OUTPUTS,
            {C.DEC_BOX_FEATURES: {0: batch}, C.DEC_IN_COORDS: {0: batch, 1: points}}, opset)


def graph_ops(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    for f in model.functions:
        ops |= {n.op_type for n in f.node}
    return ops


def default_opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_graph(path: Path, opset: int) -> None:
    """The saved graph is valid ONNX, at the pinned opset, with none of the forbidden ops."""
    onnx.checker.check_model(str(path))
    bad = graph_ops(path) & set(FORBIDDEN_OPS)
    if bad:
        raise RuntimeError(f"{path.name}: exported graph contains {sorted(bad)}")
    got = default_opset(path)
    if got != opset:
        raise RuntimeError(f"{path.name}: exported at opset {got}, expected {opset}")
