"""imedsam export: LoRA merge, encoder/decoder ONNX graphs, TensorRT engines, parity checks.

``imedsam_export.api.export_artifact`` (and the ``imedsam-export`` command) turn a checkpoint or an
in-memory model into an artifact folder (manifest.json, encoder.onnx, decoder.onnx, optional fp16 graphs,
TensorRT engines and a Triton model repository). Modules: merge (LoRA / BatchNorm folding), dft (FFT as
matrix products), graphs (the exported modules), onnx_export, fp16, verify, manifest, tensorrt_build, triton.
"""
