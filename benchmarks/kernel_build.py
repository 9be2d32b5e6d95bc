"""Every Triton kernel of torch-cuda compiled ahead of time for an NVIDIA target, with no GPU: what the installed
Triton makes of each at vit_b's shapes (registers a thread, spilled bytes, shared memory), as a launch would.

The lent GPU machines run another Triton than ours (the device image's 3.6 against our 3.8), and a kernel that
compiles under one may not under the other, or may spill there: run this under both before a GPU session.

    python -m benchmarks.kernel_build                       # every kernel, sm_90, bf16 (torch-cuda's precision)
    python -m benchmarks.kernel_build --only add_norm --json out.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from typing import Any

import torch

KERNELS = ("add_norm", "attention_operands", "frequency_chain", "point_features", "uncertainty", "planner")


def builds(names: tuple[str, ...], capability: int) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(kernel, variant, its compile figures) for each kernel named, at vit_b's shapes in bf16."""
    from torch import nn

    from imedsam_cuda.encoder_attention import inference_attention
    from imedsam_cuda.encoder_rewrites import lean_block
    from imedsam_export.graphs import DecoderGraph
    from imedsam_export.merge import merge_for_export
    from imedsam_train.build import build
    from imedsam_train.config import FrequencyConfig, LoraConfig
    from imedsam_train.model.encoder import Block

    bf16 = torch.bfloat16
    torch.manual_seed(0)
    model, _ = build("vit_b", input_size=384)
    model.eval()

    def decoder() -> DecoderGraph:
        return DecoderGraph(merge_for_export(model)[0])

    def add_norm() -> Iterator[tuple[str, dict[str, Any]]]:
        from imedsam_cuda.fused_add_norm import compile_for

        yield from compile_for(768, bf16, capability).items()

    def attention_operands() -> Iterator[tuple[str, dict[str, Any]]]:
        from imedsam_cuda.fused_attention_operands import compile_for

        for window in (14, 0):
            blk = Block(768, 12, 4.0, window, 24, LoraConfig(enabled=False), FrequencyConfig(enabled=False)).eval()
            inference_attention(blk, True, None)
            yield f"window {window}" if window else "global", compile_for(lean_block(blk, 24, bf16), bf16, capability)

    def frequency_chain() -> Iterator[tuple[str, dict[str, Any]]]:
        import copy

        from imedsam_cuda.fused_frequency_chain import FusedFrequencyChain

        enc = copy.deepcopy(model.image_encoder)
        for m in enc.modules():
            if isinstance(m, nn.Linear):
                m.to(bf16)
        yield "12 adapters", FusedFrequencyChain(enc).compile_for(capability)

    def point_features() -> Iterator[tuple[str, dict[str, Any]]]:
        from imedsam_cuda.fused_point_features import FusedPointFeatures

        yield "336-wide bf16 rows", FusedPointFeatures(decoder()).compile_for(336, bf16, capability=capability)

    def uncertainty() -> Iterator[tuple[str, dict[str, Any]]]:
        from imedsam_cuda.fused_uncertainty import FusedUncertainty

        yield "512 hidden, 1 class", FusedUncertainty(torch.rand(512, 1)).compile_for(bf16, capability=capability)

    def planner() -> Iterator[tuple[str, dict[str, Any]]]:
        from imedsam_cuda.fused_planner import compile_for

        for s in (8, 4, 2, 1):  # the strides of a 384² plan
            for kernel, use in compile_for(s, 1, 2 if s == 1 else 1, capability).items():
                yield f"{kernel}, stride {s}", use

    table: dict[str, Callable[[], Iterator[tuple[str, dict[str, Any]]]]] = {
        "add_norm": add_norm, "attention_operands": attention_operands, "frequency_chain": frequency_chain,
        "point_features": point_features, "uncertainty": uncertainty, "planner": planner}
    for name in names:
        for variant, got in table[name]():
            yield name, variant, got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=KERNELS, default=list(KERNELS))
    ap.add_argument("--capability", type=int, default=90, help="the NVIDIA target: 90 Hopper, 80 Ampere")
    ap.add_argument("--json", help="write the rows here too")
    a = ap.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_{a.capability}")
    print(f"{'kernel':<20} {'variant':<32} {'registers':>9} {'spills':>7} {'shared B':>9}")
    rows = []
    for name, variant, got in builds(tuple(a.only), a.capability):
        spills = got.get("spill_stores", 0) + got.get("spill_loads", 0)
        print(f"{name:<20} {variant:<32} {got.get('registers', '-'):>9} {spills:>7} {got.get('shared_bytes', '-'):>9}")
        rows.append({"kernel": name, "variant": variant, **got})
    if a.json:
        from imedsam_core.atomic import atomic_write_text

        atomic_write_text(a.json, json.dumps({"triton": triton.__version__, "torch": torch.__version__,
                                              "capability": a.capability, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
