"""imedsam_cuda: the PyTorch GPU runtime (the [train] and [cuda] extras).

The torch-cuda backend (``torch_cuda``: the trained model run in PyTorch, CUDA graphs, ``torch.compile``), its
options (``torch_settings``), its device-side sparse planner (``torch_sparse``), its tuner (``torch_tuning``), the
bench's torch models (``torch_models``), the trained modules' inference forms (``encoder_attention``,
``encoder_loop``, ``prompt_attention``, ``encoder_rewrites``, ``box_part_rewrites``) and the
hand-written Triton kernels (``fused_*``, ``triton_support``). The base runtime (imedsam_deploy) finds it by
name (``imedsam_deploy.backends``), never by an import, and this package imports torch only in the modules
that need it, so ``probe`` can say why the backend cannot run without torch.
"""
