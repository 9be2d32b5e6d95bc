"""Points the device sparse planner decodes per frame once its budgets have settled, against what it needs.

Every pass of ``DevicePlanner`` after the first evaluates its whole point budget (static shapes, so a plan is
one CUDA graph); budgets start from a guess and grow after an overflow (that box goes to the host planner).
This runs the runtime's sparse mode (torch backend, device planner, on the CPU: the same decisions as on a
GPU) over a few frames of the same synthetic input as ``gpu_check``, as its warm-up does, and reports the
overflows, each pass's need and budget, and the later passes' decoded points against needed ones, with the
budgets grown to the needs (``DevicePlanner.grow(needs)``, the runtime's) or by the former rule (every budget
doubled, the dilation's pass sharing stride 1's):

    python -m benchmarks.planner_budgets --model vit_b --sizes 384 896
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--input-size", type=int, default=384)
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 896])
    ap.add_argument("--frames", type=int, default=5, help="frames per size (gpu_check's sparse warm-up: 5)")
    ap.add_argument("--growth", nargs="+", choices=("needs", "former"), default=["needs", "former"])
    a = ap.parse_args(argv)
    import torch

    from imedsam_cuda import torch_sparse
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_models import model_artifact
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_deploy.bench import BenchOptions, FrameRunner, synthetic_inputs
    from imedsam_train.build import build

    torch.manual_seed(0)
    model, _ = build(a.model, input_size=a.input_size)
    model = model.eval()
    S = a.input_size
    art = model_artifact(model, max_batch=1)
    plans: list[tuple[list[int], tuple[int, ...]]] = []
    P = torch_sparse.DevicePlanner
    plan, grow, init = P.plan, P.grow, P.__init__

    def former_init(self: Any, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        self.dilation_cap = self.caps[1]

    def former_grow(self: Any, needs: list[int]) -> None:
        self.caps = {s: min(self.lattice_points(s), 2 * c) for s, c in self.caps.items()}
        self.dilation_cap = self.caps[1]
        self._budgets()

    def recorded_plan(self: Any, decode: Any, region: Any, table: Any = None) -> Any:
        out = plan(self, decode, region, table)
        plans.append(([int(n) for n in out[4]], self.budget_key()))
        return out

    print(f"{'growth':<7} {'out':>5} {'overflows':>9}  needs per pass / budgets per pass          later passes: decoded / needed")
    try:
        P.plan = recorded_plan  # type: ignore[method-assign]
        for rule in a.growth:
            P.grow = grow if rule == "needs" else former_grow  # type: ignore[method-assign]
            P.__init__ = init if rule == "needs" else former_init  # type: ignore[method-assign]
            be = TorchBackend(model, "cpu", TorchCudaSettings(
                precision="fp32", device_planner=True, device_merge=True))
            runner = FrameRunner(be, art, "sparse", BenchOptions())
            for out in a.sizes:
                inp = synthetic_inputs(S, 1, seed=2)
                plans.clear()
                f0, t0 = be.planner_fallbacks, time.perf_counter()
                for _ in range(a.frames):
                    runner.run(inp, (out, out), None)
                needs, budgets = plans[-1]
                print(f"{rule:<7} {out:>5} {be.planner_fallbacks - f0:>9}  {needs} / {list(budgets)}  "
                      f"{sum(budgets[1:])} / {sum(needs[1:])}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        P.plan, P.grow, P.__init__ = plan, grow, init  # type: ignore[method-assign]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
