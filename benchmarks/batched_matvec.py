"""Batched matrix-vector products on the CPU: the column form against the row form.

``python benchmarks/batched_matvec.py [--threads 1] [--device cuda]``

``einsum("bmn,bn->bm", A, x)`` is ``bmm(A, x[..., None])``, a batched product of a matrix
by a column; :func:`torch_l2o.problems.matvec` writes the same product as a row vector
times the transposed matrix, ``bmm(x[:, None], A.mT)``, and ``rmatvec`` ``A^T r`` as
``bmm(r[:, None], A)``. Prints milliseconds per product (mean of 10 after one warm-up) for
the four forms at the benchmark's sizes, float32 and float64.
"""

from __future__ import annotations

import argparse
import time

import torch


def _ms(fn, device: str, reps: int = 10) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = a.device
    where = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else f"{a.threads} CPU thread(s)"
    print(f"torch {torch.__version__}, {where}; milliseconds per batched product")
    print(f"{'B x (m x n)':>20s} {'dtype':>8s} {'A x: column':>12s} {'row (now)':>10s} {'A^T r: column':>14s} "
          f"{'row (now)':>10s}")
    for B, m, n in [(64, 250, 500), (8, 1000, 2000), (256, 50, 100), (1, 4000, 8000)]:
        for dtype in (torch.float32, torch.float64):
            gen = torch.Generator().manual_seed(0)
            A = torch.randn(B, m, n, generator=gen, dtype=dtype).to(dev)
            x = torch.randn(B, n, generator=gen, dtype=dtype).to(dev)
            r = torch.randn(B, m, generator=gen, dtype=dtype).to(dev)
            t = [_ms(f, dev) for f in (lambda: torch.bmm(A, x.unsqueeze(-1)), lambda: torch.bmm(x.unsqueeze(1), A.mT),
                                       lambda: torch.bmm(A.mT, r.unsqueeze(-1)), lambda: torch.bmm(r.unsqueeze(1), A))]
            print(f"{f'{B} x ({m} x {n})':>20s} {str(dtype)[6:]:>8s} {t[0]:12.2f} {t[1]:10.2f} {t[2]:14.2f} {t[3]:10.2f}")


if __name__ == "__main__":
    main()
