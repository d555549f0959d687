"""In-distribution composite problems: LASSO (250 x 500) and L1 logistic (1000 x 50).

Baselines use the true Lipschitz constant (``lr = 0.9999 / L`` per instance); the
automatic step (``lr=None``) is measured against it; Adam on the subgradient of F
gets its step tuned on a grid, on separate tuning instances, as a user would.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

import torch_l2o
from torch_l2o.problems import Lasso, LogisticL1, reference_solve

from bench_lib import Trace, plot_traces, run_method

ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _tune_adam(family, cfg) -> float:
    """The Adam step with the lowest final error on 32 tuning instances (seed + 1)."""
    tune = family.sample(32, generator=torch.Generator().manual_seed(cfg.seed + 1), dtype=torch.float64)
    F_star = reference_solve(tune).F
    best = None
    for lr in ADAM_GRID:
        tr = run_method("adam", tune, F_star, lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr),
                        min(cfg.iters, 300), composite_loss=True, device=cfg.device)
        score = min(tr.errors[-1], float("inf"))
        if best is None or score < best[0]:
            best = (score, lr)
    return best[1]


def methods(problem, cfg, family) -> list[tuple[str, callable, dict]]:
    lam = problem.prox_params["lam"]
    s = problem.step_size().to(device=cfg.device, dtype=torch.float32)
    adam_lr = _tune_adam(family, cfg)
    return [
        ("ISTA", lambda ps: torch_l2o.ISTA(ps, prox="l1", lam=lam, lr=s), {}),
        ("FISTA", lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, lr=s), {}),
        ("FISTA-restart", lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, lr=s, restart=True), {}),
        ("FISTA lr=None (secant)", lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, instance_dims=1), {}),
        ("FISTA lr=None (backtracking)",
         lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, instance_dims=1), {"closure": True}),
        (f"Adam (lr={adam_lr:g}, tuned)", lambda ps: torch.optim.Adam(ps, lr=adam_lr), {"composite_loss": True}),
    ]


def _run_family(name: str, family, cfg) -> dict:
    problem = family.sample(cfg.instances, generator=torch.Generator().manual_seed(cfg.seed), dtype=torch.float64)
    sol = reference_solve(problem)
    traces: list[Trace] = []
    for label, make, kw in tqdm(methods(problem, cfg, family), desc=name, leave=False):
        traces.append(run_method(label, problem, sol.F, make, cfg.iters, device=cfg.device, **kw))
    rows = [t.summary() for t in traces]
    plot = f"{cfg.out}/{name}.png"
    title = f"{name}: {cfg.instances} instances, float32, F* in float64 (max KKT {float(sol.kkt.max()):.0e})"
    plots = [plot] if plot_traces(plot, title, traces) else []
    return {"tables": {name: rows}, "plots": plots, "traces": {t.method: t.errors for t in traces}}


def lasso(cfg) -> dict:
    return _run_family("lasso", Lasso(), cfg)


def logistic(cfg) -> dict:
    return _run_family("logistic", LogisticL1(), cfg)
