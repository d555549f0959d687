"""Math-L2O (seed 004): learned gradient descent on least squares min 1/2 |W x - y|^2.

* The objective at T = 100 against GD, Nesterov (FISTA without prox), Adam (step tuned)
  and the shipped L2O-PA / L2O-PA-MR (LASSO weights, no prox: out of distribution), with
  the relative gain (obj_GD - obj) / obj_GD (the paper: > 50%).
* The meta-training loss on a log scale, from the shipped weights' card (the paper claims
  a linear rate): the fitted rate of log(loss) per step.
* The ablation over the initialisation scale e = 1, 5, 25, 50, 100 (the paper's gains:
  0, 0.03, 0.36, 0.40, 0.41): one training per e with the same budget, on a fixed
  training set of 10 instances (as in the paper's analysis), with its training-loss rate.
  Quick runs use 100 x 128 problems and H = 128; --full the 400 x 512 problems, H = 512.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

import torch_l2o
from torch_l2o.problems import LeastSquares
from torch_l2o.weights import available_weights, build_network

from bench_lib import shipped

ADAM = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def _objective_at(prob, make, T=100):
    x = prob.x0().requires_grad_(True)
    opt = make([x])
    for _ in range(T):
        opt.zero_grad()
        prob.smooth(x).sum().backward()
        opt.step()
    sol = opt.solution(x) if hasattr(opt, "solution") else x.detach()
    return float(prob.smooth(sol).mean())


def _compare(prob, methods):
    gd = _objective_at(prob, methods["GD"])
    rows = []
    for label, make in methods.items():
        v = _objective_at(prob, make)
        rows.append({"method": label, "objective at T=100": v, "gain over GD": (gd - v) / gd})
    return rows


def _train_curve_plot(path, card):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    loss = card.get("training_history", {}).get("loss", [])
    if not loss:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(range(1, len(loss) + 1), loss)
    ax.set_xlabel("meta-training step (SGD)")
    ax.set_ylabel("last-step objective (batch mean)")
    ax.set_title("Math-L2O meta-training loss")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rate(loss) -> dict:
    """Least-squares fit of log(loss) = a + b step: b < 0 is a linear rate exp(b) per step."""
    v = torch.tensor([l for l in loss if math.isfinite(l) and l > 0], dtype=torch.float64)
    if len(v) < 3:
        return {}
    t = torch.arange(len(v), dtype=torch.float64)
    A = torch.stack([torch.ones_like(t), t], 1)
    coef = torch.linalg.lstsq(A, torch.log(v).unsqueeze(-1)).solution.squeeze(-1)
    resid = torch.log(v) - A @ coef
    return {"log-loss slope per step": float(coef[1]), "factor per step": float(math.exp(coef[1])),
            "fit residual std": float(resid.std()), "loss first": float(v[0]), "loss last": float(v[-1])}


def run(cfg) -> dict:
    full = cfg.full
    fam = LeastSquares(400, 512) if full else LeastSquares(100, 128)
    n = 100 if full else 32
    prob = fam.sample(n, generator=torch.Generator().manual_seed(cfg.seed))
    s = prob.step_size()
    tune = fam.sample(16, generator=torch.Generator().manual_seed(cfg.seed + 1))
    adam_lr = min(ADAM, key=lambda lr: _objective_at(tune, lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr)))
    methods = {
        "GD": lambda ps: torch_l2o.ISTA(ps, lr=s),
        "Nesterov (FISTA, no prox)": lambda ps: torch_l2o.FISTA(ps, lr=s),
        f"Adam (lr {adam_lr:g}, tuned)": lambda ps: torch.optim.Adam(ps, lr=adam_lr),
    }
    notes = []
    card = None
    if "qp" in available_weights("mathgd"):
        net, info = build_network("mathgd", "qp")
        card = info["card"] or {}
        methods["Math-L2O GD (shipped)"] = lambda ps: torch_l2o.MathGD(ps, lr=s, weights="qp")
        if not full:
            notes.append("the shipped Math-L2O weights were trained on 400 x 512; quick runs test them on 100 x 128")
    for label, _, cls in shipped("lasso", ("pa", "pamr")):
        methods[f"{label} (LASSO weights)"] = lambda ps, cls=cls: cls(ps, lr=s, weights="lasso", instance_dims=1)
    table = _compare(prob, methods)

    # ablation over e: the same small budget for every e
    abl_fam, hidden, steps = (LeastSquares(400, 512), 512, 100) if full else (LeastSquares(100, 128), 128, 40)
    abl_test = abl_fam.sample(32, generator=torch.Generator().manual_seed(cfg.seed + 2))
    sa = abl_test.step_size()
    gd = _objective_at(abl_test, lambda ps: torch_l2o.ISTA(ps, lr=sa))
    ablation = []
    paper = {1: 0.0, 5: 0.03, 25: 0.36, 50: 0.40, 100: 0.41}
    for e in tqdm((1, 5, 25, 50, 100), desc="mathl2o e", leave=False):
        w, h = torch_l2o.meta_train("mathgd", abl_fam, steps=steps, batch=10, horizon=100, unroll=100, loss="last",
                                    meta_optimizer="sgd", lr=1e-5, clip=None, val_every=steps, val_batch=8,
                                    fixed_batch=True, progress=False, seed=cfg.seed, hidden=hidden,
                                    init_scale=float(e))
        v = _objective_at(abl_test, lambda ps: torch_l2o.MathGD(ps, lr=sa, weights=w, hidden=hidden,
                                                                init_scale=float(e)))
        ablation.append({"e": e, "gain over GD (held instances)": (gd - v) / gd, "paper": paper[e],
                         "training loss first -> last": f"{h.loss[0]:.3g} -> {h.loss[-1]:.3g}" if h.loss else "-",
                         "training log-loss slope per step": _rate(h.loss).get("log-loss slope per step"),
                         "skipped (non-finite)": h.skipped})
    tables = {"mathl2o objective at T=100": table, "mathl2o ablation over e": ablation}
    plots = []
    if card:
        tables["mathl2o meta-training rate (shipped weights)"] = [_rate(card.get("training_history", {}).get("loss", []))]
        p = _train_curve_plot(f"{cfg.out}/mathl2o_training.png", card)
        plots += [p] if p else []
    else:
        notes.append("no Math-L2O weights shipped yet")
    return {"tables": tables, "plots": plots, "notes": notes}
