"""The out-of-distribution problem constructors (torch_l2o.problems.ood) behind the
``ood`` benchmark suite: valid problems, and different from the shipped weights' families."""

import math

import pytest
import torch

from torch_l2o.problems import Lasso, LassoProblem, LogisticL1, LogisticProblem
from torch_l2o.problems.ood import (KnownLLassoProblem, correlated_lasso, correlated_logistic, dictionary_lasso,
                                    gaussian_lasso, imbalanced_logistic, lanczos_lipschitz, large_lasso,
                                    regression_lasso)

D = torch.float64
TRAIN_LASSO, TRAIN_LOGISTIC = Lasso(), LogisticL1()


def _valid(prob, batch, shape):
    data = prob.A if isinstance(prob, LassoProblem) else prob.W
    assert data.shape == (batch, *shape) and prob.batch == batch and prob.dim == shape[1]
    assert prob.dtype == D and prob.prox == "l1" and prob.prox_params["lam"] > 0
    L = prob.lipschitz
    assert L.shape == (batch,) and bool((L > 0).all()) and bool(torch.isfinite(L).all())
    x0 = prob.x0()
    assert x0.shape == (batch, shape[1])
    F0 = prob.objective(x0)
    assert F0.shape == (batch,) and bool(torch.isfinite(F0).all()) and bool((F0 > 0).all())
    g = prob.grad(x0)
    assert g.shape == x0.shape and bool(torch.isfinite(g).all())
    # lam below lam_max somewhere: the minimiser is not 0 (the set is not trivial)
    assert float(g.abs().amax(-1).max()) > prob.prox_params["lam"]
    assert prob.to(torch.float32).step_size().shape == (batch, 1)


def _gram_top(M):
    """Largest eigenvalue of ``M^T M`` per instance, exactly (dense)."""
    return torch.linalg.eigvalsh(M.mT @ M)[..., -1]


def test_correlated_lasso():
    p = correlated_lasso(3, m=60, n=120, sparsity=12, seed=1)
    _valid(p, 3, (60, 120))
    assert torch.allclose(p.A.norm(dim=1), torch.ones(3, 120, dtype=D))  # unit-norm columns, like training
    # the design differs: neighbouring columns correlate about rho = 0.8 (training: about 0)
    c = (p.A[:, :, :-1] * p.A[:, :, 1:]).sum(1).mean()
    assert 0.6 < float(c) < 0.95
    t = TRAIN_LASSO.sample(3, generator=torch.Generator().manual_seed(1), dtype=D)
    assert abs(float((t.A[:, :, :-1] * t.A[:, :, 1:]).sum(1).mean())) < 0.05
    assert torch.allclose(p.b, torch.einsum("bmn,bn->bm", p.A, p.x_true))


def test_gaussian_lasso_b_is_not_a_sparse_code():
    p = gaussian_lasso(4, seed=2)
    _valid(p, 4, (50, 100))
    assert p.x_true is None and (50, 100) != (TRAIN_LASSO.m, TRAIN_LASSO.n)
    assert not torch.allclose(p.A.norm(dim=1), torch.ones(4, 100, dtype=D), atol=0.1)  # columns not normalised
    # b is not in the span of few columns: the LASSO residual is large
    assert float(p.b.norm(dim=-1).min()) > 3


def test_large_lasso_lanczos_lipschitz_is_an_upper_bound_on_the_exact_one():
    p = large_lasso(2, m=100, n=200, seed=3)
    _valid(p, 2, (100, 200))
    assert isinstance(p, KnownLLassoProblem) and ((p.x_true != 0).sum(-1) == 20).all()
    exact = _gram_top(p.A.mT)  # A A^T
    assert bool((p.lipschitz >= exact).all()) and torch.allclose(p.lipschitz, exact, rtol=1e-7)
    # the stored L follows slicing and casting
    assert torch.equal(p[1:].lipschitz, p.lipschitz[1:])
    assert p.to(torch.float32).lipschitz.dtype == torch.float32
    tall = torch.randn(1, 30, 10, generator=torch.Generator().manual_seed(0), dtype=D)
    assert torch.allclose(lanczos_lipschitz(tall), _gram_top(tall), rtol=1e-7)


def test_dictionary_lasso():
    p = dictionary_lasso(6, atoms=32, seed=4, epochs=1)  # small and short: fast
    _valid(p, 6, (64, 32))
    assert torch.allclose(p.A.norm(dim=1), torch.ones(6, 32, dtype=D))  # unit-norm atoms
    assert torch.equal(p.A[0], p.A[5])  # one dictionary shared by every digit
    assert torch.allclose(p.b.mean(-1), torch.zeros(6, dtype=D), atol=1e-12)  # mean-removed digits
    assert float((p.b[0] - p.b[1]).norm()) > 0.1  # the digits differ from one another
    # the same seed gives the same dictionary and digits, whatever the number of digits
    q = dictionary_lasso(3, atoms=32, seed=4, epochs=1)
    assert torch.equal(p.A[0], q.A[0]) and torch.equal(p.b[:3], q.b)
    with pytest.raises(ValueError):
        dictionary_lasso(513)


def test_regression_lasso():
    p = regression_lasso("diabetes", lam_ratio=0.05)
    _valid(p, 1, (442, 10))
    assert torch.allclose(p.A.std(1, unbiased=False), torch.ones(1, 10, dtype=D))  # z-scored, not unit norm
    lam_max = float(torch.einsum("bmn,bm->bn", p.A, p.b).abs().max())
    assert math.isclose(p.prox_params["lam"], 0.05 * lam_max)
    assert p.prox_params["lam"] != TRAIN_LASSO.lam
    with pytest.raises(ValueError):
        regression_lasso("boston")


def test_imbalanced_logistic():
    p = imbalanced_logistic(3, N=400, n=20, sparsity=5, seed=5)
    _valid(p, 3, (400, 20))
    assert isinstance(p, LogisticProblem) and torch.equal(p.W[:, :, -1], torch.ones(3, 400, dtype=D))
    frac = p.y.mean(-1)
    assert bool(((frac > 0.08) & (frac < 0.12)).all())  # about 10 % positives (training: about 50 %)
    t = TRAIN_LOGISTIC.sample(2, generator=torch.Generator().manual_seed(5), dtype=D)
    assert bool(((t.y.mean(-1) - 0.5).abs() < 0.1).all())
    assert p.prox_params["lam"] != TRAIN_LOGISTIC.lam


def test_correlated_logistic():
    p = correlated_logistic(3, N=500, n=20, sparsity=5, seed=6)
    _valid(p, 3, (500, 20))
    c = torch.corrcoef(p.W[0].T)
    assert 0.7 < float(c.diagonal(1).mean()) < 0.9 and float(c.diagonal(10).abs().mean()) < 0.2
    assert torch.equal(p.y, (torch.einsum("bNn,bn->bN", p.W, p.x_true) >= 0).to(D))


def test_same_seed_same_problem_other_seed_other():
    a, b, c = (correlated_lasso(2, m=20, n=40, sparsity=4, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.A, b.A) and torch.equal(a.b, b.b) and not torch.equal(a.A, c.A)
