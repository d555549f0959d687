"""What ``torch_l2o.solve``'s certified stop costs beside the bare optimizer steps.

``python benchmarks/solve_overhead.py [--runs 3] [--threads 2]``

On 32 LASSO problems 250 x 500 (the papers' family, seed 0), float64 (tol 1e-8) and
float32 (tol 1e-4): ``solve(problem, "fista", check_every=k)`` for k = 1, 5, 10, and the
same number of bare FISTA-restart steps as k = 1 took (``opt.step()`` with the gradient
given). Each figure is the least of ``--runs`` runs, the variants taken in turn.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch_l2o  # noqa: E402
from torch_l2o.problems import Lasso  # noqa: E402

CHECKS = (1, 5, 10)


def _solve(prob, tol, k):
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = torch_l2o.solve(prob, "fista", tol=tol, max_iter=3000, check_every=k)
    return time.perf_counter() - t, int(res.iterations.max()), bool(res.converged.all())


def _bare(prob, steps):
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.FISTA([x], prox="l1", lam=0.1, lr=prob.step_size(), restart=True, instance_dims=1)
    t = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        x.grad = prob.grad(x.detach())
        opt.step()
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, least of {args.runs} runs")
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-4)):
        prob = Lasso().sample(32, generator=torch.Generator().manual_seed(0), dtype=dtype)
        best: dict = {}
        for _ in range(args.runs):
            for k in CHECKS:
                s, it, ok = _solve(prob, tol, k)
                best[k] = (min(s, best.get(k, (s,))[0]), it, ok)
            s = _bare(prob, best[1][1])
            best["bare"] = (min(s, best.get("bare", (s,))[0]), best[1][1], True)
        cells = [f"check_every={k}: {best[k][0] * 1e3:.0f} ms ({best[k][1]} it{'' if best[k][2] else ', NOT converged'})"
                 for k in CHECKS]
        print(f"{str(dtype).split('.')[-1]} tol {tol:g}: " + "; ".join(cells)
              + f"; bare steps: {best['bare'][0] * 1e3:.0f} ms ({best['bare'][1]} it)")


if __name__ == "__main__":
    main()
