"""What the Triton kernels' interpreter scripts share (they run in a subprocess, ``conftest.run_in_triton_interpreter``,
with the repository on the path): one Triton option of torch-cuda's backend, off and on, on the same frame."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch


def backend_runs(option: str, off_again: bool = False, **settings: Any) -> dict[str, Any]:
    """A decode of 300 points (some off the map) and a device-planned sparse box through ``TorchBackend`` on the CPU
    in fp32 (the tiny model, seed 0), with ``option`` off and on (other ``settings`` alike), and then, with
    ``off_again``, switched off again on the same backend (``TorchBackend.configure``). Returns each decoder output's largest difference (relative
    to its largest value), the sparse logits' difference, the points queried, whether the masks are equal, the
    backend's description with the option on, and whether switching it off restored both bitwise."""
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_deploy.sparse import SparseConfig
    from imedsam_train.build import build_from_config
    from imedsam_train.config import preset

    torch.manual_seed(0)
    model, _ = build_from_config(preset("tiny", input_size=64))
    img = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    box = np.array([[10, 12, 50, 44]], np.float32)
    coords = np.random.default_rng(1).uniform(-1.1, 1.1, (1, 300, 2)).astype(np.float32)
    # stride 8 on a 44 x 52 region, as the planner's kernels are checked (the runtime's cell floor would plan
    # a region this small at stride 4 on the host)
    STRIDE_8 = SparseConfig(stride=8, min_cells_across=0)
    runs: dict[Any, Any] = {}
    for on in (False, True):
        be = TorchBackend(model, "cpu", TorchCudaSettings(
            precision="fp32", device_planner=True, **settings, **{option: on}))
        emb = be.encode(img)[0]
        logits, queried = be.sparse_region(emb, box, (8, 52, 6, 58), (64, 64), 0.125, STRIDE_8)
        runs[on] = (be.decode(emb, box, coords), logits, queried, be.description)
        if on and off_again:
            be.configure(dataclasses.replace(be.settings, **{option: False}))
            again, _ = be.sparse_region(emb, box, (8, 52, 6, 58), (64, 64), 0.125, STRIDE_8)
            runs["off again"] = (*be.decode(emb, box, coords), again)
    (d0, l0, q0, _), (d1, l1, q1, desc) = runs[False], runs[True]
    return {"decode_rel": [float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(d0, d1, strict=True)],
            "sparse_rel": float(np.abs(l0 - l1).max() / np.abs(l0).max()), "queried": [q0, q1],
            "masks_equal": bool(((l0 > 0) == (l1 > 0)).all()), "description": desc,
            "off_again_equal": "off again" in runs and all(
                bool(np.array_equal(a, b)) for a, b in zip((*d0, l0), runs["off again"], strict=True))}
