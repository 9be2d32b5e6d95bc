"""``imedsam-bench --tune``: the torch backends' switchable options timed on bench frames (the tuner itself is
``imedsam_cuda.torch_tuning``, found by name)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np

from imedsam_core.errors import UserError
from imedsam_deploy import backends as registry
from imedsam_deploy.backends.base import Backend
from imedsam_deploy.bench.inputs import Inputs
from imedsam_deploy.bench.options import BenchOptions
from imedsam_deploy.bench.timing import FrameRunner
from imedsam_deploy.manifest import Artifact
from imedsam_deploy.runtime import QueryMode


def tune_backends(backends: list[Backend], artifact: Artifact, opts: BenchOptions, inputs: Inputs, out_size: int,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    """``--tune``: each torch backend's switchable options timed on the first query, batch and output size
    (``imedsam_cuda.torch_tuning``), the fastest kept for the timed rows and saved for the next run. The tunings."""
    tuner = registry.torch_part("tuning")  # the module; ``tuning`` below is one backend's result

    tunable: list[Any] = [b for b in backends if b.name in ("torch-cuda", "torch-cpu")]  # TorchBackends
    if not tunable:
        raise UserError(f"--tune: it tunes the torch backends (torch-cuda, or torch-cpu with --model), and none of "
                        f"{', '.join(b.name for b in backends)} is one")
    out: list[dict[str, Any]] = []
    for be in tunable:
        tuner.apply(be, be.built_settings)  # from the settings it was built with (not a tuning applied when it opened)
        fr = FrameRunner(be, artifact, cast(QueryMode, opts.queries[0]), opts)
        log(f"tuning {be.name} on {opts.queries[0]} frames, batch {len(inputs.images)}, {out_size}² output")

        def frame(fr: FrameRunner = fr) -> list[np.ndarray]:
            return fr.run(inputs, (out_size, out_size), None)

        # at most 10 timed frames a setting a round: alternated over two rounds, enough on a GPU's replayed graphs
        tuning = tuner.tune(be, frame, repeat=min(10, max(3, opts.repeat)), warmup=max(1, opts.warmup), log=log)
        tuning.tuned_on = {"query": opts.queries[0], "batch": len(inputs.images), "out_size": out_size}
        path = tuner.tuning_path(be, tuner.default_root())
        tuner.save(tuning, path)
        be.tuned_from = path
        log(f"tuned {be.name}: {', '.join(k for k, v in tuning.settings.items() if v) or 'every option off'} "
            f"(saved to {path})")
        out.append({"path": str(path), **tuning.to_json()})
    return out
