"""Composite problems: LASSO and L1 logistic regression, in and out of distribution.

Every method starts at x0 = 0 and is scored at its prox output against a float64 F*.
Baselines use the true Lipschitz constant (``lr = 0.9999 / L`` per instance); the
automatic step (``lr=None``) is measured beside it, for FISTA, FISTA-restart and the
learned optimizers whose ``lr`` is the step (at their weights' calibrated multiplier);
Adam on the subgradient of F gets its step tuned on a grid, on separate tuning
instances, as a user would. The learned
optimizers load the shipped weights for the family (``lasso`` or ``logistic``); L2O-DM
and RNNProp, which apply no prox, get the subgradient of F as in their papers.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

import torch_l2o
from torch_l2o.problems import Lasso, LogisticL1, reference_solve
from torch_l2o.problems.real import image_patch_lasso, sklearn_logistic, uci_logistic
from torch_l2o.registry import get_architecture
from torch_l2o.weights import available_weights

from bench_lib import Trace, plot_traces, run_method, shipped

ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def tune_adam(problem, F_star, cfg, iters) -> float:
    """The Adam step with the lowest final error on ``problem`` (tuning instances)."""
    best = None
    for lr in ADAM_GRID:
        tr = run_method("adam", problem, F_star, lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr), iters,
                        composite_loss=True, device=cfg.device, warmup=0)  # errors only, not timed
        if best is None or tr.errors[-1] < best[0]:
            best = (tr.errors[-1], lr)
    return best[1]


def methods(problem, cfg, weights: str, adam_lr: float | None, learned=None, baselines=True,
            extra: dict | None = None) -> list[tuple[str, callable, dict]]:
    """The methods to compare on ``problem``: (label, optimizer factory, run_method options)."""
    lam = problem.prox_params["lam"]
    s = problem.step_size().to(device=cfg.device, dtype=torch.float32)
    k = 1  # instances along dim 0
    out = []
    if baselines:
        out += [
            ("ISTA", lambda ps: torch_l2o.ISTA(ps, prox="l1", lam=lam, lr=s), {}),
            ("FISTA", lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, lr=s), {}),
            ("FISTA-restart", lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, lr=s, restart=True), {}),
            ("FISTA lr=None", lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, instance_dims=k), {}),
            ("FISTA-restart lr=None", lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, restart=True,
                                                                 instance_dims=k), {}),
        ]
        if adam_lr is not None:
            out.append((f"Adam (lr {adam_lr:g}, tuned)", lambda ps: torch.optim.Adam(ps, lr=adam_lr),
                        {"composite_loss": True}))
    auto = []  # what a user who does not know L gets: the estimated step, times the card's multiplier
    for label, arch, cls in shipped(weights, learned):  # learned: architectures (default: all trained on it)
        spec = get_architecture(arch)
        if not spec.applies_prox:
            out.append((label, lambda ps, cls=cls: cls(ps, weights=weights), {"composite_loss": True}))
            continue
        out.append((label, lambda ps, cls=cls: cls(ps, prox="l1", lam=lam, lr=s, weights=weights,
                                                   instance_dims=k), {}))
        if baselines and spec.lr_is_step:
            auto.append((f"{label} lr=None", lambda ps, cls=cls: cls(ps, prox="l1", lam=lam, weights=weights,
                                                                     instance_dims=k), {}))
    out += auto  # after every 1/L row, as the tables read
    for label, (arch, w, opts) in (extra or {}).items():
        if w in available_weights(arch):
            cls = get_architecture(arch).optimizer
            out.append((label, lambda ps, cls=cls, w=w, opts=opts: cls(ps, prox="l1", lam=lam, lr=s, weights=w,
                                                                       instance_dims=k, **opts),
                        {"closure": bool(opts.get("safeguard"))}))
    return out


def compare(name: str, problem64, cfg, weights: str, tune_on=None, iters=None, **kw) -> dict:
    """Run every method on ``problem64`` (float64 data; methods run in float32)."""
    iters = iters or cfg.iters
    sol = reference_solve(problem64)
    adam_lr = None
    if tune_on is not None:
        adam_lr = tune_adam(tune_on, reference_solve(tune_on).F, cfg, min(iters, 300))
    traces: list[Trace] = []
    for label, make, opts in tqdm(methods(problem64, cfg, weights, adam_lr, **kw), desc=name, leave=False):
        traces.append(run_method(label, problem64, sol.F, make, iters, device=cfg.device, **opts))
    rows = [t.summary() for t in traces]
    plot = f"{cfg.out}/{name}.png"
    title = f"{name}: {problem64.batch} instance(s), float32 iterates, F* float64 (KKT {float(sol.kkt.max()):.0e})"
    plots = [plot] if plot_traces(plot, title, traces) else []
    return {"tables": {name: rows}, "plots": plots, "traces": {t.method: t.errors for t in traces}}


def _merge(*results) -> dict:
    out = {"tables": {}, "plots": [], "traces": {}}
    for r in results:
        out["tables"].update(r["tables"])
        out["plots"] += r["plots"]
        out["traces"].update({f"{next(iter(r['tables']))}/{k}": v for k, v in r["traces"].items()})
    return out


def _in_distribution(name: str, family, cfg, **kw) -> dict:
    """Test instances (seed) and separate tuning instances (seed + 1) from the training family."""
    prob = family.sample(cfg.instances, generator=torch.Generator().manual_seed(cfg.seed), dtype=torch.float64)
    tune = family.sample(32, generator=torch.Generator().manual_seed(cfg.seed + 1), dtype=torch.float64)
    return compare(name, prob, cfg, name, tune_on=tune, **kw)


# The shipped L2O-PA stalls on about 1 LASSO instance in 128 (its card); the safeguard is the remedy.
SAFEGUARDED = {"L2O-PA safeguard": ("pa", "lasso", {"safeguard": True})}


def lasso(cfg) -> dict:
    """LASSO 250 x 500 in distribution."""
    return _in_distribution("lasso", Lasso(), cfg, extra=SAFEGUARDED)


def ood_images(cfg):
    """A folder of natural images in the data directory (BSDS500/ or images/), else None:
    scikit-learn's sample images."""
    if cfg.data_dir:
        from pathlib import Path

        found = [p for p in (Path(cfg.data_dir) / "BSDS500", Path(cfg.data_dir) / "images") if p.is_dir()]
        return found[0] if found else None
    return None


