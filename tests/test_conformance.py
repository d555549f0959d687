"""Every optimizer behaves like a torch.optim optimizer: state_dict round trips, groups,
closures, schedulers, hooks, dtypes, batched instances."""

import copy
import math
import warnings

import pytest
import torch

import torch_l2o
from torch_l2o.optim.functional import pa_update
from torch_l2o.registry import available_architectures, get_architecture
from torch_l2o.problems import Lasso

LAM = 0.1


def _mathgd_weights():
    """A MathGD network that is not plain gradient descent (a non-zero last layer)."""
    net = torch_l2o.nets.MathGDNet(hidden=16, init_scale=1.0)
    with torch.no_grad():
        net.out.weight.copy_(torch.linspace(-1, 1, 16))
    return net.state_dict()


def _prox_kw(lr):
    return dict(prox="l1", lam=LAM, lr=lr)


# name -> (factory(params, lr) -> optimizer, differentiates F (True) or f (False))
OPTIMIZERS = {
    "ISTA": (lambda ps, lr, **kw: torch_l2o.ISTA(ps, **_prox_kw(lr), **kw), False),
    "FISTA": (lambda ps, lr, **kw: torch_l2o.FISTA(ps, **_prox_kw(lr), restart=True, **kw), False),
    "PA": (lambda ps, lr, **kw: torch_l2o.PA(ps, **_prox_kw(lr), weights="untrained", **kw), False),
    "PAGRU": (lambda ps, lr, **kw: torch_l2o.PAGRU(ps, **_prox_kw(lr), weights="untrained", **kw), False),
    "PAMR": (lambda ps, lr, **kw: torch_l2o.PAMR(ps, **_prox_kw(lr), weights="untrained", window=4, **kw), False),
    "PAMR-coords": (lambda ps, lr, **kw: torch_l2o.PAMR(ps, **_prox_kw(lr), weights="untrained",
                                                        attend="coordinates", **kw), False),
    "L2ODM": (lambda ps, lr, **kw: torch_l2o.L2ODM(ps, lr=0.5, weights="untrained", **kw), True),
    "RNNProp": (lambda ps, lr, **kw: torch_l2o.RNNProp(ps, lr=0.5, weights="untrained", **kw), True),
    "MathGD": (lambda ps, lr, **kw: torch_l2o.MathGD(ps, **_prox_kw(lr), weights=_mathgd_weights(), hidden=16,
                                                     **kw), False),
}
NAMES = sorted(OPTIMIZERS)


@pytest.fixture(scope="module")
def prob():
    return Lasso(m=20, n=30, sparsity=4).sample(3, generator=torch.Generator().manual_seed(0))


def _loss(prob, x, composite):
    f = prob.smooth(x)
    return f + LAM * x.abs().sum(-1) if composite else f


def _run(opt, x, prob, composite, n):
    for _ in range(n):
        opt.zero_grad()
        _loss(prob, x, composite).sum().backward()
        opt.step()


