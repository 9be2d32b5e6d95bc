"""DDP in one process on the CPU (gloo, world size 1) beside a plain run: the two runs' last weights."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from imedsam_core.paths import CHECKPOINT_DIR, LAST_CHECKPOINT
from imedsam_train.build import safe_torch_load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    return safe_torch_load(run / CHECKPOINT_DIR / LAST_CHECKPOINT)["model"]


def plain_and_ddp_world_one(cfg: Any, train_ds: Any, val_ds: Any, root: Path,
                            monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``train`` as one plain process, then under torchrun's variables at world size 1 (a real process group):
    (plain last.pt weights, DDP last.pt weights)."""
    import torch.distributed as dist

    from imedsam_train.train import Reporter, train

    quiet = Reporter(echo=lambda s: None, progress=False)
    train(cfg, train_ds, val_ds, root=root / "plain", device="cpu", reporter=quiet)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    try:
        train(cfg, train_ds, val_ds, root=root / "ddp", device="cpu", reporter=quiet)
        assert dist.is_initialized() and dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return last_weights(root / "plain/runs" / cfg.name), last_weights(root / "ddp/runs" / cfg.name)
