"""``--triton``: a Triton Inference Server model repository inside the artifact.

    triton/
      imedsam_encoder/{config.pbtxt, 1/model.onnx|model.plan}   image -> image_embedding
      imedsam_decoder/{config.pbtxt, 1/model.onnx|model.plan}   (embedding, boxes, coords) -> logits
      imedsam/{config.pbtxt, 1/}                                ensemble: the embedding passes server-side
      client_example.py                                         tritonclient (HTTP) usage

Clients that prompt one image with many boxes call the encoder once and the decoder per box batch; the
ensemble serves the one-box case in one request. Dynamic batching on every model merges concurrent requests
(the decoder batches requests with equal N; the runtime sends full chunks of max_points). Each model gets one
instance per visible GPU (``KIND_GPU`` without a GPU list), so one repository serves many GPUs.
Models are ONNX Runtime graphs, or TensorRT plans when ``--engine`` built them (same GPU model as the server).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from imedsam_core import contract as C
from imedsam_train.config import ModelConfig

TRITON_DIR = "triton"
ENCODER_MODEL = "imedsam_encoder"
DECODER_MODEL = "imedsam_decoder"
ENSEMBLE_MODEL = "imedsam"
QUEUE_DELAY_US = 200


def _tensor(name: str, dims: list[int]) -> str:
    return f'  {{ name: "{name}" data_type: TYPE_FP32 dims: [ {", ".join(map(str, dims))} ] }}'


def _io(kind: str, items: list[tuple[str, list[int]]]) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor(n, d) for n, d in items) + "\n]\n"


def model_config(name: str, max_batch: int, inputs: list[tuple[str, list[int]]],
                 outputs: list[tuple[str, list[int]]], plan: bool) -> str:
    backend = 'platform: "tensorrt_plan"' if plan else 'backend: "onnxruntime"'
    return (
        f'name: "{name}"\n{backend}\nmax_batch_size: {max_batch}\n'
        + _io("input", inputs) + _io("output", outputs)
        + f"dynamic_batching {{ max_queue_delay_microseconds: {QUEUE_DELAY_US} }}\n"
        + "instance_group [ { count: 1 kind: KIND_GPU } ]\n"
    )


def ensemble_config(max_batch: int, inputs: list[tuple[str, list[int]]], outputs: list[tuple[str, list[int]]]) -> str:
    maps_enc = f'input_map {{ key: "{C.ENC_IN_IMAGE}" value: "{C.ENC_IN_IMAGE}" }} ' \
               f'output_map {{ key: "{C.ENC_OUT_EMBEDDING}" value: "{C.ENC_OUT_EMBEDDING}" }}'
    dec_in = " ".join(f'input_map {{ key: "{n}" value: "{n}" }}' for n in C.DECODER_INPUTS)
    dec_out = " ".join(f'output_map {{ key: "{n}" value: "{n}" }}' for n in C.DECODER_OUTPUTS)
    return (
        f'name: "{ENSEMBLE_MODEL}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
        + _io("input", inputs) + _io("output", outputs)
        + "ensemble_scheduling {\n  step [\n"
        + f'    {{ model_name: "{ENCODER_MODEL}" model_version: -1 {maps_enc} }},\n'
        + f'    {{ model_name: "{DECODER_MODEL}" model_version: -1 {dec_in} {dec_out} }}\n'
        + "  ]\n}\n"
    )


def write_triton_repository(folder: Path, cfg: ModelConfig, max_batch: int, max_points: int, precision: str,
                            graphs: dict[str, dict[str, str]], engines: dict[str, str] | None = None) -> str:
    """Write ``folder/triton``; returns its name. ``engines``: {graph: engine file} to serve plans instead."""
    root = folder / TRITON_DIR
    s, d, g, k = cfg.input_size, cfg.encoder.out_chans, cfg.grid_size, cfg.num_classes
    emb = [d, g, g]
    enc_in, enc_out = [(C.ENC_IN_IMAGE, [3, s, s])], [(C.ENC_OUT_EMBEDDING, emb)]
    dec_in = [(C.DEC_IN_EMBEDDING, emb), (C.DEC_IN_BOXES, [4]), (C.DEC_IN_COORDS, [-1, 2])]
    dec_out = [(n, [k, -1]) for n in C.DECODER_OUTPUTS]
    for model, graph, ins, outs in ((ENCODER_MODEL, "encoder", enc_in, enc_out),
                                    (DECODER_MODEL, "decoder", dec_in, dec_out)):
        vdir = root / model / "1"
        vdir.mkdir(parents=True)
        plan = engines is not None
        src = folder / (engines[graph] if engines is not None else graphs[precision][graph])
        shutil.copyfile(src, vdir / ("model.plan" if plan else "model.onnx"))
        (root / model / "config.pbtxt").write_text(model_config(model, max_batch, ins, outs, plan))
    (root / ENSEMBLE_MODEL / "1").mkdir(parents=True)
    (root / ENSEMBLE_MODEL / "config.pbtxt").write_text(
        ensemble_config(max_batch, [enc_in[0], dec_in[1], dec_in[2]], dec_out))
    (root / "client_example.py").write_text(CLIENT_EXAMPLE.format(
        ensemble=ENSEMBLE_MODEL, encoder=ENCODER_MODEL, decoder=DECODER_MODEL, embedding=C.ENC_OUT_EMBEDDING,
        image=C.ENC_IN_IMAGE, boxes=C.DEC_IN_BOXES, coords=C.DEC_IN_COORDS,
        coarse=C.DEC_OUT_COARSE, fine=C.DEC_OUT_FINE, unc=C.DEC_OUT_UNCERTAINTY, max_points=max_points))
    return TRITON_DIR


CLIENT_EXAMPLE = '''"""Segment one image with one box through the Triton ensemble (pip install tritonclient[http]).

    tritonserver --model-repository triton/ &
    python triton/client_example.py image.jpg 40,60,300,280 mask.png