@pytest.mark.parametrize("live", [False, True], ids=["saved", "live"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_bit_identical(prob, name, live):
    """``live``: the state dict of an optimizer that goes on stepping, loaded without a copy
    (the second optimizer must own its state: a shared ``x`` diverged)."""
    make, composite = OPTIMIZERS[name]
    x = prob.x0().requires_grad_(True)
    opt = make([x], prob.step_size(), instance_dims=1)
    _run(opt, x, prob, composite, 5)
    saved = opt.state_dict() if live else copy.deepcopy(opt.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = make([x2], prob.step_size(), instance_dims=1)
    opt2.load_state_dict(saved)
    _run(opt, x, prob, composite, 5)
    _run(opt2, x2, prob, composite, 5)
    assert torch.equal(x, x2)
    assert torch.equal(opt.solution(x), opt2.solution(x2))


@pytest.mark.parametrize("name", NAMES)
def test_automatic_step_size_round_trip(prob, name):
    """lr=None (where it applies) also survives state_dict."""
    make, composite = OPTIMIZERS[name]
    if composite:
        pytest.skip("L2O-DM and RNNProp scale their output by lr; it has no automatic value")
    x = prob.x0().requires_grad_(True)
    opt = make([x], None, instance_dims=1)
    _run(opt, x, prob, composite, 4)
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = make([x2], None, instance_dims=1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run(opt, x, prob, composite, 4)
    _run(opt2, x2, prob, composite, 4)
    assert torch.equal(x, x2)


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_separate_runs(prob, name):
    make, composite = OPTIMIZERS[name]
    s = prob.step_size()
    xb = prob.x0().requires_grad_(True)
    ob = make([xb], s, instance_dims=1)
    _run(ob, xb, prob, composite, 8)
    for i in range(3):
        pi = prob[i : i + 1]
        xi = pi.x0().requires_grad_(True)
        oi = make([xi], s[i : i + 1], instance_dims=1)
        _run(oi, xi, pi, composite, 8)
        assert torch.allclose(oi.solution(xi)[0], ob.solution(xb)[i], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_closure_hooks(prob, name):
    make, composite = OPTIMIZERS[name]
    x = prob.x0().requires_grad_(True)
    opt = make([x], prob.step_size(), instance_dims=1)
    z = torch.ones(5, requires_grad=True)
    opt.add_param_group({"params": [z], "lr": 0.05 if not composite else 0.5, "instance_dims": 0})
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = _loss(prob, x, composite).sum() + 0.5 * z.square().sum()
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(3)]
    assert calls == ["pre", "post"] * 3
    assert not torch.equal(z.detach(), torch.ones(5)) and z in opt.state
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_drives_lr(prob, name):
    """A StepLR run equals a run with the halved lr set by hand."""
    make, composite = OPTIMIZERS[name]
    base = 0.5 if composite else 0.02
    x1 = prob.x0().requires_grad_(True)
    o1 = make([x1], base)
    sched = torch.optim.lr_scheduler.StepLR(o1, step_size=1, gamma=0.5)
    x2 = prob.x0().requires_grad_(True)
    o2 = make([x2], base)
    for k in range(4):
        o2.param_groups[0]["lr"] = base * 0.5**k
        for opt, x in ((o1, x1), (o2, x2)):
            opt.zero_grad()
            _loss(prob, x, composite).sum().backward()
            opt.step()
        sched.step()
    assert torch.equal(x1, x2)
    assert o1.param_groups[0]["lr"] == base * 0.5**4


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_parameters_keep_float32_state(prob, name, dtype):
    make, composite = OPTIMIZERS[name]
    p = prob.to(dtype)
    x = p.x0().requires_grad_(True)
    opt = make([x], p.step_size().float(), instance_dims=1)
    _run(opt, x, p, composite, 3)
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = make([x2], p.step_size().float(), instance_dims=1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, q in ((opt, x), (opt2, x2)):
        for key, v in o.state[q].items():
            if isinstance(v, torch.Tensor):
                expect = {"x": dtype, "prev_y": dtype, "prev_g": dtype, "wd_best": dtype, "t": torch.float64,
                          "filled": torch.int64, "wd_since": torch.int64, "watchdog": torch.bool,
                          "handoff": torch.bool}.get(key, torch.float64 if key.startswith("wd_") else torch.float32)
                assert v.dtype == expect, (key, v.dtype)
    assert bool(torch.isfinite(opt.solution(x).float()).all())


def _ista_weights():
    """PA weights whose heads output p = 1 and a = 0 exactly."""
    net = torch_l2o.nets.PANet()
    sd = net.state_dict()
    for k in ("heads.p.weight", "heads.a.weight", "heads.p.bias"):
        sd[k] = torch.zeros_like(sd[k])
    sd["heads.a.bias"] = torch.full_like(sd["heads.a.bias"], -math.inf)  # 2 sigmoid(-inf) = 0
    return sd


def test_pa_with_p1_a0_is_ista(prob):
    s = prob.step_size()
    x = prob.x0().requires_grad_(True)
    pa = torch_l2o.PA([x], prox="l1", lam=LAM, lr=s, weights=_ista_weights())
    z = prob.x0().requires_grad_(True)
    ista = torch_l2o.ISTA([z], prox="l1", lam=LAM, lr=s)
    for _ in range(20):
        for opt, q in ((pa, x), (ista, z)):
            opt.zero_grad()
            prob.smooth(q).sum().backward()
            opt.step()
        assert torch.equal(pa.solution(x), z.detach())


# per architecture: options for a small or non-trivial network (MathGD's untrained one is plain GD)
ARCH_OPTIONS = {"pamr": {"window": 3}, "gso": {"blocks": 1}, "mathgd": {"hidden": 16}}


def _arch_optimizer(arch, params, lr):
    """The registered optimizer of ``arch`` on LASSO: with the prox where it applies one."""
    spec = get_architecture(arch)
    weights = _mathgd_weights() if arch == "mathgd" else "untrained"
    kw = dict(prox="l1", lam=LAM) if spec.applies_prox else {}
    return spec.optimizer(params, lr=lr if spec.lr_is_step else 0.5, weights=weights, **kw, **ARCH_OPTIONS.get(arch, {}))


def _grad(prob, y, composite):
    yr = y.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_loss(prob, yr, composite).sum(), yr)  # as the optimizer's user computes it
    return g


@pytest.mark.parametrize("arch", available_architectures())
def test_functional_update_equals_step(prob, arch):
    """The class's in-place step and the registered pure, out-of-place update agree to the
    last bit, for every architecture (the one update rule step() and meta_train share)."""
    spec = get_architecture(arch)
    s = prob.step_size()
    x = prob.x0().requires_grad_(True)
    opt = _arch_optimizer(arch, [x], s)
    net = opt.net.block(0)
    y_f = prob.x0()
    x_f = y_f.clone()
    state = net.init_state(y_f.numel())
    prox, params = ("l1", {"lam": LAM}) if spec.applies_prox else ("none", {})
    for k in range(6):
        opt.zero_grad()
        _loss(prob, x, not spec.applies_prox).sum().backward()
        opt.step()
        g = _grad(prob, y_f, not spec.applies_prox)
        with torch.no_grad():  # as step() runs it (PyTorch's CPU LSTM picks another kernel with grad)
            xs, ys, state = spec.update(net, state, [y_f], [g], [x_f if spec.extrapolates else y_f],
                                        lr=s if spec.lr_is_step else 0.5, prox=prox, params=params, step=k,
                                        instance_dims=opt.param_groups[0]["instance_dims"])
        x_f, y_f = xs[0], ys[0]
        assert torch.equal(opt.solution(x), x_f) and torch.equal(x.detach(), y_f)
        assert all(torch.equal(opt.state[x][key], v) for key, v in state.items())


@pytest.mark.parametrize("arch", available_architectures())
def test_a_group_of_tensors_is_one_network_call(arch):
    """A param group's tensors run as one batch: the network is called once per step, and
    the iterates match those of the update on the tensors' concatenation, bit for bit."""
    spec = get_architecture(arch)
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (5,), (2, 2, 2)]
    ps = [torch.randn(sh, generator=gen).requires_grad_(True) for sh in shapes]
    opt = _arch_optimizer(arch, ps, 0.05)
    net = opt._net_on(torch.device("cpu")).block(0)
    calls = []
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    flat = torch.cat([p.detach().reshape(-1) for p in ps]).unsqueeze(0)
    fx = flat.clone()
    state = net.init_state(flat.numel())
    prox, params = ("l1", {"lam": LAM}) if spec.applies_prox else ("none", {})
    for k in range(4):
        gs = [torch.randn(sh, generator=gen) for sh in shapes]
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
        assert len(calls) == 1  # one network call for the three tensors
        calls.clear()
        g = torch.cat([g.reshape(-1) for g in gs]).unsqueeze(0)
        with torch.no_grad():
            xs, ys, state = spec.update(net, state, [flat], [g], [fx if spec.extrapolates else flat],
                                        lr=0.05 if spec.lr_is_step else 0.5, prox=prox, params=params, step=k)
        calls.clear()
        fx, flat = xs[0], ys[0]
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in ps]), flat[0])
        assert torch.equal(torch.cat([opt.solution(p).reshape(-1) for p in ps]), fx[0])
    hook.remove()
    assert all(opt.state[p][key].is_contiguous() and opt.state[p][key]._base is None
               for p in ps for key in opt.state[p] if isinstance(opt.state[p][key], torch.Tensor))


