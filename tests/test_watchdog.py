"""The watchdog: without a closure, a learned step that diverges or stalls is caught per
instance, warned about once, and replaced by FISTA-restart steps from the best point."""

import copy
import warnings

import pytest
import torch

import torch_l2o
from torch_l2o.problems import Lasso, LassoProblem, mean_relative_error, reference_solve

LAM = 0.1


def _bad_weights():
    """PA heads with p ~ 2 (step 2/L) and a ~ 1.9: the learned step diverges."""
    sd = torch_l2o.nets.PANet().state_dict()
    for k in ("heads.p.weight", "heads.a.weight"):
        sd[k] = torch.zeros_like(sd[k])
    sd["heads.p.bias"] = torch.full_like(sd["heads.p.bias"], 10.0)
    sd["heads.a.bias"] = torch.full_like(sd["heads.a.bias"], 3.0)
    return sd


def _steps(opt, x, prob, n):
    for _ in range(n):
        opt.zero_grad()
        prob.smooth(x).sum().backward()
        opt.step()


def test_in_distribution_the_watchdog_changes_nothing():
    prob = Lasso().sample(8, generator=torch.Generator().manual_seed(3))
    runs = []
    for wd in (True, False):
        x = prob.x0().requires_grad_(True)
        opt = torch_l2o.PAMR([x], prox="l1", lam=LAM, lr=prob.step_size(), watchdog=wd)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _steps(opt, x, prob, 120)
        runs.append(opt.solution(x))
        if wd:
            assert not bool(opt.state[x]["watchdog"].any())
    assert torch.equal(*runs)


def test_after_a_divergence_the_instance_runs_fista_restart_from_its_best_point():
    prob = Lasso(m=20, n=40, sparsity=4).sample(1, generator=torch.Generator().manual_seed(0))
    s = prob.step_size()
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=LAM, lr=s, weights=_bad_weights(), instance_dims=1)
    calls = []
    hook = opt._net_on(x.device).register_forward_hook(lambda *a: calls.append(1))
    with pytest.warns(RuntimeWarning, match="diverged or stalled on 1 instance"):
        _steps(opt, x, prob, 1)
        while not bool(opt.state[x]["watchdog"].all()):
            _steps(opt, x, prob, 1)
    assert calls  # the learned step ran until the instance fell back
    calls.clear()
    best = opt.state[x]["wd_best"]
    assert torch.equal(x.detach(), best) and torch.equal(opt.solution(x), best)  # restarted at its best point
    z = best.clone().requires_grad_(True)
    fista = torch_l2o.FISTA([z], prox="l1", lam=LAM, lr=s, restart=True)
    for _ in range(40):
        _steps(opt, x, prob, 1)
        _steps(fista, z, prob, 1)
        assert torch.allclose(opt.solution(x), fista.solution(z), rtol=1e-6, atol=1e-7)
        assert torch.allclose(x, z, rtol=1e-6, atol=1e-7)
    hook.remove()
    assert calls == []  # every instance fell back: the network is no longer run


