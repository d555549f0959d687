"""GSO: the alternating schedule, per-block networks and proxes, meta-training."""

import copy

import pytest
import torch

import torch_l2o
from torch_l2o.optim.functional import dm_update
from torch_l2o.problems import GaussianMixture, MatrixCompletion

MC = MatrixCompletion(n=12, rank=2, observe=0.5)
GMM = GaussianMixture(K=3, D=2, G=40)


def _opt(prob, weights="untrained", inner=3, **kw):
    xs = [x.requires_grad_(True) for x in prob.x0()]
    groups = [{"params": [xs[0]]}, {"params": [xs[1]]}]
    if isinstance(prob, type(GMM.sample(1))):
        groups[1].update(prox="simplex", prox_params={"dim": -1})
    return xs, torch_l2o.GSO(groups, inner_steps=inner, weights=weights, **kw)


def _step(opt, prob, xs):
    opt.zero_grad()
    prob.smooth(*xs).sum().backward()
    opt.step()


def test_only_the_active_block_moves_and_blocks_alternate():
    prob = MC.sample(2, generator=torch.Generator().manual_seed(0))
    xs, opt = _opt(prob, inner=3)
    seen = []
    for _ in range(12):
        before = [x.detach().clone() for x in xs]
        b = opt.active_block
        _step(opt, prob, xs)
        moved = [not torch.equal(x, y) for x, y in zip(xs, before)]
        assert moved[b] and not moved[1 - b]
        seen.append(b)
    assert seen == [0, 0, 0, 1, 1, 1] * 2
    assert opt._schedule() == {"round": 2, "block": 0, "inner": 0}


def test_block_step_is_the_shared_update_function():
    prob = MC.sample(2, generator=torch.Generator().manual_seed(1))
    xs, opt = _opt(prob)
    U = xs[0].detach().clone()
    state = opt.net.nets[0].init_state(U.numel())
    Ur = U.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(prob.smooth(Ur, xs[1].detach()).sum(), Ur)
    with torch.no_grad():
        (expect,), _, _ = dm_update(opt.net.nets[0], state, [U], [g], [U])
    _step(opt, prob, xs)
    assert torch.equal(xs[0].detach(), expect)


def test_schedule_survives_state_dict():
    prob = MC.sample(2, generator=torch.Generator().manual_seed(2))
    xs, opt = _opt(prob, inner=4)
    for _ in range(6):  # mid-way through the second block's turn
        _step(opt, prob, xs)
    saved = copy.deepcopy(opt.state_dict())
    xs2 = [x.detach().clone().requires_grad_(True) for x in xs]
    opt2 = torch_l2o.GSO([{"params": [xs2[0]]}, {"params": [xs2[1]]}], inner_steps=4, weights="untrained")
    opt2.load_state_dict(saved)
    assert opt2.active_block == 1 and opt2._schedule()["inner"] == 2
    for _ in range(7):
        _step(opt, prob, xs)
        _step(opt2, prob, xs2)
    assert all(torch.equal(a, b) for a, b in zip(xs, xs2))


def test_simplex_block_stays_on_the_simplex():
    prob = GMM.sample(3, generator=torch.Generator().manual_seed(0))
    xs, opt = _opt(prob, inner=2)
    for _ in range(10):
        _step(opt, prob, xs)
    w = xs[1].detach()
    assert bool((w >= 0).all()) and torch.allclose(w.sum(-1), torch.ones(3), atol=1e-6)


