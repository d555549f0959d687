"""Safeguarded learned steps: never behind FISTA-restart's model, at the learned speed in
distribution, counted fallbacks."""

import copy
import math

import pytest
import torch

import torch_l2o
from torch_l2o.nets import PANet
from torch_l2o.problems import Lasso, LassoProblem, LogisticL1, mean_relative_error, reference_solve

D = torch.float64


def _heads(p_bias, a_bias):
    """PA weights whose heads output constants p = 2 sigmoid(p_bias), a = 2 sigmoid(a_bias)."""
    sd = PANet().state_dict()
    for k in list(sd):
        if k.startswith("heads.p") or k.startswith("heads.a"):
            sd[k] = torch.zeros_like(sd[k])
    sd["heads.p.bias"] += p_bias
    sd["heads.a.bias"] += a_bias
    return sd


@pytest.fixture(scope="module")
def prob():
    p = Lasso(m=40, n=80, sparsity=8).sample(6, generator=torch.Generator().manual_seed(0), dtype=D)
    return p, reference_solve(p).F


def _closure(opt, x, prob):
    def closure():
        opt.zero_grad()
        f = prob.smooth(x)
        f.sum().backward()
        return f
    return closure


class _FistaRestart:
    """FISTA-restart run alone (``torch_l2o.FISTA(restart=True)``) from the problem's start,
    with the model value ``Q_s(x_k; y_{k-1})`` and its gap ``|x_k - y_{k-1}|^2 / (2s)`` of every step."""

    def __init__(self, p):
        self.p, self.s = p, p.step_size()
        self.x = p.x0().requires_grad_(True)
        self.opt = torch_l2o.FISTA([self.x], prox=p.prox, prox_params=p.prox_params, lr=self.s, restart=True,
                                   instance_dims=1)

    def step(self):
        p, y = self.p, self.x.detach().clone()
        self.opt.step(_closure(self.opt, self.x, p))
        z = self.opt.solution(self.x)
        d = z - y
        gap = d.square().sum(-1) / (2 * self.s.squeeze(-1))
        Q = p.smooth(y) + (p.grad(y) * d).sum(-1) + gap + p.objective(z) - p.smooth(z)
        return z, p.objective(z), Q, gap


def _assert_never_behind(opt, x, p, steps, F_star=None, x_star=None):
    """Per step: F(x_k) <= Q_s(x^F_k; y^F_{k-1}) <= F(x^F_k) + gap (FISTA-restart run alone);
    x_k = x^F_k while every step so far fell back; with ``x_star``: FISTA's bound
    Q - F* <= 2 |x^F_r - x*|^2 / (s (k - r + 1)^2) since the shadow's last restart r."""
    ref = _FistaRestart(p)
    s = p.step_size().squeeze(-1)
    start = p.x0()
    since = torch.zeros(p.batch, dtype=D)  # steps since the shadow's last restart
    for k in range(steps):
        opt.step(_closure(opt, x, p))
        zF, F_F, Q, gap = ref.step()
        F = p.objective(opt.solution(x))
        tol = 1e-12 * Q.abs() + 1e-15
        assert bool((F <= Q + tol).all()), (k, (F - Q).max())
        assert bool((F <= F_F + gap + tol).all())
        st = opt.state[x]
        assert torch.equal(st["sg_x"], zF) or torch.allclose(st["sg_x"], zF, rtol=0, atol=1e-12)
        all_fell_back = st["fallbacks"] == k + 1
        assert torch.allclose(opt.solution(x)[all_fell_back], zF[all_fell_back], rtol=0, atol=1e-12)
        since += 1
        if x_star is not None:
            bound = 2 * (start - x_star).square().sum(-1) / (s * (since + 1).square())
            assert bool((Q - F_star <= bound + tol).all()), k
            restarted = st["sg_t"] == 1
            start = torch.where(restarted.unsqueeze(-1), zF, start)
            since = torch.where(restarted, torch.zeros_like(since), since)
    return F, F_F


