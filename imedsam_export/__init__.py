"""imedsam export: LoRA merge, encoder/decoder ONNX graphs, TensorRT engines, parity checks."""
