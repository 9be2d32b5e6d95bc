"""The Gaussian on the lite model's base logit map (``DecoderConfig.base_smoothing``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from imedsam_train.config import DecoderConfig, tiny_config
from imedsam_train.model import IMedSAM
from imedsam_train.model.smoothing import LogitSmoothing, gaussian_taps


@pytest.mark.parametrize("sigma", [0.2, 1.0, 1.5, 2.5])
def test_taps_are_a_normalised_symmetric_gaussian_of_radius_3_sigma(sigma):
    k = gaussian_taps(sigma).double()
    r = max(1, math.ceil(3 * sigma))
    assert k.numel() == 2 * r + 1 and torch.equal(k, k.flip(0))
    assert abs(float(k.sum()) - 1.0) < 1e-6 and int(k.argmax()) == r
    assert float(k[r + 1] / k[r]) == pytest.approx(math.exp(-0.5 / sigma**2), rel=1e-5)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_taps_refuse_a_sigma_that_is_not_positive(sigma):
    with pytest.raises(ValueError):
        gaussian_taps(sigma)


def test_smoothing_equals_scipys_gaussian_with_edges_replicated():
    x = torch.randn(2, 3, 40, 33, generator=torch.Generator().manual_seed(0)) * 5
    for sigma in (0.7, 1.5):
        r = max(1, math.ceil(3 * sigma))
        got = LogitSmoothing(sigma)(x).numpy()
        for b in range(2):
            for c in range(3):  # scipy's "nearest" is edge replication; truncate so that its radius is ours
                ref = gaussian_filter(x[b, c].double().numpy(), sigma, mode="nearest", truncate=r / sigma)
                np.testing.assert_allclose(got[b, c], ref, atol=1e-4, rtol=0)
    assert torch.allclose(LogitSmoothing(2.0)(torch.full((1, 1, 9, 9), -3.0)), torch.tensor(-3.0))  # no border pull


def test_smoothing_removes_a_speck_and_a_pinhole_but_keeps_a_straight_edge():
    sm = LogitSmoothing(1.5)
    speck = torch.full((1, 1, 32, 32), -8.0)
    speck[0, 0, 10, 20] = 8.0  # one confident pixel far from any object
    assert (sm(speck) < 0).all() and (speck > 0).sum() == 1
    hole = -speck  # one confident background pixel inside an object
    assert (sm(hole) > 0).all()
    edge = torch.linspace(-8, 8, 32).view(1, 1, 1, 32).expand(1, 1, 32, 32).contiguous()  # a straight ramp
    assert torch.equal(sm(edge) > 0, edge > 0)  # its zero crossing does not move


@pytest.mark.parametrize("sigma", [-0.5, float("nan"), 17.0])
def test_config_refuses_a_bad_sigma(sigma):
    with pytest.raises(ValueError, match="base_smoothing"):
        DecoderConfig(base_smoothing=sigma)


def test_a_model_without_a_base_logit_map_refuses_smoothing():
    cfg = tiny_config(64)
    cfg = cfg.replace(decoder=DecoderConfig(**{**cfg.decoder.__dict__, "base_smoothing": 1.0}))
    with pytest.raises(ValueError, match="only the lite model"):
        IMedSAM(cfg)