def ood_patches(cfg, seed_offset=0, patches=None):
    return image_patch_lasso(ood_images(cfg), patches=patches or (1000 if cfg.full else 4 * cfg.instances),
                             seed=cfg.seed + seed_offset, dtype=torch.float64)


def lasso_ood(cfg) -> dict:
    """LASSO on 8x8 natural-image patches (dictionary 64 x 128, lam 0.5): out of distribution."""
    images = ood_images(cfg)
    prob = ood_patches(cfg)
    tune = ood_patches(cfg, 1, patches=32)
    res = compare("lasso_ood_images", prob, cfg, "lasso", tune_on=tune)
    res["notes"] = [f"images: {images or 'scikit-learn sample images (china.jpg, flower.jpg)'}"]
    return res


def logistic(cfg) -> dict:
    """L1 logistic 1000 x 50 in distribution."""
    return _in_distribution("logistic", LogisticL1(), cfg)


def logistic_ood(cfg) -> dict:
    """L1 logistic on real data: breast cancer (scikit-learn) always; Ionosphere and
    Spambase when the data directory holds them."""
    results = [compare("logistic_ood_breast_cancer", sklearn_logistic(dtype=torch.float64), cfg, "logistic",
                       tune_on=sklearn_logistic(dtype=torch.float64))]
    notes = []
    for name in ("ionosphere", "spambase"):
        try:
            prob = uci_logistic(name, cfg.data_dir, dtype=torch.float64)
        except FileNotFoundError as e:
            notes.append(f"skipped {name}: {e}")
            continue
        results.append(compare(f"logistic_ood_{name}", prob, cfg, "logistic", tune_on=prob))
    out = _merge(*results)
    out["notes"] = notes + ["Adam's step for a real data set is tuned on that data set itself (one instance)"]
    return out