"""

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import tritonclient.http as httpclient

manifest = json.loads((Path(__file__).resolve().parents[1] / "manifest.json").read_text())
size, fraction = manifest["input_size"], manifest["refine_fraction"]
path, box_arg, out = sys.argv[1], sys.argv[2], sys.argv[3]
bgr = cv2.imread(path)
h, w = bgr.shape[:2]
# the manifest's preprocessing: stretch resize, RGB, x / 255, NCHW
rgb = cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
image = (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
x0, y0, x1, y1 = map(float, box_arg.split(","))
box = np.array([[x0 * size / w, y0 * size / h, x1 * size / w, y1 * size / h]], np.float32)
ys, xs = (2 * np.arange(h) + 1) / h - 1, (2 * np.arange(w) + 1) / w - 1  # pixel centres, [-1, 1]
coords = np.stack(np.meshgrid(xs, ys), -1).reshape(1, -1, 2).astype(np.float32)

client = httpclient.InferenceServerClient("localhost:8000")


def infer(model, **arrays):
    inputs = []
    for name, a in arrays.items():
        inputs.append(httpclient.InferInput(name, a.shape, "FP32"))
        inputs[-1].set_data_from_numpy(a)
    return client.infer(model, inputs)


# the encoder runs once per image; the decoder once per chunk of at most max_points query points
# (one request through the "{ensemble}" ensemble does both when the query fits in one chunk)
emb = infer("{encoder}", {image}=image).as_numpy("{embedding}")
parts = {{"{coarse}": [], "{fine}": [], "{unc}": []}}
for i in range(0, coords.shape[1], {max_points}):
    chunk = np.ascontiguousarray(coords[:, i:i + {max_points}])
    res = infer("{decoder}", {embedding}=emb, {boxes}=box, {coords}=chunk)
    for name in parts:
        parts[name].append(res.as_numpy(name))
coarse, fine, unc = (np.concatenate(parts[n], -1)[0, 0] for n in parts)
# UGS: the most uncertain ceil(fraction * N) points take the fine logit
k = max(1, int(np.ceil(fraction * coarse.size)))
top = np.argpartition(-unc, k - 1)[:k]
logit = coarse.copy()
logit[top] = fine[top]
cv2.imwrite(out, ((logit > 0).reshape(h, w) * 255).astype(np.uint8))
'''
