"""What a whole ``opt.step()`` costs on small problems, where a step's fixed costs (the
watchdog, ``lr=None``'s estimate, Python and dispatch) weigh as much as its arithmetic.

``python benchmarks/step_overhead.py [--steps 100] [--runs 3]``

Per problem (diabetes 442 x 10, one instance; a Toeplitz-correlated LASSO 32 x 250 x 500,
float32) and method, the mean time of ``opt.step()`` alone (the gradient is computed
outside the timed region) over ``--steps`` steps from ``x0``, for ``--runs`` runs taken in
turn: FISTA-restart; PA-GRU with the mixture weights, with the watchdog in one call of the
CPU loop's library (the default), with the watchdog's bookkeeping in numpy and PyTorch
(the path for what that call does not serve), without the watchdog, and with ``lam`` a
``(B, 1)`` tensor on the loop and on the PyTorch reference (where such strengths ran before
the loop took tensor strengths); the same at
``lr=None`` with the estimate's sums in one pass (the default) and in PyTorch. Then the
estimate alone, ``stepsize.online_lipschitz``, at 1 x 10, 32 x 500 and 1024 x 500.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch_l2o  # noqa: E402
from torch_l2o.kernels.fused import use_fused  # noqa: E402
from torch_l2o.optim import stepsize, watchdog  # noqa: E402
from torch_l2o.problems.ood import correlated_lasso, regression_lasso  # noqa: E402


@contextlib.contextmanager
def declined(module, name):
    """``module.name`` declines (returns ``None``): the PyTorch / numpy path runs."""
    orig = getattr(module, name)
    setattr(module, name, lambda *a, **k: None)
    try:
        yield
    finally:
        setattr(module, name, orig)


def methods(lam, s, batch):
    mix = dict(prox="l1", lam=lam, weights="lasso-mix", instance_dims=1)
    per_instance = dict(mix, lam=torch.full((batch, 1), float(lam)))
    fr = dict(prox="l1", lam=lam, restart=True, instance_dims=1)
    none = contextlib.nullcontext
    return {
        "FISTA-restart": (lambda p: torch_l2o.FISTA(p, lr=s, **fr), none),
        "PA-GRU mix": (lambda p: torch_l2o.PAGRU(p, lr=s, **mix), none),
        "PA-GRU mix, watchdog in numpy": (lambda p: torch_l2o.PAGRU(p, lr=s, **mix),
                                          lambda: declined(watchdog, "watch_records")),
        "PA-GRU mix, no watchdog": (lambda p: torch_l2o.PAGRU(p, lr=s, watchdog=False, **mix), none),
        "PA-GRU mix, lam a (B, 1) tensor": (lambda p: torch_l2o.PAGRU(p, lr=s, **per_instance), none),
        "PA-GRU mix, lam a (B, 1) tensor, reference": (lambda p: torch_l2o.PAGRU(p, lr=s, **per_instance),
                                                       lambda: use_fused(False)),
        "FISTA-restart lr=None": (lambda p: torch_l2o.FISTA(p, **fr), none),
        "FISTA-restart lr=None, sums in PyTorch": (lambda p: torch_l2o.FISTA(p, **fr),
                                                   lambda: declined(stepsize, "secant_sums")),
        "PA-GRU mix lr=None": (lambda p: torch_l2o.PAGRU(p, **mix), none),
        "PA-GRU mix lr=None, sums in PyTorch": (lambda p: torch_l2o.PAGRU(p, **mix),
                                                lambda: declined(stepsize, "secant_sums")),
    }


def step_times(problem, make, ctx, steps: int) -> float:
    x = problem.x0().requires_grad_(True)
    opt = make([x])
    total = 0.0
    with ctx(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            opt.zero_grad()
            problem.smooth(x).sum().backward()
            t0 = time.perf_counter()
            opt.step()
            total += time.perf_counter() - t0
    return total / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; us per step, {a.runs} runs in turn")
    problems = {"diabetes 442 x 10": regression_lasso("diabetes").to(dtype=torch.float32),
                "Toeplitz 32 x 250 x 500": correlated_lasso(32, seed=102).to(dtype=torch.float32)}
    for pname, prob in problems.items():
        ms = methods(prob.prox_params["lam"], prob.step_size(), prob.batch)
        times = {label: [] for label in ms}
        step_times(prob, *ms["PA-GRU mix"], steps=3)  # the loop's library: loaded (or compiled) once
        for _ in range(a.runs):
            for label, (make, ctx) in ms.items():
                times[label].append(step_times(prob, make, ctx, a.steps) * 1e6)
        print(f"\n{pname}")
        for label, ts in times.items():
            print(f"  {label:42s} " + "  ".join(f"{t:7.0f}" for t in ts))
    print("\nstepsize.online_lipschitz alone, us per call (sums in one pass / in PyTorch)")
    for B, n in ((1, 10), (32, 500), (1024, 500)):
        y, g = torch.randn(B, n), torch.randn(B, n)
        row = []
        for ctx in (contextlib.nullcontext, lambda: declined(stepsize, "secant_sums")):
            st = [{}]
            with ctx():
                stepsize.online_lipschitz(st, [y], [g], 1)
                reps = max(5, 20000 // n)
                t0 = time.perf_counter()
                for _ in range(reps):
                    stepsize.online_lipschitz(st, [y], [g], 1)
                row.append((time.perf_counter() - t0) / reps * 1e6)
        print(f"  {B} x {n}: {row[0]:.0f} / {row[1]:.0f}")


if __name__ == "__main__":
    main()
