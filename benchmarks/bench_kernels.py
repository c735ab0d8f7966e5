"""Monarch Triton kernels vs PyTorch SDPA (cuDNN / flash / efficient) at the MonarchRT shapes.

    python benchmarks/bench_kernels.py --out DIR [--shapes full-111 ar-111 ...] [--analysis] [--low-memory]

Same as ``toolkit bench``; the implementation and the argument list are in ``toolkit/kernels/bench.py``
(``kernels/bench.py`` in the repo). Checks every variant against a reference, then times it; one failing variant
is reported and skipped. Writes DIR/bench_kernels.json and DIR/bench_kernels.md.
"""

import sys

from toolkit.kernels.bench import main

if __name__ == "__main__":
    sys.exit(main())
