"""How sharp is a learned optimizer about its base step, and what does ``lr=None`` give it?

On held instances of the papers' LASSO family (250 x 500, lam 0.1): iterations to mean
relative error 1e-4 / 1e-6 at a constant base step ``c / L`` for several ``c``, with three
early steps at 1.2 / L then ``1 / L`` (what the secant estimate's first steps do), and with
``lr=None`` at several multipliers of the estimate; and the estimate ``L_k / L`` over the
first steps. ``python benchmarks/step_sensitivity.py [--arch pamr] [--weights NAME_OR_PATH]``
(about a minute per architecture on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

from torch_l2o.problems import Lasso, mean_relative_error, reference_solve
from torch_l2o.registry import get_architecture

CS = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
MULTIPLIERS = (0.5, 0.6, 0.7, 0.85, 1.0)


def _run(cls, weights, p, p64, F, lam, lr_at, scale=None, iters=100, watch_steps=()):
    x = p.x0().requires_grad_(True)
    opt = cls([x], prox="l1", lam=lam, lr=lr_at(0), weights=weights, instance_dims=1)
    if scale is not None:
        opt.auto_lr_scale = scale
    errs, ratios, L = [], {}, 1 / p.step_size().reshape(-1)
    for k in range(iters):
        if lr_at(k) is not None:
            opt.param_groups[0]["lr"] = lr_at(k)
        opt.zero_grad()
        p.smooth(x).sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the watchdog's warning: counted below
            opt.step()
        errs.append(float(mean_relative_error(p64.objective(opt.solution(x).double()), F)))
        if k in watch_steps:
            ratios[k] = (opt.state[x]["lipschitz"].reshape(-1) / L).tolist()
    first = [next((k + 1 for k, e in enumerate(errs) if e <= t), None) for t in (1e-4, 1e-6)]
    wd = opt.state[x].get("watchdog")
    return first, (int(wd.sum()) if wd is not None else 0), ratios


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["pamr"])
    ap.add_argument("--weights", default="lasso", help="a shipped name or a path (default: lasso)")
    ap.add_argument("--instances", type=int, default=128)
    ap.add_argument("--seed", type=int, default=999)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    p64 = Lasso().sample(a.instances, generator=torch.Generator().manual_seed(a.seed), dtype=torch.float64)
    F = reference_solve(p64).F
    p = p64.to(torch.float32)
    s, lam = p.step_size(), p.prox_params["lam"]
    for arch in a.arch:
        cls = get_architecture(arch).optimizer
        print(f"{get_architecture(arch).display_name}, weights {a.weights}: iterations to 1e-4 / 1e-6 "
              f"({a.instances} instances, seed {a.seed})")
        for c in CS:
            it, _, _ = _run(cls, a.weights, p, p64, F, lam, lambda k, c=c: c * s)
            print(f"  base step {c} / L: {it[0]} / {it[1]}", flush=True)
        it, _, _ = _run(cls, a.weights, p, p64, F, lam, lambda k: 1.2 * s if k < 3 else s)
        print(f"  1.2 / L for three steps, then 1 / L: {it[0]} / {it[1]}", flush=True)
        for m in MULTIPLIERS:
            it, wd, r = _run(cls, a.weights, p, p64, F, lam, lambda k: None, scale=m, watch_steps=(1, 2, 3, 10))
            est = ", ".join(f"step {k + 1}: {statistics.median(v):.2f}" for k, v in r.items())
            print(f"  lr=None, multiplier {m}: {it[0]} / {it[1]}; watchdog fallbacks {wd}/{a.instances}; "
                  f"median L_k / L after {est}", flush=True)
        it, _, _ = _run(cls, a.weights, p, p64, F, lam, lambda k: None)
        print(f"  lr=None, the weights' own multiplier: {it[0]} / {it[1]}", flush=True)


if __name__ == "__main__":
    main()