def test_group_count_must_match_networks():
    prob = MC.sample(1, generator=torch.Generator().manual_seed(0))
    xs = [x.requires_grad_(True) for x in prob.x0()]
    sd = torch_l2o.nets.GSONet(blocks=3).state_dict()
    with pytest.raises(ValueError, match="do not fit a GSO network"):
        torch_l2o.GSO([{"params": [xs[0]]}, {"params": [xs[1]]}], weights=sd)
    opt = torch_l2o.GSO([{"params": [xs[0]]}, {"params": [xs[1]]}], weights="untrained")
    with pytest.raises(RuntimeError, match="blocks are fixed"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    with pytest.raises(ValueError, match="inner_steps"):
        torch_l2o.GSO([{"params": [xs[0]]}, {"params": [xs[1]]}], inner_steps=0, weights="untrained")


@pytest.mark.parametrize("family", [MC, GMM], ids=["mc", "gmm"])
def test_meta_train_gso_repeats_and_trains(family):
    kw = dict(steps=3, batch=3, horizon=4, unroll=2, inner_steps=2, val_every=3, val_batch=3, progress=False, seed=5)
    w1, h1 = torch_l2o.meta_train("gso", family, **kw)
    w2, h2 = torch_l2o.meta_train("gso", family, **kw)
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and h1.loss == h2.loss
    assert h1.skipped == 0 and len(h1.val_score) == 2


def test_arch_and_family_must_agree():
    """A base step 1/L needs a family that gives L; GSO with one block trains on a
    single-block family (L2O-DM with the prox) through the same unroll."""
    with pytest.raises(ValueError, match="lr is the base step 1/L, which a multi-block family does not give"):
        torch_l2o.meta_train("pa", MC, steps=1)
    w, h = torch_l2o.meta_train("gso", torch_l2o.problems.Lasso(m=5, n=8, sparsity=2), steps=2, batch=2, horizon=4,
                                unroll=2, inner_steps=1, val_every=2, val_batch=2, progress=False)
    assert torch_l2o.nets.GSONet(blocks=1).state_dict().keys() == w.keys() and h.skipped == 0


def test_matrix_completion_family():
    prob = MatrixCompletion(n=20, rank=3, observe=0.3).sample(4, generator=torch.Generator().manual_seed(0),
                                                            dtype=torch.float64)
    assert torch.linalg.matrix_rank(prob.R).tolist() == [3] * 4
    assert abs(float(prob.mask.mean()) - 0.3) < 0.05
    U, V = prob.x0()
    # the analytic gradient of F in U: -(P(R - U V^T)) V + lam U
    Ur = U.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(prob.smooth(Ur, V).sum(), Ur)
    expect = -(prob.mask * (prob.R - U @ V.transpose(1, 2))) @ V + prob.lam * U
    assert torch.allclose(g, expect)
    assert torch.allclose(prob.metric(*[torch.zeros_like(U), V]), torch.ones(4, dtype=torch.float64))


def test_gaussian_mixture_family():
    prob = GMM.sample(2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    M, w = prob.x0()
    # the negative log-likelihood of an isotropic unit-variance mixture, written out
    X = prob.X
    d2 = ((X.unsqueeze(2) - M.unsqueeze(1)) ** 2).sum(-1)
    dens = (w.unsqueeze(1) * torch.exp(-0.5 * d2) / (2 * torch.pi)).sum(-1)
    assert torch.allclose(prob.smooth(M, w), -torch.log(dens).mean(-1))
    # a weight at exactly zero keeps the gradient finite
    w0 = torch.tensor([[1.0, 0.0, 0.0]] * 2, dtype=torch.float64, requires_grad=True)
    (gw,) = torch.autograd.grad(prob.smooth(M, w0).sum(), w0)
    assert bool(torch.isfinite(gw).all())


def test_shipped_gmm_weights_reach_em_in_its_training_setting():
    """The shipped ``gso-gmm`` weights, on fresh 2-D mixtures (K 4, G 500), reach EM's
    negative log-likelihood (covariances fixed, EM run to convergence) within 20 rounds,
    and the mixture weights stay on the simplex. The problem is non-convex, so single
    instances may end in another local minimum than EM's (better or worse): the test is on
    the mean, and that GSO does not lose to EM on most instances."""
    prob64 = GaussianMixture().sample(8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    M, w, _ = prob64.em()
    em = prob64.smooth(M, w)
    prob = prob64.to(torch.float32)
    xs, opt = _opt(prob, weights="gmm", inner=10)
    for _ in range(20 * 2 * 10):
        _step(opt, prob, xs)
    nll = prob64.smooth(*[x.detach().double() for x in xs])
    start = prob64.smooth(*prob64.x0())
    assert float((start - nll).mean()) >= 0.98 * float((start - em).mean()), (nll, em)
    assert int((nll <= em + 1e-2).sum()) >= 6, (nll, em)
    assert bool((xs[1] >= 0).all()) and torch.allclose(xs[1].sum(-1), torch.ones(8), atol=1e-5)


def test_shipped_mc_weights_complete_most_matrices_in_their_training_setting():
    """The shipped ``gso-mc`` weights on fresh rank-5 100 x 100 matrices, 20% observed, 100
    rounds: every objective falls by more than 95% and at least half the matrices are
    recovered (RMSE < 0.1; untrained weights recover none). Some instances end in a bad
    local minimum (20 of 32 recovered on the card's set; its mean RMSE, 0.52, is made of
    the rest), so the test does not ask for every one."""
    prob = MatrixCompletion().sample(4, generator=torch.Generator().manual_seed(7))
    start = prob.smooth(*prob.x0())
    xs, opt = _opt(prob, weights="mc", inner=10)
    for _ in range(100 * 2 * 10):
        _step(opt, prob, xs)
    with torch.no_grad():
        assert bool((prob.smooth(*xs) < 0.05 * start).all())
        assert int((prob.metric(*xs) < 0.1).sum()) >= 2, prob.metric(*xs)