@pytest.mark.parametrize("arch", ["pa", "pamr", "rnnprop"])
def test_multi_tensor_state_dict_round_trip_and_uneven_histories(arch):
    """Tensors whose step counts differ (one without a gradient for a while) run as
    separate batches; a state_dict round trip mid-way repeats the run bit for bit."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(6, 4), (9,), (3, 3)]

    def run(opt, ps, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for k in range(steps):
            for i, p in enumerate(ps):
                p.grad = None if (i == 1 and k < 2) else torch.randn(p.shape, generator=g)
            opt.step()

    ps = [torch.randn(sh, generator=gen).requires_grad_(True) for sh in shapes]
    opt = _arch_optimizer(arch, ps, 0.05)
    run(opt, ps, 4, 0)
    assert opt.state[ps[0]]["step"] == 4 and opt.state[ps[1]]["step"] == 2
    saved = copy.deepcopy(opt.state_dict())
    ps2 = [p.detach().clone().requires_grad_(True) for p in ps]
    opt2 = _arch_optimizer(arch, ps2, 0.05)
    opt2.load_state_dict(saved)
    run(opt, ps, 3, 1)
    run(opt2, ps2, 3, 1)
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))


def test_functional_update_is_differentiable(prob):
    """Meta-training differentiates the same function with respect to the network."""
    net = torch_l2o.nets.PAMRNet(window=3)
    y = prob.x0()
    x = y.clone()
    state = net.init_state(y.numel())
    s = prob.step_size()
    loss = 0
    for _ in range(3):
        xs, ys, state = pa_update(net, state, [y], [prob.grad(y)], [x], lr=s, prox="l1", params={"lam": LAM})
        x, y = xs[0], ys[0]
        loss = loss + prob.objective(x).mean()
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_parameter_counts():
    counts = {a: sum(p.numel() for p in get_architecture(a).network().parameters())
              for a in available_architectures()}
    assert counts == {"l2odm": 5301, "rnnprop": 6801, "pa": 5742, "pagru": 2898, "pamr": 4594, "gso": 2 * 5301,
                      "mathgd": 3 * 5120 + 4, "pafr": 2898}
    assert counts["pamr"] < counts["pa"]  # the paper's claim holds for the default configuration


def test_untrained_default_warns_and_explicit_does_not(tmp_path, monkeypatch):
    """Without shipped weights (an empty weights folder) the default is the untrained
    network, with a warning; weights="untrained" asks for it and does not warn."""
    monkeypatch.setenv("TORCH_L2O_PRETRAINED", str(tmp_path))
    assert torch_l2o.weights.available_weights("pa") == []
    x = torch.zeros(3, requires_grad=True)
    with pytest.warns(UserWarning, match="untrained"):
        torch_l2o.PA([x], prox="l1", lam=0.1, lr=0.1, weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_l2o.PA([x], prox="l1", lam=0.1, lr=0.1, weights="untrained")


def test_blackbox_optimizers_refuse_prox():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="applies no prox"):
        torch_l2o.L2ODM([{"params": [x], "prox": "l1"}], weights="untrained")
    with pytest.raises(ValueError, match="cannot be None"):
        torch_l2o.RNNProp([x], lr=None, weights="untrained")


def test_nonfinite_gradient_leaves_recurrent_state_untouched(prob):
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.PAMR([x], prox="l1", lam=LAM, lr=prob.step_size(), weights="untrained", window=3)
    _run(opt, x, prob, False, 2)
    before = copy.deepcopy(opt.state_dict())
    y_before = x.detach().clone()
    x.grad = torch.full_like(x, math.nan)
    with pytest.raises(FloatingPointError):
        opt.step()
    after = opt.state_dict()
    assert torch.equal(x, y_before)
    for k, v in before["state"][0].items():
        assert torch.equal(v, after["state"][0][k]) if isinstance(v, torch.Tensor) else v == after["state"][0][k]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_loads_without_pickle(prob, name, tmp_path):
    """Optimizer checkpoints hold only tensors and plain data: torch.load(weights_only=True)."""
    make, composite = OPTIMIZERS[name]
    x = prob.x0().requires_grad_(True)
    opt = make([x], prob.step_size(), instance_dims=1)
    _run(opt, x, prob, composite, 3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = make([x2], prob.step_size(), instance_dims=1)
    opt2.load_state_dict(loaded)
    _run(opt, x, prob, composite, 2)
    _run(opt2, x2, prob, composite, 2)
    assert torch.equal(x, x2)


@pytest.mark.parametrize("arch", available_architectures())
def test_help_documents_every_keyword(arch):
    """help(torch_l2o.PAMR) showed the update rule but no arguments: every learned
    optimizer's own docstring documents each keyword of its constructor."""
    import inspect

    cls = get_architecture(arch).optimizer
    doc = cls.__doc__ or ""
    assert "Args:" in doc, cls.__name__
    args = doc[doc.index("Args:"):]
    for name, q in inspect.signature(cls.__init__).parameters.items():
        if name != "self":
            key = f"**{name}" if q.kind is q.VAR_KEYWORD else name
            assert f"\n        {key}" in args or f", {name}" in args, (cls.__name__, name)
