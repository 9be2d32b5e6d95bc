"""Tiny models with non-trivial LoRA / BatchNorm / gate weights, shared by the export tests."""

from __future__ import annotations

import torch
from torch import nn

from imedsam_train.config import LoraConfig, preset
from imedsam_train.model import IMedSAM
from imedsam_train.model.lora import LoRAQKV

S = 64  # export tests run at 64 x 64 input (4 x 4 tokens)


def tiny_model(gate: bool = False, seed: int = 0) -> IMedSAM:
    """A tiny model whose LoRA updates, gates and BatchNorm statistics are all non-zero (folding matters)."""
    torch.manual_seed(seed)
    cfg = preset("tiny", input_size=S)
    model = IMedSAM(cfg.replace(lora=LoraConfig(rank=4, gate=gate)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAQKV):
                m.lora_b_q.normal_(0, 0.05)
                m.lora_b_v.normal_(0, 0.05)
                if m.gate is not None:
                    m.gate.weight.normal_(0, 0.2)
                    m.gate.bias.fill_(0.7)
            elif isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0, 0.1)
    return model.eval()
