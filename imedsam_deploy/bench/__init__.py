"""Latency and throughput of the deploy runtime, per stage and per backend (``imedsam-bench``).

One *frame* = ``batch`` images with one box each, from RGB uint8 to masks at the output size, split into
preprocess, encoder, decoder and postprocess (``timing``). Each configuration is warmed up, then timed
``repeat`` times; p50/p95/p99 per stage and end to end (``run``).

Query modes (see ``runtime`` and ``sparse``): ``full`` decodes every output pixel; ``box`` only the box
plus a margin; ``sparse`` the box plus margin, multiresolution (``sparse.py``).

With ``reference`` the released code's compute (``imedsam_cuda/reference.py``, eager PyTorch fp32, same
weights; for a lite artifact zero-shot LiteMedSAM's own pipeline) runs on the same inputs, interleaved with ours repeat by repeat, and every row gets
``speedup_vs_reference`` and the pixel agreement of its mask with the reference's, inside the box and over the
whole output (``reference``). With it the process also holds the PyTorch model and the heap the reference freed
but glibc kept, so measure memory (``peak_rss_mb``) without it.

The modules, one concern each, importing only those above them: ``options`` and ``inputs``; ``timing`` (clocks,
memory, the frame runner); ``reference``; ``targets`` (artifact and backends); ``tuning`` (``--tune``);
``reports`` (summary, table, JSON / CSV / PNG); ``run`` (the benchmark).

torch, imedsam_export and the PyTorch GPU runtime (``imedsam_cuda``, found by name: ``backends.torch_part``)
are imported only inside the functions that need them (reference, ``--model``, the torch backends): the runtime
itself stays torch-free.
"""

from imedsam_deploy.bench.inputs import RANDOM_SEED, Inputs, file_inputs, synthetic_inputs
from imedsam_deploy.bench.options import BenchOptions
from imedsam_deploy.bench.reference import agreement
from imedsam_deploy.bench.reports import table, write_outputs
from imedsam_deploy.bench.run import default_out_sizes, run_bench
from imedsam_deploy.bench.targets import latest_artifact_of, random_artifact, share_options
from imedsam_deploy.bench.timing import FrameRunner, Timings
from imedsam_deploy.bench.tuning import tune_backends

__all__ = ["RANDOM_SEED", "BenchOptions", "FrameRunner", "Inputs", "Timings", "agreement", "default_out_sizes",
           "file_inputs", "latest_artifact_of", "random_artifact", "run_bench", "share_options", "synthetic_inputs", "table",
           "tune_backends", "write_outputs"]
