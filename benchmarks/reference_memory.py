"""Peak memory and time of L2O-PA-MR's reference step (the PyTorch modules, no fused
backend) at a given size, with the network called in slices or in one call.

``python benchmarks/reference_memory.py [--elements 1e6] [--chunk 65536]``; ``--chunk 0``
calls the network once over every coordinate (what the step did before slicing: about
3.7 GB at 1e6 elements, so ~37 GB at 1e7). Run one size per process: the figure is the
process's peak resident set.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import torch_l2o  # noqa: E402
from torch_l2o import nets  # noqa: E402
from torch_l2o.kernels.fused import use_fused  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=float, default=1e6)
    ap.add_argument("--chunk", type=int, default=nets.CHUNK, help="coordinates per network call; 0: one call")
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    n = int(a.elements)
    nets.CHUNK = a.chunk or n
    x = torch.zeros(n, requires_grad=True)
    x.grad = torch.randn(n, generator=torch.Generator().manual_seed(0))
    opt = torch_l2o.PAMR([x], prox="l1", lam=0.1, lr=0.1, weights="untrained", watchdog=False)
    with use_fused(False):
        opt.step()  # the state
        t = time.perf_counter()
        for _ in range(a.steps):
            opt.step()
        sec = (time.perf_counter() - t) / a.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(f"PA-MR reference step, {n:.0e} elements, chunk {nets.CHUNK}, {torch.get_num_threads()} threads: "
          f"peak RSS {peak / 1e9:.2f} GB, {sec / n * 1e9:.0f} ns per element per step")


if __name__ == "__main__":
    main()