@pytest.mark.parametrize("case,cls", [("lam / 5", torch_l2o.PA), ("Gaussian A and b", torch_l2o.PAMR)])
def test_the_issue_cases_converge_without_a_closure_or_warn(case, cls):
    """Out of the weights' family (lam 0.02 instead of 0.1; b not from a sparse x) the
    unguarded learned optimizer diverges or stalls; with the watchdog it warns once and,
    in twice FISTA-restart's iterations, is at least as accurate."""
    g = torch.Generator().manual_seed(1)
    if case == "lam / 5":
        base = Lasso().sample(8, generator=g, dtype=torch.float64)
        p64 = LassoProblem(A=base.A, b=base.b, prox="l1", prox_params={"lam": 0.02})
    else:
        A = torch.randn(8, 50, 100, generator=g, dtype=torch.float64)
        p64 = LassoProblem(A=A, b=torch.randn(8, 50, generator=g, dtype=torch.float64), prox="l1",
                           prox_params={"lam": 0.1})
    F_star = reference_solve(p64).F
    prob = p64.to(torch.float32)
    lam, s = p64.prox_params["lam"], prob.step_size()

    def error(opt, x):
        return float(mean_relative_error(p64.objective(opt.solution(x).double()), F_star))

    x = prob.x0().requires_grad_(True)
    fista = torch_l2o.FISTA([x], prox="l1", lam=lam, lr=s, restart=True)
    _steps(fista, x, prob, 300)
    reference = error(fista, x)
    errs = {}
    for wd in (False, True):
        x = prob.x0().requires_grad_(True)
        opt = cls([x], prox="l1", lam=lam, lr=s, instance_dims=1, watchdog=wd)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _steps(opt, x, prob, 600)
        errs[wd] = error(opt, x)
        ours = [w for w in caught if "diverged or stalled" in str(w.message)]
        assert len(ours) == int(wd)  # once
        assert all(w.filename == __file__ for w in ours)  # at the caller's opt.step(), not in a library
    assert not errs[False] < 100 * reference  # unguarded: far behind (or NaN)
    assert errs[True] <= reference


def test_state_dict_round_trip_during_a_fallback():
    prob = Lasso(m=20, n=40, sparsity=4).sample(3, generator=torch.Generator().manual_seed(2))
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=LAM, lr=prob.step_size(), weights=_bad_weights(), instance_dims=1)
    with pytest.warns(RuntimeWarning):
        _steps(opt, x, prob, 25)
    assert bool(opt.state[x]["watchdog"].any())
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = torch_l2o.PA([x2], prox="l1", lam=LAM, lr=prob.step_size(), weights=_bad_weights(), instance_dims=1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _steps(opt, x, prob, 10)
    _steps(opt2, x2, prob, 10)
    assert torch.equal(x, x2) and torch.equal(opt.solution(x), opt2.solution(x2))


def test_learned_optimizers_need_the_strength_too():
    x = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="prox 'l1' needs its strength: pass lam="):
        torch_l2o.PAMR([x], prox="l1", lr=0.1, weights="untrained")
    with pytest.raises(ValueError, match="prox 'l1' needs its strength"):
        torch_l2o.GSO([{"params": [x], "prox": "l1"}], blocks=1, weights="untrained")
    torch_l2o.PAMR([x], prox="nonneg", lr=0.1, weights="untrained")  # no strength to give


# ----------------------------------------------------------------- L2O-DM and RNNProp
# No prox-gradient map and no step size: the watchdog watches the gradient norm and only reports.


def _feed(opt, x, scales, seed=0):
    """Steps with gradients of per-instance norm ~ scales[k] (one row per step)."""
    gen = torch.Generator().manual_seed(seed)
    for row in scales:
        x.grad = torch.randn(x.shape, generator=gen) * torch.tensor(row).reshape(-1, 1)
        opt.step()


@pytest.mark.parametrize("cls", [torch_l2o.L2ODM, torch_l2o.RNNProp])
def test_a_gradient_jump_is_reported_once_and_changes_no_step(cls):
    # instance 0 jumps 1000x above its running minimum at step 4, instance 2 only 10x,
    # instance 1 jumps 1000x at step 6 (after the warning: marked, not warned again)
    scales = [(1.0, 1.0, 1.0), (0.1, 0.1, 0.1), (1e-2, 1e-2, 1e-2), (1e-3, 1e-3, 1e-3),
              (1.0, 1e-3, 1e-2), (1.0, 1e-3, 1e-2), (1.0, 1.0, 1e-2)]
    runs = {}
    for wd in (True, False):
        x = torch.zeros(3, 40, requires_grad=True)
        opt = cls([x], weights="untrained", instance_dims=1, watchdog=wd)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _feed(opt, x, scales[:5])
            mask_at_jump = opt.state[x]["watchdog"].clone() if wd else None
            _feed(opt, x, scales[5:], seed=1)
        ours = [w for w in caught if "jumped above 100x" in str(w.message)]
        runs[wd] = x.detach().clone()
        if wd:
            assert len(ours) == 1 and "at step 4" in str(ours[0].message) and "1 instance(s)" in str(ours[0].message)
            assert ours[0].filename == __file__  # points at the caller's opt.step()
            assert mask_at_jump.tolist() == [True, False, False]
            assert opt.state[x]["watchdog"].tolist() == [True, True, False]
        else:
            assert not ours and "watchdog" not in opt.state[x]
    assert torch.equal(runs[True], runs[False])  # it reports; the learned step is the same


