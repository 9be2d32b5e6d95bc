"""imedsam deploy runtime: numpy, OpenCV, ONNX Runtime and TensorRT. Never imports torch."""

__version__ = "0.1.0"
