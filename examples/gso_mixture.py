"""Fit the means and weights of a Gaussian mixture with the learned alternating optimizer
GSO (shipped weights "gmm"), in an ordinary PyTorch loop, and compare with EM.

    python examples/gso_mixture.py
"""

import math

import torch

import torch_l2o
from torch_l2o.problems import GaussianMixtureProblem

K, sigma = 4, 1.0
g = torch.Generator().manual_seed(0)
centers = 16 * torch.rand(K, 2, generator=g) - 8                       # 500 points in K blobs
X = centers[torch.randint(K, (500,), generator=g)] + sigma * torch.randn(500, 2, generator=g)


def nll(M, w):
    """Mean negative log-likelihood, covariances fixed at sigma^2 I."""
    logp = -0.5 * torch.cdist(X, M).square() / sigma**2 - math.log(2 * math.pi * sigma**2)
    return -torch.logsumexp(torch.log(w.clamp_min(1e-30)) + logp, dim=-1).mean()


M0 = X[torch.randperm(len(X), generator=g)[:K]].clone()    # means at K random samples
w0 = torch.full((K,), 1.0 / K)

# Two blocks: the means (no prox) and the weights, kept on the simplex by their prox.
M, w = M0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
opt = torch_l2o.GSO([{"params": [M]}, {"params": [w], "prox": "simplex", "prox_params": {"dim": -1}}],
                    inner_steps=10, weights="gmm")
for t in range(50 * 2 * 10):                                 # 50 rounds of 10 steps per block
    opt.zero_grad()
    nll(M, w).backward()
    opt.step()

# EM with the same fixed covariances, from the same start (the library's, batched: one instance).
Me, we, _ = GaussianMixtureProblem(X=X[None], M0=M0[None], w0=w0[None], sigma=sigma).em()
Me, we = Me[0], we[0]

with torch.no_grad():
    print(f"start NLL {nll(M0, w0):.4f}   GSO {nll(M, w):.4f}   EM {nll(Me, we):.4f}")
    print("GSO weights", [round(v, 3) for v in w.tolist()], "sum", round(float(w.sum()), 6))
