"""Classical solvers that run on torch_l2o's optimizers: baselines for the benchmarks.

They live here, not on the problems, so that :mod:`torch_l2o.problems` never imports
:mod:`torch_l2o.optim`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .optim import FISTA
from .problems import MatrixCompletionProblem

__all__ = ["soft_impute"]


@torch.no_grad()
def soft_impute(problem: MatrixCompletionProblem, tau: float, iters: int = 300) -> Tensor:
    """Nuclear-norm completion ``min 1/2 |P_Omega(R - X)|^2 + tau |X|_*`` by FISTA with the
    registry's ``nuclear`` prox (step 1: the masked loss is 1-smooth); returns ``X``."""
    X = torch.zeros_like(problem.R, requires_grad=True)
    opt = FISTA([X], prox="nuclear", lam=tau, lr=1.0)
    for _ in range(iters):
        with torch.enable_grad():
            opt.zero_grad()
            (0.5 * (problem.mask * (problem.R - X)).square().sum()).backward()
        opt.step()
    return opt.solution(X)
