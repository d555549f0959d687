"""The training mixtures (issue 16): LASSO and L1 logistic instances from broad families."""

import math

import pytest
import torch

from torch_l2o.problems import LassoMixture, LogisticMixture, reference_solve
from torch_l2o.problems.mixture import DESIGNS, LOGISTIC_DESIGNS


def test_mixture_is_deterministic_and_sets_lam_relative_to_lam_max():
    fam = LassoMixture()
    p1 = fam.sample(16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    p2 = fam.sample(16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(p1.A, p2.A) and torch.equal(p1.b, p2.b)
    m, n = p1.A.shape[1:]
    assert (m, n) in fam.shapes
    ratio = p1.prox_params["lam"] / torch.einsum("bmn,bm->bn", p1.A, p1.b).abs().amax(-1)
    assert ratio.min() >= fam.lam_ratio[0] * (1 - 1e-9) and ratio.max() <= fam.lam_ratio[1] * (1 + 1e-9)
    assert ratio.max() / ratio.min() > 2  # drawn per instance
    # instances with a code: b is A x* up to the drawn noise
    code = ~torch.isnan(p1.x_true[:, 0])
    r = (torch.einsum("bmn,bn->bm", p1.A[code], p1.x_true[code]) - p1.b[code]).norm(dim=-1) / p1.b[code].norm(dim=-1)
    assert r.max() < 0.5


@pytest.mark.parametrize("design", DESIGNS)
def test_mixture_designs(design):
    fam = LassoMixture(shapes=((81, 120),), designs=(design,))
    p = fam.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    norms = torch.linalg.vector_norm(p.A, dim=1)
    if design in ("gaussian", "factor", "dictionary"):
        torch.testing.assert_close(norms, torch.ones_like(norms))
    else:
        assert norms.max() / norms.min() > 10  # unstandardised columns
    if design == "dictionary":
        assert torch.isnan(p.x_true).all() and torch.equal(p.A[0], p.A[1])  # one dictionary, image patches as b
    if design == "factor":  # shared factors: a few large eigenvalues (a Gaussian 81 x 120 design has L ~ 4.7)
        assert p.lipschitz.min() > 2 * 4.95
    sol = reference_solve(p)
    assert torch.isfinite(sol.F).all() and float(sol.kkt.max()) < 1e-6


def test_mixture_checks_its_settings():
    with pytest.raises(ValueError, match="unknown designs"):
        LassoMixture(designs=("toeplitz",))
    with pytest.raises(ValueError, match="m a square"):
        LassoMixture(shapes=((80, 100),))
    assert math.isqrt(81) ** 2 == 81


@pytest.mark.parametrize("design", LOGISTIC_DESIGNS)
def test_logistic_mixture_designs(design):
    fam = LogisticMixture(shapes=((300, 30),), designs=(design,))
    p = fam.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert p.W.shape == (4, 300, 30) and set(p.y.unique().tolist()) <= {0.0, 1.0}
    if design in ("heavy", "binary"):  # z-scored columns
        torch.testing.assert_close(p.W.std(1), torch.ones(4, 30, dtype=torch.float64))
        torch.testing.assert_close(p.W.mean(1), torch.zeros(4, 30, dtype=torch.float64), atol=1e-12, rtol=0)
    sol = reference_solve(p)
    assert float(sol.kkt.max()) < 1e-8 and (sol.x != 0).any()  # lam below lam_max: a nonzero solution


def test_logistic_mixture_lam_and_positives():
    fam = LogisticMixture()
    p = fam.sample(32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q = fam.sample(32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(p.W, q.W) and p.prox_params == q.prox_params
    N = p.W.shape[1]
    lam_max = torch.einsum("bNn,bN->bn", p.W, p.y - 0.5).abs().amax(-1) / N
    ratio = p.prox_params["lam"] / float(lam_max.median())
    assert fam.lam_ratio[0] * (1 - 1e-9) <= ratio <= fam.lam_ratio[1] * (1 + 1e-9)
    share = p.y.mean(-1)  # the drawn share of positives, to one label
    assert share.min() >= fam.positives[0] - 1 / N and share.max() <= fam.positives[1] + 1 / N
    assert share.max() - share.min() > 0.1
    with pytest.raises(ValueError, match="unknown designs"):
        LogisticMixture(designs=("toeplitz",))
