"""sdtrain: fine-tune Stable Diffusion models from YAML recipes, offline."""

import logging
import os

# Exact resume on CPU: without this, Intel MKL may pick kernels by memory alignment, so two identical
# runs with more than one thread differ in the last bits (measured: LyCORIS runs differed by ~1e-7 after
# one step). Must be set before torch loads MKL; costs no measurable speed at SD1.5 size (the tiny model's small
# products: 14 % of a two-thread step on an AVX2 CPU, docs/benchmarks.md). A user who sets it keeps theirs.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# bitsandbytes (the `cuda` extra), where installed, warns on import about optional CPU kernels on
# machines without them; the 8-bit optimizers sdtrain uses run on CUDA and need none of them.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.1.0"
