"""imedsam training package (PyTorch): model, data, losses, metrics, training and evaluation."""

__version__ = "0.1.0"