def test_bad_learned_steps_diverge_unguarded_and_converge_guarded(prob):
    p, F_star = prob
    bad = _heads(10.0, 3.0)  # p ~ 2 (step 2/L), a ~ 1.9: unstable
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights=bad, instance_dims=1, watchdog=False)
    with pytest.raises(FloatingPointError):
        for _ in range(300):
            opt.step(_closure(opt, x, p))
    # without a closure the watchdog catches it: a warning, then FISTA-restart steps that converge
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights=bad, instance_dims=1)
    with pytest.warns(RuntimeWarning, match="diverged or stalled"):
        for _ in range(300):
            opt.zero_grad()
            p.smooth(x).sum().backward()
            opt.step()
    assert bool(opt.state[x]["watchdog"].all())
    assert float(mean_relative_error(p.objective(opt.solution(x)), F_star)) < 1e-6
    # safeguarded: never behind FISTA-restart (this replaced a monotone decrease: FISTA is not monotone)
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights=bad, safeguard=True, instance_dims=1)
    F, _ = _assert_never_behind(opt, x, p, 300)
    assert float(mean_relative_error(F, F_star)) < 1e-10
    assert bool((opt.state[x]["fallbacks"] > 0).all())


def test_ista_steps_are_refused_where_fista_restart_is_ahead(prob):
    """p = 1, a = 0 makes the learned step ISTA's. The ISTA-based rule accepted every such
    step and ran at ISTA's speed; now they are refused where FISTA-restart is ahead, and
    the iterates keep FISTA-restart's speed."""
    p, F_star = prob
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights=_heads(0.0, -math.inf),
                       safeguard=True, instance_dims=1)
    z = p.x0().requires_grad_(True)
    ista = torch_l2o.ISTA([z], prox="l1", lam=0.1, lr=p.step_size())
    for _ in range(80):
        ista.step(_closure(ista, z, p))
    F, F_F = _assert_never_behind(opt, x, p, 80)
    err, err_fista = (float(mean_relative_error(v, F_star)) for v in (F, F_F))
    err_ista = float(mean_relative_error(p.objective(z.detach()), F_star))
    assert err <= err_fista * (1 + 1e-6) + 1e-15 and err < 1e-3 * err_ista
    assert bool((opt.state[x]["fallbacks"] > 0).all())


_FAMILIES = {
    "lasso": lambda g: Lasso(m=30, n=60, sparsity=6, lam=0.05).sample(4, generator=g, dtype=D),
    "lasso, Gaussian A and b": lambda g: LassoProblem(A=torch.randn(4, 20, 40, generator=g, dtype=D),
                                                      b=torch.randn(4, 20, generator=g, dtype=D), prox="l1",
                                                      prox_params={"lam": 0.1}),
    "logistic": lambda g: LogisticL1(N=120, n=30, sparsity=6, lam=0.02).sample(4, generator=g, dtype=D),
}
_WEIGHTS = {
    "untrained": (torch_l2o.PA, "untrained"),
    "untrained PA-MR": (torch_l2o.PAMR, "untrained"),
    "adversarial": (torch_l2o.PA, _heads(10.0, 3.0)),  # steps 2/L, extrapolation 1.9
    "timid": (torch_l2o.PA, _heads(-6.0, -6.0)),  # steps 0.005/L, no extrapolation
    "ISTA": (torch_l2o.PA, _heads(0.0, -math.inf)),
    "pretrained PA-GRU": (torch_l2o.PAGRU, "lasso"),
}


@pytest.mark.parametrize("weights", list(_WEIGHTS))
@pytest.mark.parametrize("family", list(_FAMILIES))
def test_never_behind_fista_restart(family, weights):
    """Property: whatever the network, on random LASSO and L1-logistic batches, every
    iterate is within FISTA-restart's (run alone from the same start) model gap of its
    objective, exactly FISTA-restart's while every step fell back, and within FISTA's
    O(1/k^2) bound since the last restart."""
    g = torch.Generator().manual_seed(len(family) + 7 * len(weights))
    p = _FAMILIES[family](g)
    sol = reference_solve(p)
    cls, w = _WEIGHTS[weights]
    x = p.x0().requires_grad_(True)
    opt = cls([x], prox="l1", lr=p.step_size(), prox_params=p.prox_params, weights=w, safeguard=True,
              instance_dims=1)
    F, F_F = _assert_never_behind(opt, x, p, 120, sol.F, sol.x)
    assert float(mean_relative_error(F, sol.F)) <= float(mean_relative_error(F_F, sol.F)) + 1e-9


