"""The bench's settings (``imedsam-bench``'s options, as the functions below the CLI take them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from imedsam_deploy.runtime import DEFAULT_MARGIN
from imedsam_deploy.sparse import SparseConfig


@dataclass
class BenchOptions:
    backends: list[str] | None = None  # None: every backend available here
    precision: str | None = None  # None: each backend's default (ONNX Runtime fp32, torch-cuda bf16)
    batches: tuple[int, ...] = (1,)
    out_sizes: tuple[int, ...] | None = None  # 0: the artifact's input size; None: default_out_sizes
    queries: tuple[str, ...] = ("sparse", "box")
    chunk: int | None = None  # decoder points per call (None: runtime default, capped at max_points)
    warmup: int = 1
    repeat: int = 10
    margin: float = DEFAULT_MARGIN
    sparse: SparseConfig = field(default_factory=SparseConfig)
    reference: bool = False
    tta: bool = False  # every box also decoded on the mirrored image, logits averaged (imedsam-infer --tta)
    threads: int | None = None
    tune: bool = False  # torch backends: time their switchable options first, keep and save the fastest
    backend_options: dict[str, str] = field(default_factory=dict)  # --backend-option KEY=VALUE, split
