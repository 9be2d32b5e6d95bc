"""Export-time weight folding, checked numerically against the unmodified model.

- LoRA: the q/v low-rank updates are folded into each block's qkv weight (``IMedSAM.merge_lora``). A model
  trained with the released code's data-dependent gate keeps its LoRA branch and computes the gate in-graph.
- BatchNorm (eval mode: a fixed affine map per channel) is folded into the preceding Linear of the INR
  trunks, leaving Linear -> ReLU chains.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from imedsam_core.errors import UserError
from imedsam_train.model import IMedSAM
from imedsam_train.model.lora import LoRAQKV

# fp32 re-association only: a folded weight may differ from the two-step product in the last bits
MERGE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class MergeReport:
    lora_merged_layers: int
    lora_gate_in_graph: bool
    batchnorm_folded: int
    encoder_max_abs_diff: float
    decoder_max_abs_diff: float

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def fold_linear_bn(linear: nn.Linear, bn: nn.BatchNorm1d) -> nn.Linear:
    """Linear followed by eval-mode BatchNorm -> one Linear: W' = s W, b' = s (b - mean) + beta."""
    assert bn.running_mean is not None and bn.running_var is not None
    s = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = linear.bias if linear.bias is not None else torch.zeros_like(bn.running_mean)
    out = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        out.weight.copy_(linear.weight * s[:, None])
        out.bias.copy_((bias - bn.running_mean) * s + beta)
    return out


def fold_mlp(seq: nn.Sequential) -> tuple[nn.Sequential, int]:
    """Linear -> BatchNorm1d -> ReLU ... -> Linear -> ReLU ...; returns (folded, number of folded BNs)."""
    layers = list(seq)
    out: list[nn.Module] = []
    n, i = 0, 0
    while i < len(layers):
        m = layers[i]
        bn = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(m, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            out.append(fold_linear_bn(m, bn))
            n += 1
            i += 2
        else:
            out.append(nn.ReLU() if isinstance(m, nn.ReLU) else m)  # no in-place op in the exported graph
            i += 1
    return nn.Sequential(*out), n


def _has_gate(model: IMedSAM) -> bool:
    return any(isinstance(m, LoRAQKV) and m.gate is not None and not m.merged for m in model.modules())


@torch.no_grad()
def merge_for_export(model: IMedSAM, seed: int = 0) -> tuple[IMedSAM, MergeReport]:
    """A folded eval-mode copy of ``model`` (the original is untouched), verified against it."""
    ref = model.eval()
    merged = copy.deepcopy(model).eval().float()
    gated = _has_gate(merged)
    n_lora = 0 if gated else merged.merge_lora()
    merged.inr.coarse_trunk, n1 = fold_mlp(merged.inr.coarse_trunk)
    merged.inr.fine_trunk, n2 = fold_mlp(merged.inr.fine_trunk)

    # numerical check on a fixed random input (the folding must not change the function)
    cfg = model.cfg
    s = cfg.input_size
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, s, s, generator=g)
    boxes = torch.tensor([[0.1 * s, 0.15 * s, 0.8 * s, 0.7 * s], [0.3 * s, 0.2 * s, 0.95 * s, 0.9 * s]])
    coords = torch.rand(2, 257, 2, generator=g) * 2 - 1
    e_ref, e_new = ref.encode(image), merged.encode(image)
    d_ref = ref.decode_dense(e_ref, boxes, coords)
    d_new = merged.decode_dense(e_ref, boxes, coords)
    enc_diff = float((e_ref - e_new).abs().max())
    dec_diff = max(float((a - b).abs().max()) for a, b in zip(d_ref, d_new, strict=True))
    if not (enc_diff <= MERGE_TOLERANCE and dec_diff <= MERGE_TOLERANCE):
        raise UserError(
            f"weight folding changed the model (encoder {enc_diff:.2e}, decoder {dec_diff:.2e} max abs diff)"
        )
    return merged, MergeReport(n_lora, gated, n1 + n2, enc_diff, dec_diff)
