"""Where L2O-DM's and RNNProp's gradient watch draws its line (torch_l2o.optim.watchdog.watch_gradient).

For each output-scaled learned optimizer on its training family (and out of it), and for
Adam beside it, record every instance's gradient norm G_k over a long run and report the
largest ratio G_k / max(m_{k-1}, FLOOR_GRAD * G_0) (m the running minimum) within the
weights' training horizon and after it, how many instances the watch flags (ratio above
KAPPA_GRAD) and when, and the loss: its minimum and where it ends. A good threshold flags
nothing within the horizon on the training family and flags the runs whose loss climbs
away from its minimum.

    python benchmarks/gradient_watch.py [--instances 64] [--iters 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from tqdm import tqdm

import torch_l2o
from torch_l2o.optim.watchdog import FLOOR_GRAD, KAPPA_GRAD
from torch_l2o.problems import Lasso, LogisticL1, MLPFamily

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lib import format_table  # noqa: E402


def trajectory(prob, make, iters, composite):
    x = prob.x0().requires_grad_(True)
    opt = make([x])
    loss_fn = prob.objective if composite else prob.smooth
    G, L = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the watch's own warning: counted below
        for _ in range(iters):
            opt.zero_grad()
            loss = loss_fn(x)
            loss.sum().backward()
            G.append(x.grad.detach().flatten(1).double().norm(dim=1))
            L.append(loss.detach().double())
            opt.step()
    return torch.stack(G), torch.stack(L), opt


def study(G, L, horizon):
    m = torch.cummin(G, 0).values
    ratio = G[1:] / torch.maximum(m[:-1], FLOOR_GRAD * G[0])  # ratio[k - 1] is step k's
    # the watch stops lowering the minimum at a flagged step; until the first flag this is exact
    flag = ratio > KAPPA_GRAD
    first = torch.where(flag.any(0), flag.float().argmax(0) + 1, torch.full_like(flag[0], -1, dtype=torch.long))
    flagged = first >= 0
    lmin = L.min(0).values
    return {
        "max ratio to horizon": float(ratio[:horizon - 1].max()),
        "max ratio after": float(ratio[horizon - 1:].max()) if len(ratio) >= horizon else None,
        "flagged": f"{int(flagged.sum())}/{G.shape[1]}",
        "first flag (median step)": int(first[flagged].median()) if flagged.any() else "-",
        "mean min loss": float(lmin.mean()),
        "mean end loss": float(L[-1].mean()),
        "end / min loss, flagged (median)": float((L[-1] / lmin)[flagged].median()) if flagged.any() else "-",
        "end / min loss, unflagged (median)": float((L[-1] / lmin)[~flagged].median()) if (~flagged).any() else "-",
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=64)
    ap.add_argument("--iters", type=int, default=1000)
    a = ap.parse_args()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cases = [("MLP digits (sigmoid 20: training family)", MLPFamily(), "mlp", False, 0.1),
             ("MLP digits (ReLU 40: out of family)", MLPFamily(hidden=40, activation="relu"), "mlp", False, 0.1),
             ("LASSO 250x500 (training family; subgradient of F)", Lasso(), "lasso", True, None),
             ("L1 logistic (training family; subgradient of F)", LogisticL1(), "logistic", True, None)]
    rows = []
    for label, fam, weights, composite, adam_lr in tqdm(cases, desc="families"):
        prob = fam.sample(a.instances, generator=gen())
        makes = {"L2O-DM": lambda ps: torch_l2o.L2ODM(ps, weights=weights, instance_dims=1),
                 "RNNProp": lambda ps: torch_l2o.RNNProp(ps, weights=weights, instance_dims=1)}
        if adam_lr:
            makes[f"Adam (lr {adam_lr:g})"] = lambda ps: torch.optim.Adam(ps, lr=adam_lr)
        for name, make in tqdm(makes.items(), desc=label[:20], leave=False):
            G, L, opt = trajectory(prob, make, a.iters, composite)
            card = (getattr(opt, "weights_info", None) or {}).get("card") or {}
            horizon = (card.get("training") or {}).get("horizon", 100)  # Adam has none: the same split
            rows.append({"problem": label, "optimizer": name, "horizon": horizon, **study(G, L, horizon)})
    print(f"KAPPA_GRAD {KAPPA_GRAD:g}, FLOOR_GRAD {FLOOR_GRAD:g}; {a.instances} instances, {a.iters} iterations\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
