"""Where a learned run's seconds go with the handoff: the learned phase and FISTA-restart's tail.

``python benchmarks/handoff_phases.py [--runs 3]``

On the ood suite's Toeplitz LASSO set (32 x 250 x 500, float32, ``lr = 1/L``), per run (in
turn): FISTA-restart for 138 iterations and PA-GRU with the mixture weights (the card's
handoff) for 127, their iterations to mean relative error 1e-6 in the suite. Printed: the
gradient's and the step's total milliseconds, the iteration at which the last instance
handed off, and the mean step before and after it (FISTA-restart: its mean step).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch_l2o  # noqa: E402
from torch_l2o.problems.ood import correlated_lasso  # noqa: E402


def run(prob, make, iters):
    x = prob.x0().requires_grad_(True)
    opt = make([x])
    grad = 0.0
    steps, last = [], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(iters):
            t0 = time.perf_counter()
            opt.zero_grad()
            prob.smooth(x).sum().backward()
            t1 = time.perf_counter()
            opt.step()
            steps.append(time.perf_counter() - t1)
            grad += t1 - t0
            st = opt.state[x]
            if last is None and "handoff" in st and bool((st["handoff"] | st["watchdog"]).all()):
                last = k
    return grad, steps, last


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args(argv)
    prob = correlated_lasso(32, seed=102).to(dtype=torch.float32)  # the ood suite's lasso_toeplitz
    lam, s = prob.prox_params["lam"], prob.step_size()
    methods = {
        "FISTA-restart": (lambda p: torch_l2o.FISTA(p, lr=s, prox="l1", lam=lam, restart=True, instance_dims=1), 138),
        "PA-GRU mix": (lambda p: torch_l2o.PAGRU(p, lr=s, prox="l1", lam=lam, weights="lasso-mix", instance_dims=1),
                       127),
    }
    run(prob, methods["PA-GRU mix"][0], 3)  # the loop's library: loaded (or compiled) once
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Toeplitz 32 x 250 x 500")
    for r in range(a.runs):
        for name, (make, iters) in methods.items():
            grad, steps, last = run(prob, make, iters)
            ms = 1e3
            line = f"run {r}  {name:14s} gradient {grad * ms:6.1f} ms  steps {sum(steps) * ms:6.1f} ms  " \
                   f"total {(grad + sum(steps)) * ms:6.1f} ms"
            if last is not None:
                before, after = steps[:last + 1], steps[last + 1:]
                line += (f"  | all handed off at iteration {last + 1}: step {sum(before) / len(before) * 1e6:.0f} us "
                         f"before, {sum(after) / max(len(after), 1) * 1e6:.0f} us after")
            else:
                line += f"  | step {sum(steps) / len(steps) * 1e6:.0f} us"
            print(line, flush=True)


if __name__ == "__main__":
    main()
