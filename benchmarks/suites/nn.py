"""Training neural networks (L2O-DM's and RNNProp's home ground): a 64-20-10 sigmoid MLP
on scikit-learn's digits, each instance its own 128 examples and initialisation, against
Adam and SGD with steps tuned on a grid; and out of distribution, a ReLU MLP of width 40.
``watchdog``: instances whose gradient norm jumped 100x above its running minimum (the
learned optimizers' divergence report, :func:`torch_l2o.optim.watchdog.watch_gradient`)."""

from __future__ import annotations

import time
import warnings

import torch
from tqdm import tqdm

from torch_l2o.problems import MLPFamily

from bench_lib import shipped

ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
SGD_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)


def _loss_curve(problem, make, iters):
    x = problem.x0().requires_grad_(True)
    opt = make([x])
    losses = [float(problem.smooth(x.detach()).mean())]
    t = 0.0
    for _ in range(iters):
        t0 = time.perf_counter()
        opt.zero_grad()
        problem.smooth(x).sum().backward()
        opt.step()
        t += time.perf_counter() - t0
        losses.append(float(problem.smooth(x.detach()).mean()))
    flagged = opt.state[x].get("watchdog")  # L2O-DM / RNNProp: instances whose gradient norm jumped
    flagged = "-" if flagged is None else f"{int(flagged.sum())}/{flagged.numel()}"
    return losses, float(problem.accuracy(x.detach()).mean()), t, flagged


def _suite(name, family, cfg, iters):
    n = 256 if cfg.full else max(8, cfg.instances // 2)  # the learned optimizers cost ~45x Adam per step
    prob = family.sample(n, generator=torch.Generator().manual_seed(cfg.seed))
    tune = family.sample(16, generator=torch.Generator().manual_seed(cfg.seed + 1))

    def tuned(cls, grid):
        scores = {lr: _loss_curve(tune, lambda ps, lr=lr: cls(ps, lr=lr), iters)[0][-1] for lr in grid}
        return min(scores, key=scores.get)

    a, s = tuned(torch.optim.Adam, ADAM_GRID), tuned(torch.optim.SGD, SGD_GRID)
    methods = {f"Adam (lr {a:g}, tuned)": lambda ps: torch.optim.Adam(ps, lr=a),
               f"SGD (lr {s:g}, tuned)": lambda ps: torch.optim.SGD(ps, lr=s)}
    for label, _, cls in shipped("mlp"):
        methods[label] = lambda ps, cls=cls: cls(ps, weights="mlp", instance_dims=1)  # one watch per MLP
    rows, curves = [], {}
    for label, make in tqdm(methods.items(), desc=name, leave=False):
        with warnings.catch_warnings():  # counted in the table instead
            warnings.filterwarnings("ignore", "L2ODM|RNNProp", RuntimeWarning)
            losses, acc, sec, flagged = _loss_curve(prob, make, iters)
        curves[label] = losses
        rows.append({"method": label, "loss@20": losses[20], "loss@100": losses[100], f"loss@{iters}": losses[-1],
                     "min loss": min(losses), "train accuracy": acc, "seconds": round(sec, 2), "watchdog": flagged})
    plot = f"{cfg.out}/{name}.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, c in curves.items():
            ax.semilogy(c, label=label)
        ax.set_xlabel("iteration")
        ax.set_ylabel("mean training loss")
        ax.set_title(name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        plt.close(fig)
        plots = [plot]
    except ImportError:
        plots = []
    return rows, plots


def run(cfg) -> dict:
    iters = 300 if not cfg.full else 1000
    ind, p1 = _suite("nn_mlp_digits", MLPFamily(), cfg, iters)
    ood, p2 = _suite("nn_mlp_relu40_digits", MLPFamily(hidden=40, activation="relu"), cfg, iters)
    return {"tables": {"nn_mlp_digits (in distribution)": ind, "nn_mlp_relu40_digits (out of distribution)": ood},
            "plots": p1 + p2}
