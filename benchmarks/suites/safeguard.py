"""Safeguarded learned optimizers on LASSO problems far from their training family.

The shipped L2O-PA and L2O-PA-MR (trained on 250 x 500, lam 0.1) run unguarded and with
``safeguard=True`` on: A scaled by 100, lam 100x larger and smaller, an ill-conditioned
A (column norms spread over three decades), tiny (n = 10) and large (n = 100,000 with
--full; 20,000 otherwise) problems. FISTA with the true L is the reference. The table
reports where the unguarded runs fail and the safeguarded ones do not, and how often the
safeguard fell back to an ISTA step.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

import torch_l2o
from torch_l2o.problems import Lasso, LassoProblem, reference_solve

from bench_lib import run_method, shipped


def _variants(cfg):
    g = lambda s: torch.Generator().manual_seed(cfg.seed + s)  # noqa: E731
    base = Lasso().sample(16, generator=g(0), dtype=torch.float64)
    big_n = 100_000 if cfg.full else 20_000
    spread = torch.logspace(-2, 1, 500, dtype=torch.float64)
    yield "A x 100", LassoProblem(A=base.A * 100, b=base.b, prox="l1", prox_params={"lam": 0.1})
    yield "lam x 100 (10)", LassoProblem(A=base.A, b=base.b, prox="l1", prox_params={"lam": 10.0})
    yield "lam / 100 (0.001)", LassoProblem(A=base.A, b=base.b, prox="l1", prox_params={"lam": 0.001})
    yield "ill-conditioned A", LassoProblem(A=base.A * spread, b=base.b, prox="l1", prox_params={"lam": 0.1})
    yield "n = 10", Lasso(m=5, n=10, sparsity=2).sample(64, generator=g(1), dtype=torch.float64)
    yield f"n = {big_n:,}", Lasso(m=1000, n=big_n, sparsity=100).sample(1, generator=g(2), dtype=torch.float64)


def run(cfg) -> dict:
    iters = 1000 if cfg.full else 300
    rows = []
    learned = [(lbl, cls) for lbl, _, cls in shipped("lasso", ("pa", "pamr"))]
    for name, prob in tqdm(list(_variants(cfg)), desc="safeguard", leave=False):
        sol = reference_solve(prob, max_iter=20_000)
        lam = prob.prox_params["lam"]
        s = prob.step_size().float()
        methods = [("FISTA", lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, lr=s), False)]
        for lbl, cls in learned:
            methods.append((lbl, lambda ps, cls=cls: cls(ps, prox="l1", lam=lam, lr=s, weights="lasso",
                                                         instance_dims=1), False))
            methods.append((f"{lbl} safeguard", lambda ps, cls=cls: cls(ps, prox="l1", lam=lam, lr=s, weights="lasso",
                                                                        safeguard=True, instance_dims=1), True))
        for label, make, closure in methods:
            fallbacks = {}

            def make_and_keep(ps, make=make):
                opt = make(ps)
                fallbacks["opt"], fallbacks["p"] = opt, ps[0]
                return opt

            try:
                tr = run_method(label, prob, sol.F, make_and_keep, iters, closure=closure, device=cfg.device)
                row = tr.summary()
                st = fallbacks["opt"].state[fallbacks["p"]]
                if "fallbacks" in st:
                    row["fallback rate"] = round(float(st["fallbacks"].double().mean()) / iters, 3)
            except FloatingPointError:
                row = {"method": label, "err@end": "diverged (non-finite gradient)"}
            rows.append({"problem": name, **{k: row.get(k) for k in ("method", "it@1e-04", "it@1e-06", "err@100",
                                                                     "err@end", "fallback rate")}})
    return {"tables": {"safeguard": rows}, "plots": []}
