"""Safeguarded learned optimizers beside FISTA-restart, in and far out of their training family.

The shipped L2O-PA, L2O-PA-GRU and L2O-PA-MR (trained on 250 x 500 LASSO, lam 0.1) run
unguarded (watchdog on, the default) and with ``safeguard=True`` (driven by
``step(closure)``: accepted where the learned step beats FISTA-restart's model, else
FISTA-restart's step, see :mod:`torch_l2o.optim.safeguard`) on: the training family
itself; lam 5x and 100x smaller and 100x larger; A scaled by 100; an ill-conditioned A
(column norms spread over three decades); Gaussian A and b (50 x 100, b not from a
sparse x); a correlated design (rows N(0, 0.9^|i-j|), unit-norm columns); 8x8
natural-image patches over a learned 64 x 128 dictionary (lam 0.5); tiny (n = 10) and
large (n = 100,000 with --full; 20,000 otherwise) problems. Every method starts at 0
with the true step ``0.9999 / L`` per instance, in float32 against a float64 ``F*``.
FISTA with adaptive restart is the reference (first row of each problem); "it@1e-6 /
FISTA-restart" divides a method's iterations to 1e-6 by FISTA-restart's, "err@end /
FISTA-restart" its final error by FISTA-restart's. "fallback rate" counts the
safeguard's refused steps per instance up to the step where the method reached 1e-6
(all steps if it never did); "closures/step" and "ms/step" are what a step cost.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

import torch_l2o
from torch_l2o.problems import Lasso, LassoProblem, reference_solve

from bench_lib import run_method, shipped

BASELINE = "FISTA-restart"


def _correlated(B: int, g: torch.Generator, rho: float = 0.9, m: int = 250, n: int = 500, k: int = 50):
    idx = torch.arange(n, dtype=torch.float64)
    C = torch.linalg.cholesky(rho ** (idx[:, None] - idx[None, :]).abs())
    A = torch.randn(B, m, n, generator=g, dtype=torch.float64) @ C.T
    A = A / torch.linalg.vector_norm(A, dim=1, keepdim=True)
    x = torch.zeros(B, n, dtype=torch.float64)
    x.scatter_(1, torch.rand(B, n, generator=g).argsort(1)[:, :k], torch.randn(B, k, generator=g, dtype=torch.float64))
    return LassoProblem(A=A, b=torch.einsum("bmn,bn->bm", A, x), prox="l1", prox_params={"lam": 0.1})


def _variants(cfg):
    from .composite import ood_patches

    g = lambda s: torch.Generator().manual_seed(cfg.seed + s)
    base = Lasso().sample(16, generator=g(0), dtype=torch.float64)
    big_n = 100_000 if cfg.full else 20_000
    spread = torch.logspace(-2, 1, 500, dtype=torch.float64)

    def lasso(A, b, lam):
        return LassoProblem(A=A, b=b, prox="l1", prox_params={"lam": lam})

    yield "in distribution (250 x 500, lam 0.1)", base
    yield "lam / 5 (0.02)", lasso(base.A, base.b, 0.02)
    yield "lam / 100 (0.001)", lasso(base.A, base.b, 0.001)
    yield "lam x 100 (10)", lasso(base.A, base.b, 10.0)
    yield "A x 100", lasso(base.A * 100, base.b, 0.1)
    yield "ill-conditioned A", lasso(base.A * spread, base.b, 0.1)
    g3 = g(3)
    yield "Gaussian A and b (50 x 100)", lasso(torch.randn(16, 50, 100, generator=g3, dtype=torch.float64),
                                               torch.randn(16, 50, generator=g3, dtype=torch.float64), 0.1)
    yield "correlated design (rho 0.9)", _correlated(16, g(4))
    yield "image patches (64 x 128, lam 0.5)", ood_patches(cfg, patches=64)
    yield "n = 10", Lasso(m=5, n=10, sparsity=2).sample(64, generator=g(1), dtype=torch.float64)
    yield f"n = {big_n:,}", Lasso(m=1000, n=big_n, sparsity=100).sample(1, generator=g(2), dtype=torch.float64)


def _ratio(a, b):
    return None if a is None or b is None or not b else round(a / b, 2)


def run(cfg) -> dict:
    iters = 1000 if cfg.full else 300
    rows = []
    learned = [(lbl, cls) for lbl, _, cls in shipped("lasso", ("pa", "pagru", "pamr"))]
    for name, prob in tqdm(list(_variants(cfg)), desc="safeguard", leave=False):
        sol = reference_solve(prob, max_iter=20_000)
        lam = prob.prox_params["lam"]
        s = prob.step_size().float()
        kw = {"prox": "l1", "lam": lam, "lr": s, "instance_dims": 1}
        methods = [(BASELINE, lambda ps, kw=kw: torch_l2o.FISTA(ps, restart=True, **kw), False),
                   ("FISTA", lambda ps, kw=kw: torch_l2o.FISTA(ps, **kw), False)]
        for lbl, cls in learned:
            methods.append((lbl, lambda ps, cls=cls, kw=kw: cls(ps, weights="lasso", **kw), False))
            methods.append((f"{lbl} safeguard", lambda ps, cls=cls, kw=kw: cls(ps, weights="lasso", safeguard=True, **kw),
                            True))
        base_row = None
        for label, make, closure in methods:
            seen = {"fallbacks": [], "closures": 0}

            def make_and_watch(ps, make=make, seen=seen):
                seen.update(fallbacks=[], closures=0)  # count the timed run's optimizer, not the warm-up's
                opt = make(ps)
                step, p = opt.step, ps[0]

                def counted(c=None):
                    def c2():
                        seen["closures"] += 1
                        return c()
                    out = step(c2 if c is not None else None)
                    fb = opt.state[p].get("fallbacks")
                    seen["fallbacks"].append(None if fb is None else float(fb.double().mean()))
                    return out

                opt.step = counted
                return opt

            try:
                tr = run_method(label, prob, sol.F, make_and_watch, iters, closure=closure, device=cfg.device)
            except FloatingPointError:
                rows.append({"problem": name, "method": label, "err@end": "diverged (non-finite gradient)"})
                continue
            row = tr.summary()
            steps = len(seen["fallbacks"])
            if steps and seen["fallbacks"][-1] is not None:
                k6 = row["it@1e-06"] or steps
                row["fallback rate"] = round(seen["fallbacks"][k6 - 1] / k6, 3)
            row["closures/step"] = round(seen["closures"] / steps, 2) if closure and steps else (1 if steps else None)
            row["ms/step"] = round(1e3 * tr.seconds[-1] / max(steps, 1), 2)
            if label == BASELINE:
                base_row = row
            row["it@1e-6 / FISTA-restart"] = _ratio(row["it@1e-06"], base_row and base_row["it@1e-06"])
            row["err@end / FISTA-restart"] = _ratio(row["err@end"], base_row and base_row["err@end"])
            rows.append({"problem": name, **{k: row.get(k) for k in (
                "method", "it@1e-04", "it@1e-06", "it@1e-6 / FISTA-restart", "err@100", "err@end",
                "err@end / FISTA-restart", "fallback rate", "closures/step", "ms/step")}})
    return {"tables": {"safeguard": rows}, "plots": [],
            "notes": [("safeguard=True: three closure evaluations per step (two where the learned and the "
                       "FISTA-restart gradient points coincide on every instance); ms/step on a shared machine "
                       "is noisy")]}
