"""A LASSO regularisation path as one batch: one ``lam`` per instance, a certified stop.

    python examples/lasso_path.py

One design (200 x 400, unit-norm columns, a 20-sparse code, 1% noise) and 16 values of
``lam`` from ``lam_max`` down to ``lam_max / 100``: 16 problems of one batch, the design
shared (``A.expand``, no copy), ``lam`` a ``(16, 1)`` tensor. :func:`torch_l2o.solve`
stops each on its certified relative duality gap (1e-6) with FISTA-restart, L2O-PA-GRU
(default weights) and L2O-PA-GRU with the mixture weights; then scikit-learn's
``lasso_path`` (coordinate descent with warm starts) solves the same path. A few seconds.

Read it plainly: per-instance strengths run on the fused CPU loop, and PA-GRU with its
default weights needs about FISTA-restart's iterations in total (fewer at small ``lam``, more
at large) and about its seconds (0.7-1.3x in runs on a 2-core CPU); the mixture weights need
more. For a path on a CPU scikit-learn's warm-started coordinate descent is more than ten
times faster than all of them. Many paths at once, on a GPU, is where a batched first-order
method has a case.
"""

import time
import warnings

import numpy as np
import torch
from sklearn.linear_model import lasso_path

import torch_l2o
from torch_l2o.problems import LassoProblem


def main(m: int = 200, n: int = 400, steps: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    A /= A.norm(dim=0)
    x_true = torch.zeros(n, dtype=torch.float64)
    x_true[torch.randperm(n, generator=g)[:20]] = torch.randn(20, generator=g, dtype=torch.float64)
    b = A @ x_true + 0.01 * torch.randn(m, generator=g, dtype=torch.float64)
    lam_max = float((A.T @ b).abs().max())  # above it the solution is 0
    lams = lam_max * torch.logspace(0, -2, steps + 1, dtype=torch.float64)[1:]
    path = LassoProblem(A=A.expand(steps, m, n), b=b.expand(steps, m), prox="l1",
                        prox_params={"lam": lams.reshape(steps, 1)})
    print(f"LASSO path: {m} x {n}, {steps} values of lam from {lams[0]:.3g} to {lams[-1]:.3g}, one batch")
    out = {}
    for label, method, options in (("FISTA-restart", "fista", {}), ("L2O-PA-GRU", "pagru", {}),
                                   ("L2O-PA-GRU mix", "pagru", {"weights": "lasso-mix"})):
        with warnings.catch_warnings():  # warm-up (the CPU loop's library loads): 3 steps, not converged
            warnings.simplefilter("ignore", torch_l2o.ConvergenceWarning)
            torch_l2o.solve(path, method, tol=1e-6, max_iter=3, **options)
        t0 = time.perf_counter()
        res = torch_l2o.solve(path, method, tol=1e-6, **options)
        seconds = time.perf_counter() - t0
        out[label] = (res, seconds)
        its = res.iterations
        print(f"  {label:16s} {seconds:6.3f} s   iterations per lam {int(its.min())}-{int(its.max())} "
              f"(total {int(its.sum())}), all certified: {bool(res.converged.all())}")
    # scikit-learn's objective is 1/(2m)|y - Xw|^2 + alpha |w|_1: alpha = lam / m
    t0 = time.perf_counter()
    _, coefs, _ = lasso_path(A.numpy(), b.numpy(), alphas=(lams / m).numpy(), tol=1e-10)
    sk_seconds = time.perf_counter() - t0
    ours = out["FISTA-restart"][0].x.double().numpy()
    gap = float(np.abs(coefs.T - ours).max())
    print(f"  {'scikit-learn':16s} {sk_seconds:6.3f} s   lasso_path, warm starts; largest coefficient difference "
          f"from FISTA-restart's {gap:.1e}")
    out["scikit-learn"] = (coefs.T, sk_seconds)
    return out


if __name__ == "__main__":
    main()
