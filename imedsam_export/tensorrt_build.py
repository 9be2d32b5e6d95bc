"""TensorRT engines from the exported ONNX graphs (``--engine``).

Follows the current TensorRT Python API (10.x and 11.x):
- strongly typed networks only: precision comes from the ONNX graph (our fp16 graphs carry their fp32
  islands as explicit Casts). TensorRT 11 always builds strongly typed and deprecates the creation flag;
  on TensorRT 10 we pass ``1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED``. No FP16/BF16 builder flag;
- one optimisation profile: batch 1..max_batch and points 1..max_points (the runtime chunks larger queries);
- a timing cache kept between builds (``$IMEDSAM_CACHE`` or ``~/.cache/imedsam``), keyed by TensorRT version;
- ``build_serialized_network`` -> engine bytes written atomically, with metadata (TensorRT version, GPU name
  and compute capability, sha256 of the ONNX source) recorded in the manifest.
Where TensorRT (or a CUDA GPU) is missing, ``build_engines`` says so in one line and returns None; the
ONNX artifact is still written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from imedsam_core import contract as C
from imedsam_core.atomic import atomic_write_bytes
from imedsam_core.errors import UserError
from imedsam_core.paths import cache_dir
from imedsam_train.build import sha256_file
from imedsam_train.config import ModelConfig

WORKSPACE_BYTES = 4 << 30


def engine_name(onnx_name: str) -> str:
    return onnx_name[: -len(".onnx")] + ".engine"


def timing_cache_path(trt_version: str) -> Path:
    return cache_dir() / f"tensorrt-{trt_version}.timing-cache"


def tensorrt_unavailable() -> str | None:
    """Why engines cannot be built here (one line), or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed: engines skipped, ONNX artifact written (pip install 'imedsam[tensorrt]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible: TensorRT engines skipped, ONNX artifact written"
    return None


def profile_shapes(graph: str, cfg: ModelConfig, max_batch: int, max_points: int
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) per input of one graph; opt = batch 1 and full chunks of max_points."""
    s, d, g = cfg.input_size, cfg.encoder.out_chans, cfg.grid_size
    if graph == "encoder":
        return {C.ENC_IN_IMAGE: ((1, 3, s, s), (1, 3, s, s), (max_batch, 3, s, s))}
    return {
        C.DEC_IN_EMBEDDING: ((1, d, g, g), (1, d, g, g), (max_batch, d, g, g)),
        C.DEC_IN_BOXES: ((1, 4), (1, 4), (max_batch, 4)),
        C.DEC_IN_COORDS: ((1, 1, 2), (1, max_points, 2), (max_batch, max_points, 2)),
    }


def build_engine(onnx_path: Path, engine_path: Path, shapes: dict[str, Any], cache_path: Path) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 11:  # TensorRT 11: strongly typed always, flag deprecated
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path.name}: TensorRT cannot parse it ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"{onnx_path.name}: TensorRT engine build failed (see the TensorRT log above)")
    atomic_write_bytes(engine_path, bytes(memoryview(plan)))
    atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))


def build_engines(folder: Path, graphs: dict[str, dict[str, str]], cfg: ModelConfig, max_batch: int,
                  max_points: int, say: Callable[[str], None]) -> dict[str, Any] | None:
    """Engines for the highest precision exported (fp16 if present); manifest entry, or None if skipped."""
    why = tensorrt_unavailable()
    if why is not None:
        say(why)
        return None
    import tensorrt as trt
    import torch

    precision = "fp16" if "fp16" in graphs else "fp32"
    names = graphs[precision]
    cache_path = timing_cache_path(trt.__version__)
    entry: dict[str, Any] = {}
    for graph in ("encoder", "decoder"):
        onnx_path = folder / names[graph]
        engine = engine_name(names[graph])
        build_engine(onnx_path, folder / engine, profile_shapes(graph, cfg, max_batch, max_points), cache_path)
        entry[graph] = engine
        say(f"built {engine}")
    major, minor = torch.cuda.get_device_capability(0)
    entry.update({
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
        "onnx_sha256": {g: sha256_file(folder / names[g]) for g in ("encoder", "decoder")},
        "profile": {"max_batch": max_batch, "max_points": max_points},
        "strongly_typed": True,
        "timing_cache": str(cache_path),
    })
    return {precision: entry}
