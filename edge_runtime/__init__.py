"""Device runtime for PatchCore inspection: bundle -> pipeline -> daemon. Never imports torch."""
import os

# OpenBLAS workers spin ~100 ms after every GEMM (even the 8-row exact re-check) and take a core from
# onnxruntime on small boards; a short timeout hands it back (benchmarks/runtime_knobs.py). Read when numpy
# loads, so it only helps where edge_runtime is imported first (the console scripts); users can override it.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
