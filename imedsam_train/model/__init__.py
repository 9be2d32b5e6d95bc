"""Model definitions (no I/O here; loading lives in imedsam_train.build and imedsam_train.checkpoint)."""

from imedsam_train.model.imedsam import IMedSAM, grid_coords, to_maps
from imedsam_train.model.inr import PointPredictions, ugs_merge
from imedsam_train.model.lite import LiteIMedSAM

__all__ = ["IMedSAM", "LiteIMedSAM", "PointPredictions", "grid_coords", "to_maps", "ugs_merge"]
