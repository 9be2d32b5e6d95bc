"""Coarse and fine implicit (coordinate-MLP) heads with uncertainty-guided sampling (UGS)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imedsam_core.contract import refine_count


def mlp(in_dim: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU per hidden width (BatchNorm over points, as in the released code)."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
        d = h
    return nn.Sequential(*layers)


def run_pointwise(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a (points, features) network to (B, N, F)."""
    B, N, Fd = x.shape
    return net(x.reshape(B * N, Fd)).reshape(B, N, -1)


@dataclass
class PointPredictions:
    """Per-point outputs, all (B, K, N) with K classes.

    coarse: coarse logits. fine: UGS result (coarse logits with the refined points replaced by the fine
    INR's). uncertainty: per-point uncertainty (see ``INR``). refined: the points UGS refined.
    """

    coarse: torch.Tensor
    fine: torch.Tensor
    uncertainty: torch.Tensor
    refined: torch.Tensor


class INR(nn.Module):
    """Coarse INR (trunk -> dropout -> head) and fine INR over [point features, coarse feature].

    Dropout sits between the coarse trunk and its last linear layer (the head), so the T MC-dropout
    passes share the whole trunk: it is computed once and only the head is re-applied.

    Uncertainty estimator. Training: T MC-dropout passes, the unbiased sample variance of sigmoid(logit)
    across them (the paper). Eval: the closed-form dropout variance, deterministic and exportable. With
    inverted dropout of rate p on trunk features h and head weights w, the logit z = w.(m*h)/(1-p) + b has
    mean w.h + b (the eval logit) and exact variance Var z = p/(1-p) * sum_i w_i^2 h_i^2; the probability's
    variance is then taken to first order (delta method): Var sigmoid(z) ~ (s(1-s))^2 Var z, s = sigmoid(E z).
    It is what the MC estimate converges to for small logit spread, it is largest at uncertain boundary
    points, and unlike eval-mode MC dropout in the released code (dropout off, variance exactly 0, an
    arbitrary K% "refined") it ranks points by a real uncertainty.
    """

    def __init__(
        self, in_dim: int, num_classes: int, coarse_hidden: tuple[int, ...], coarse_feature: int,
        fine_hidden: tuple[int, ...], dropout: float, mc_samples: int, refine_fraction: float,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.coarse_feature = coarse_feature
        self.p, self.T, self.refine_fraction = dropout, mc_samples, refine_fraction
        self.coarse_trunk = mlp(in_dim, coarse_hidden)
        self.coarse_head = nn.Linear(coarse_hidden[-1], num_classes + coarse_feature)
        self.fine_trunk = mlp(in_dim + coarse_feature, fine_hidden)
        self.fine_head = nn.Linear(fine_hidden[-1], num_classes)

    # --- pieces (also used by the exporter) ---
    def coarse_eval(self, feats: torch.Tensor, offset: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deterministic coarse pass: logits (B,N,K), coarse feature (B,N,F), uncertainty (B,N,K).

        offset (B,N,K): a base logit the head's output is added to (a residual read-out); None: 0."""
        h = run_pointwise(self.coarse_trunk, feats)
        out = self.coarse_head(h)
        logits, cfeat = out[..., : self.num_classes], out[..., self.num_classes :]
        if offset is not None:
            logits = logits + offset
        w = self.coarse_head.weight[: self.num_classes]  # (K, D)
        var_z = (self.p / (1.0 - self.p)) * (h * h) @ (w * w).t()  # (B, N, K)
        s = torch.sigmoid(logits)
        unc = (s * (1 - s)) ** 2 * var_z
        return logits, cfeat, unc

    def coarse_mc(self, feats: torch.Tensor, offset: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training-time coarse pass: T dropout samples of the head over one shared trunk."""
        h = run_pointwise(self.coarse_trunk, feats)
        outs = torch.stack([self.coarse_head(F.dropout(h, self.p, training=True)) for _ in range(self.T)])
        if offset is not None:
            outs = torch.cat([outs[..., : self.num_classes] + offset, outs[..., self.num_classes :]], dim=-1)
        logits = outs[..., : self.num_classes]
        unc = torch.sigmoid(logits).var(dim=0, unbiased=self.T > 1).detach()
        mean = outs.mean(dim=0)
        return mean[..., : self.num_classes], mean[..., self.num_classes :], unc

    def fine(self, feats: torch.Tensor, cfeat: torch.Tensor) -> torch.Tensor:
        """Fine logits (B, N, K) at the given points (pointwise in eval mode)."""
        return self.fine_head(run_pointwise(self.fine_trunk, torch.cat([feats, cfeat], dim=-1)))

    def dense(self, feats: torch.Tensor, offset: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eval: coarse, fine *at every point*, uncertainty, each (B, K, N). The export contract."""
        logits, cfeat, unc = self.coarse_eval(feats, offset)
        fine = self.fine(feats, cfeat)
        if offset is not None:
            fine = fine + offset
        return logits.transpose(1, 2), fine.transpose(1, 2), unc.transpose(1, 2)

    def forward(self, feats: torch.Tensor, offset: torch.Tensor | None = None) -> PointPredictions:
        """feats (B, N, F) -> PointPredictions; the fine INR runs only on the top-K% uncertain points.
        offset (B, N, K): a base logit added to both heads' logits (see ``coarse_eval``)."""
        if self.training:
            logits, cfeat, unc = self.coarse_mc(feats, offset)
        else:
            logits, cfeat, unc = self.coarse_eval(feats, offset)
        B, N, K = logits.shape
        k = refine_count(N, self.refine_fraction)
        idx = unc.topk(k, dim=1).indices  # (B, k, K)
        fine = logits.clone()
        for c in range(K):  # one class at a time: its own refined set
            ic = idx[:, :, c]
            fc = self.fine(_gather_points(feats, ic), _gather_points(cfeat, ic))[..., c]
            if offset is not None:
                fc = fc + offset[..., c].gather(1, ic)
            fine[:, :, c] = fine[:, :, c].scatter(1, ic, fc)
        refined = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
        return PointPredictions(
            coarse=logits.transpose(1, 2), fine=fine.transpose(1, 2),
            uncertainty=unc.transpose(1, 2), refined=refined.transpose(1, 2),
        )


def _gather_points(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, N, F), idx (B, k) -> (B, k, F)."""
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def ugs_merge(coarse: torch.Tensor, fine: torch.Tensor, uncertainty: torch.Tensor, fraction: float) -> torch.Tensor:
    """UGS from dense outputs (B, K, N): fine logits at the top-K% uncertain points, coarse elsewhere."""
    k = refine_count(coarse.shape[-1], fraction)
    idx = uncertainty.topk(k, dim=-1).indices
    return coarse.scatter(-1, idx, fine.gather(-1, idx))