@pytest.mark.parametrize("cls", [torch_l2o.PA, torch_l2o.PAMR])
def test_in_distribution_the_safeguard_never_intervenes(cls):
    """On the weights' own family every learned step beats FISTA-restart's: no fallback,
    the unguarded trajectory, and the learned speed (FISTA-restart is far behind)."""
    p = Lasso().sample(3, generator=torch.Generator().manual_seed(0), dtype=D)
    F_star = reference_solve(p).F
    runs = []
    for sg in (False, True):
        x = p.x0().requires_grad_(True)
        opt = cls([x], prox="l1", lam=0.1, lr=p.step_size(), weights="lasso", instance_dims=1, safeguard=sg,
                  watchdog=False)
        runs.append([])
        for _ in range(30):
            opt.step(_closure(opt, x, p))
            runs[-1].append(opt.solution(x).clone())
    assert int(opt.state[x]["fallbacks"].sum()) == 0
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    ref = _FistaRestart(p)
    for _ in range(30):
        _, F_F, _, _ = ref.step()
    err = float(mean_relative_error(p.objective(runs[1][-1]), F_star))
    assert err < 1e-5 and err < 1e-2 * float(mean_relative_error(F_F, F_star))


def test_scalar_closure_decides_jointly(prob):
    p, F_star = prob
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights=_heads(10.0, 3.0), safeguard=True,
                       instance_dims=1)

    def closure():
        opt.zero_grad()
        f = p.smooth(x).sum()
        f.backward()
        return f

    ref = _FistaRestart(p)
    for _ in range(200):
        opt.step(closure)
        _, _, Q, _ = ref.step()
        F = p.objective(opt.solution(x)).sum()
        assert float(F) <= float(Q.sum()) * (1 + 1e-12)  # the guarantee holds for the sum
    fb = opt.state[x]["fallbacks"]
    assert bool((fb == fb[0]).all()) and int(fb[0]) > 0  # all instances together
    assert float(mean_relative_error(p.objective(opt.solution(x)), F_star)) < 1e-6


def test_safeguard_needs_a_closure(prob):
    p, _ = prob
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights="untrained", safeguard=True)
    p.smooth(x).sum().backward()
    with pytest.raises(RuntimeError, match="needs step\\(closure\\)"):
        opt.step()


def test_safeguard_state_round_trip(prob):
    p, _ = prob
    p32 = p.to(torch.float32)
    kw = dict(prox="l1", lam=0.1, lr=p32.step_size(), weights=_heads(2.0, 1.0), safeguard=True, instance_dims=1)
    x = p32.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], **kw)
    for _ in range(6):
        opt.step(_closure(opt, x, p32))
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = torch_l2o.PA([x2], **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    st = opt2.state[x2]
    assert st["sg_t"].dtype == D and st["sg_x"].dtype == st["sg_y"].dtype == torch.float32
    assert st["fallbacks"].dtype == torch.int64
    for _ in range(6):
        opt.step(_closure(opt, x, p32))
        opt2.step(_closure(opt2, x2, p32))
    assert torch.equal(x, x2) and torch.equal(opt.state[x]["fallbacks"], opt2.state[x2]["fallbacks"])


def test_state_of_the_ista_based_rule_is_taken_over(prob):
    """A state saved by the earlier ISTA-based rule (keys sg_F, sg_T, sg_stale) starts the
    FISTA-restart shadow at the saved point; the old keys are dropped."""
    p, F_star = prob
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights="untrained", safeguard=True,
                       instance_dims=1)
    for _ in range(3):
        opt.step(_closure(opt, x, p))
    st = opt.state[x]
    for key in ("sg_t", "sg_x", "sg_y"):
        del st[key]
    st.update(sg_F=torch.zeros(6, dtype=D), sg_T=x.detach().clone(), sg_stale=torch.ones(6, dtype=torch.bool))
    for _ in range(300):
        opt.step(_closure(opt, x, p))
    assert not {"sg_F", "sg_T", "sg_stale"} & set(st) and {"sg_t", "sg_x", "sg_y"} <= set(st)
    assert float(mean_relative_error(p.objective(opt.solution(x)), F_star)) < 1e-8


def test_nothing_is_written_when_a_closure_evaluation_fails(prob):
    """The step's extra closure evaluations (at FISTA-restart's gradient point, at the
    learned candidate) come before any write: one that raises leaves iterate and state as they were."""
    p, _ = prob
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights="untrained", safeguard=True,
                       instance_dims=1)
    for _ in range(5):
        opt.step(_closure(opt, x, p))
    for fail_at in (2, 3):
        before = copy.deepcopy(opt.state_dict())
        y = x.detach().clone()
        calls = [0]

        def closure():
            calls[0] += 1
            if calls[0] == fail_at:
                raise ValueError("boom")
            return _closure(opt, x, p)()

        with pytest.raises(ValueError, match="boom"):
            opt.step(closure)
        assert torch.equal(x.detach(), y)
        after = opt.state_dict()["state"][0]
        for key, v in before["state"][0].items():
            assert torch.equal(after[key], v) if isinstance(v, torch.Tensor) else after[key] == v, key
