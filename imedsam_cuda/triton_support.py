"""Triton where torch's CUDA build brings it: the import, and what the fused kernels (``fused_add_norm`` and the
other ``fused_*`` modules) share to launch on the right device and to compile ahead of time without a GPU."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

try:  # optional: torch-cuda's fused kernels only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

# triton's pointer type names for torch's float dtypes
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def pow2(n: int, least: int = 16) -> int:
    """A block size: n rounded up to a power of two, at least ``least`` (``tl.arange`` and ``tl.dot`` want both)."""
    return max(least, 1 << max(0, (n - 1).bit_length()))


def available(device: torch.device | str | None = None) -> str | None:
    """None when Triton kernels can run here (on ``device``, if given: a CUDA device, or any with Triton's
    interpreter on, ``TRITON_INTERPRET=1``), else why not."""
    import os

    if triton is None:
        return "triton is not installed (it comes with the CUDA builds of torch on Linux)"
    if device is not None and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernel needs a CUDA device"
    return None


def on_device(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Triton launches on the current CUDA device: a context that makes ``x``'s device current (a backend on
    cuda:1), or nothing to do."""
    if x.is_cuda and x.device.index not in (None, torch.cuda.current_device()):
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def compile_ahead(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any], capability: int,
                  options: dict[str, Any]) -> Any:
    """Compile a jitted kernel for an NVIDIA target (90: Hopper) with no GPU: Triton's front end, its passes and
    ptxas, as a launch would. ``signature``: each argument's triton type ("*fp32", "i32", ...); constexprs are
    added. A kernel that the interpreter runs may still fail here (an ``Any`` annotation inside a jitted
    helper did, on an H200)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    src = ASTSource(kernel, signature={n: sig[n] for n in names},
                    constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def ptxas_usage(compiled: Any, capability: int) -> dict[str, int]:
    """Registers a thread and spilled bytes of a kernel compiled ahead of time (``compile_ahead``), as ptxas
    reports them for its PTX (Triton's bundled ptxas, ``-v``): {"registers", "spill_stores", "spill_loads"}.
    A kernel at the 255-register limit, or spilling, runs one program an SM or goes through local memory."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        res = subprocess.run([get_ptxas(capability).path, "-v", f"-arch={arch}", str(ptx), "-o", str(Path(d) / "k.o")],
                             capture_output=True, text=True, check=True)
    text = res.stderr + res.stdout

    def num(pattern: str) -> int:
        m = re.search(pattern, text)
        if m is None:
            raise RuntimeError(f"ptxas -v printed no {pattern!r}: {text[-500:]}")
        return int(m.group(1))

    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads")}