def test_the_gradient_watch_ignores_noise_below_its_floor_and_survives_a_state_dict_round_trip():
    x = torch.zeros(2, 30, requires_grad=True)
    opt = torch_l2o.L2ODM([x], weights="untrained", instance_dims=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # converged to 1e-6 of the start, then float noise 50x above that: under the floor (1e-4 G_0 x 100)
        _feed(opt, x, [(1.0, 1.0), (1e-6, 1e-6), (5e-5, 5e-5), (1e-6, 1e-6)])
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = torch_l2o.L2ODM([x2], weights="untrained", instance_dims=1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, p in ((opt, x), (opt2, x2)):
        with pytest.warns(RuntimeWarning, match="at step 4 the gradient norm of 2 instance"):
            _feed(o, p, [(1.0, 1.0)], seed=3)  # 1e6x its minimum, from a restored record too
    assert torch.equal(x, x2) and opt2.state[x2]["watchdog"].all()


# ----------------------------------------------------------------- the handoff
# An instance whose prox-gradient residual reached handoff * G_0 leaves the learned step for
# FISTA-restart steps from where it is: the learned step gains early, FISTA-restart's tail is faster.


def test_a_handed_off_instance_continues_as_fista_restart_from_where_it_is():
    """The step that hands off is FISTA-restart's from the learned state (y_k, x_k) with
    t = 1, and every later step is FISTA-restart's: equal to ``torch_l2o.FISTA`` started
    there. No warning (a handoff is not a failure), the network no longer runs."""
    prob = Lasso(m=50, n=100, sparsity=10).sample(1, generator=torch.Generator().manual_seed(0))
    s = prob.step_size()
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.PAGRU([x], prox="l1", lam=LAM, lr=s, weights="lasso-mix", instance_dims=1, handoff=1e-2)
    calls = []
    hook = opt._net_on(x.device).register_forward_hook(lambda *a: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(200):
            y_k, x_k = x.detach().clone(), opt.solution(x).clone()
            _steps(opt, x, prob, 1)
            if bool(opt.state[x]["handoff"].any()):
                break
        # learned steps first (the network ran at each); the handing-off step already skips it
        assert 5 < k < 200 and len(calls) == k
        assert not bool(opt.state[x]["watchdog"].any())
        z = y_k.clone().requires_grad_(True)
        fista = torch_l2o.FISTA([z], prox="l1", lam=LAM, lr=s, restart=True, instance_dims=1)
        fista.state[z].update(x=x_k, t=torch.ones(1, dtype=torch.float64))
        _steps(fista, z, prob, 1)
        assert torch.equal(x, z) and torch.equal(opt.solution(x), fista.solution(z))
        for _ in range(40):  # the same in-place FISTA-restart update: the same bits
            _steps(opt, x, prob, 1)
            _steps(fista, z, prob, 1)
            assert torch.equal(x, z) and torch.equal(opt.solution(x), fista.solution(z))
    hook.remove()
    assert len(calls) == k  # handed off: the network is no longer run


def test_an_instance_handed_off_beside_learned_ones_runs_fista_restart():
    """In a batch, the first instance to hand off takes FISTA-restart steps (the fallback's
    out-of-place path, while the others still take learned steps, then the in-place one)
    equal to ``torch_l2o.FISTA`` on that instance alone from its state at the handoff."""
    prob = Lasso(m=50, n=100, sparsity=10).sample(3, generator=torch.Generator().manual_seed(0))
    s = prob.step_size()
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.PAGRU([x], prox="l1", lam=LAM, lr=s, weights="lasso-mix", instance_dims=1, handoff=1e-2)
    for k in range(200):
        y_k, x_k = x.detach().clone(), opt.solution(x).clone()
        _steps(opt, x, prob, 1)
        if bool(opt.state[x]["handoff"].any()):
            break
    off = opt.state[x]["handoff"]
    assert not bool(off.all())  # the others go on learning
    i = int(off.nonzero()[0])
    one = prob[i:i + 1]
    z = y_k[i:i + 1].clone().requires_grad_(True)
    fista = torch_l2o.FISTA([z], prox="l1", lam=LAM, lr=s[i:i + 1], restart=True, instance_dims=1)
    fista.state[z].update(x=x_k[i:i + 1].clone(), t=torch.ones(1, dtype=torch.float64))
    _steps(fista, z, one, 1)
    mixed = 0
    for _ in range(40):
        assert torch.allclose(opt.solution(x)[i:i + 1], fista.solution(z), rtol=1e-5, atol=1e-6)
        mixed += not bool(opt.state[x]["handoff"].all())
        _steps(opt, x, prob, 1)
        _steps(fista, z, one, 1)
    assert mixed > 0


def test_mathgd_hands_off_to_ista():
    """An architecture without a separate prox iterate hands off to ISTA steps from y_k."""
    prob = Lasso(m=30, n=60, sparsity=6).sample(1, generator=torch.Generator().manual_seed(4))
    s = prob.step_size()
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.MathGD([x], prox="l1", lam=LAM, lr=s, weights="untrained", instance_dims=1, handoff=0.3)
    for _ in range(100):
        _steps(opt, x, prob, 1)
        if bool(opt.state[x]["handoff"].all()):
            break
    assert bool(opt.state[x]["handoff"].all())
    z = x.detach().clone().requires_grad_(True)
    ista = torch_l2o.ISTA([z], prox="l1", lam=LAM, lr=s, instance_dims=1)
    for _ in range(10):
        _steps(opt, x, prob, 1)
        _steps(ista, z, prob, 1)
        assert torch.allclose(x, z, rtol=1e-6, atol=1e-7)


def test_the_handoff_fires_per_instance_at_its_threshold():
    """Instances hand off one by one, each at the first step where G <= handoff * G_0
    (G the residual the watchdog records); a smaller threshold hands off later."""
    from torch_l2o.kernels.reference import prox_point_reference

    prob = Lasso(m=40, n=80, sparsity=8).sample(4, generator=torch.Generator().manual_seed(1))
    s = prob.step_size()
    first = {}
    for h in (1e-2, 1e-3):
        x = prob.x0().requires_grad_(True)
        opt = torch_l2o.PAMR([x], prox="l1", lam=LAM, lr=s, weights="lasso-mix", instance_dims=1, handoff=h)
        G0, when = None, torch.full((4,), -1)
        for k in range(400):
            opt.zero_grad()
            prob.smooth(x).sum().backward()
            T = prox_point_reference(x.detach(), x.grad, s, 1.0, "l1", {"lam": LAM})
            G = ((T - x.detach()).double().norm(dim=1) / s.reshape(-1).double())
            G0 = G if G0 is None else G0
            before = opt.state[x].get("handoff", torch.zeros(4, dtype=torch.bool)).clone()
            opt.step()
            now = opt.state[x]["handoff"] & ~before
            assert torch.equal(now, (G <= h * G0) & ~before)
            when[now] = k
            if bool(opt.state[x]["handoff"].all()):
                break
        assert bool((when > 0).all()) and len(set(when.tolist())) > 1  # per instance, not all at once
        first[h] = when
    assert bool((first[1e-3] >= first[1e-2]).all())


def test_handoff_options_are_checked_and_read_from_the_card():
    x = torch.zeros(2, 10, requires_grad=True)
    opt = torch_l2o.PAGRU([x], prox="l1", lam=LAM, lr=0.1, weights="lasso-mix", instance_dims=1)
    calibrated = opt.weights_info["card"].get("handoff")
    assert calibrated is not None and 0 < calibrated < 1  # the mixture weights' card records one
    assert opt.param_groups[0]["handoff"] == calibrated
    assert torch_l2o.PAGRU([x], prox="l1", lam=LAM, lr=0.1, instance_dims=1).param_groups[0]["handoff"] is None
    for kw in (dict(watchdog=False), dict(safeguard=True), dict(handoff=None)):
        opt = torch_l2o.PAGRU([x], prox="l1", lam=LAM, lr=0.1, weights="lasso-mix", instance_dims=1, **kw)
        assert opt.param_groups[0]["handoff"] is None  # the card's value needs the watchdog
    for bad in (0, 1, -0.5, 2.0, True, "soon"):
        with pytest.raises(ValueError, match="handoff must be a number in"):
            torch_l2o.PAGRU([x], prox="l1", lam=LAM, lr=0.1, weights="lasso-mix", handoff=bad)
    for kw in (dict(watchdog=False), dict(safeguard=True)):
        with pytest.raises(ValueError, match="handoff=0.01 needs the watchdog"):
            torch_l2o.PAGRU([x], prox="l1", lam=LAM, lr=0.1, handoff=1e-2, **kw)


def test_state_dict_round_trip_after_a_handoff():
    prob = Lasso(m=40, n=80, sparsity=8).sample(4, generator=torch.Generator().manual_seed(5))
    s = prob.step_size()
    x = prob.x0().requires_grad_(True)

    def make(p):
        return torch_l2o.PAGRU([p], prox="l1", lam=LAM, lr=s, weights="lasso-mix", instance_dims=1, handoff=1e-2)

    opt = make(x)
    _steps(opt, x, prob, 1)
    while not bool(opt.state[x]["handoff"].any()):
        _steps(opt, x, prob, 1)
    assert not bool(opt.state[x]["handoff"].all())  # some handed off, some still learned
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = make(x2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["handoff"] == 1e-2
    _steps(opt, x, prob, 15)
    _steps(opt2, x2, prob, 15)
    assert torch.equal(x, x2) and torch.equal(opt.solution(x), opt2.solution(x2))
    assert torch.equal(opt.state[x]["handoff"], opt2.state[x2]["handoff"])


def test_a_state_saved_before_the_handoff_existed_loads_and_takes_this_optimizers_threshold():
    prob = Lasso(m=40, n=80, sparsity=8).sample(2, generator=torch.Generator().manual_seed(6))
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.PAGRU([x], prox="l1", lam=LAM, lr=prob.step_size(), weights="lasso-mix", instance_dims=1)
    _steps(opt, x, prob, 3)
    old = copy.deepcopy(opt.state_dict())
    for st in old["state"].values():
        st.pop("handoff")
    for g in old["param_groups"]:
        g.pop("handoff")
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = torch_l2o.PAGRU([x2], prox="l1", lam=LAM, lr=prob.step_size(), weights="lasso-mix", instance_dims=1)
    opt2.load_state_dict(old)
    assert opt2.param_groups[0]["handoff"] == opt2.weights_info["card"]["handoff"]
    _steps(opt, x, prob, 60)
    _steps(opt2, x2, prob, 60)
    assert torch.equal(x, x2) and torch.equal(opt.state[x]["handoff"], opt2.state[x2]["handoff"])
    assert bool(opt2.state[x2]["handoff"].any())
