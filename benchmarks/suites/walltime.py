"""Wall-clock time to accuracy as LASSO grows (m x 2m, m/5 nonzeros, lam 0.1).

Seconds to mean relative error 1e-4 and 1e-6 for FISTA, the learned optimizers (trained
on 250 x 500: larger sizes are out of distribution for them), scikit-learn's ``Lasso``
and skglm's ``Lasso`` (when installed). The torch methods solve the instances as one
batch (and, for the single-instance row, one at a time); the scikit-learn solvers one
at a time, as users call them, each at the loosest tolerance that reaches the accuracy.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

import torch_l2o
from torch_l2o.problems import Lasso, mean_relative_error, reference_solve

from bench_lib import run_method, shipped

TOLS = (1e-4, 1e-6)
SK_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10)


def _sk_times(prob64, F_star, fit):
    """For each target: the least total seconds over solver tolerances that reach it."""
    m = prob64.A.shape[1]
    lam = prob64.prox_params["lam"]
    out = {t: None for t in TOLS}
    for tol in SK_TOLS:
        xs, sec = [], 0.0
        for i in range(prob64.batch):
            A, b = prob64.A[i].numpy(), prob64.b[i].numpy()
            t0 = time.perf_counter()
            coef = fit(A, b, lam / m, tol)
            sec += time.perf_counter() - t0
            xs.append(torch.from_numpy(np.asarray(coef, dtype=np.float64)))
        err = float(mean_relative_error(prob64.objective(torch.stack(xs)), F_star))
        for t in TOLS:
            if err <= t and (out[t] is None or sec < out[t]):
                out[t] = sec
        if err <= min(TOLS):
            break
    return out


def _sklearn_fit(A, b, alpha, tol):
    from sklearn.linear_model import Lasso as SkLasso

    return SkLasso(alpha=alpha, fit_intercept=False, tol=tol, max_iter=100_000).fit(A, b).coef_


def _skglm_fit(A, b, alpha, tol):
    from skglm import Lasso as GLasso

    return GLasso(alpha=alpha, fit_intercept=False, tol=tol, max_iter=1000).fit(A, b).coef_


def run(cfg) -> dict:
    sizes = [250, 500, 1000, 2000, 4000] if cfg.full else [250, 500, 1000]
    batch = 16 if cfg.full else 4
    solvers = {"scikit-learn Lasso": _sklearn_fit}
    try:
        import skglm  # noqa: F401

        solvers["skglm Lasso"] = _skglm_fit
        _skglm_fit(np.random.default_rng(0).normal(size=(20, 40)), np.ones(20), 0.01, 1e-4)  # numba warm-up
    except ImportError:
        pass
    rows = []
    for m in tqdm(sizes, desc="walltime", leave=False):
        fam = Lasso(m=m, n=2 * m, sparsity=m // 5, lam=0.1)
        prob = fam.sample(batch, generator=torch.Generator().manual_seed(cfg.seed), dtype=torch.float64)
        F_star = reference_solve(prob).F
        s = prob.step_size().float()
        torch_methods = {
            "FISTA": lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1, lr=s),
            "FISTA-restart": lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1, lr=s, restart=True),
        }
        for label, _, cls in shipped("lasso", ("pa", "pamr")):
            torch_methods[label] = lambda ps, cls=cls: cls(ps, prox="l1", lam=0.1, lr=s, weights="lasso",
                                                           instance_dims=1)
        iters = (400 if m <= 1000 else 600) if cfg.full else 250  # FISTA needs ~100 to 1e-6 here
        for label, make in torch_methods.items():
            tr = run_method(label, prob, F_star, make, iters, device=cfg.device)
            rows.append({"m x n": f"{m} x {2 * m}", "method": f"{label} (batch of {batch})",
                         **{f"s@{t:.0e}": tr.seconds_to(t) for t in TOLS},
                         **{f"it@{t:.0e}": tr.iterations_to(t) for t in TOLS}})
        for label, fit in solvers.items():
            times = _sk_times(prob, F_star, fit)
            rows.append({"m x n": f"{m} x {2 * m}", "method": f"{label} ({batch} fits)",
                         **{f"s@{t:.0e}": times[t] for t in TOLS}})
    return {"tables": {"walltime": rows, "crossover": _crossover(rows, sizes)}, "plots": []}


def _crossover(rows, sizes) -> list[dict]:
    """For each learned optimizer: the smallest size where it beats FISTA in seconds."""
    out = []
    for learned in ("L2O-PA", "L2O-PA-MR"):
        for t in TOLS:
            key = f"s@{t:.0e}"
            first = None
            for m in sizes:
                size = f"{m} x {2 * m}"
                f = next((r[key] for r in rows if r["m x n"] == size and r["method"].startswith("FISTA (")), None)
                l = next((r[key] for r in rows if r["m x n"] == size and r["method"].startswith(learned + " (")), None)
                if f is not None and l is not None and l < f:
                    first = size
                    break
            out.append({"learned": learned, "to": f"{t:.0e}", "beats FISTA in seconds from": first or "never (sizes tried)"})
    return out
