"""Scale-free inputs of the PA networks (``inputs="scaled"``)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torch_l2o
from torch_l2o.nets import PAGRUNet, PAMRNet, PANet
from torch_l2o.optim.functional import pa_features
from torch_l2o.problems import Lasso


def _yg(seed, shape=(3, 40)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_raw_features_are_g_and_y():
    y, g = _yg(0)
    f = pa_features([y], [g], [0.3], inputs="raw", instance_dims=1)
    assert torch.equal(f, torch.stack([g.reshape(-1), y.reshape(-1)], -1))


def test_scaled_features_by_hand():
    y, g = _yg(1)
    s = 0.3
    f = pa_features([y], [g], [s], inputs="scaled", instance_dims=1)
    sigma = torch.maximum(y.abs(), (s * g).abs()).square().mean(1, keepdim=True).sqrt()
    want = torch.stack([(s * g / sigma).reshape(-1), (y / sigma).reshape(-1)], -1)
    torch.testing.assert_close(f, want)
    # per instance, the RMS of the larger feature is exactly 1
    big = torch.maximum(f[:, 0].abs(), f[:, 1].abs()).reshape(3, 40)
    torch.testing.assert_close(big.square().mean(1).sqrt(), torch.ones(3))


@given(c=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_scaled_features_are_invariant_to_scale(c, seed):
    """``(y, s g) -> c (y, s g)`` per instance leaves the features unchanged: rescaling
    ``b`` and ``lam`` of a LASSO, or ``A`` with ``s = 1/L``."""
    y, g = _yg(seed)
    cs = torch.tensor([[c], [1.0], [1 / c]])
    s = torch.tensor([[0.5], [2.0], [1.0]])
    f = pa_features([y], [g], [s], inputs="scaled", instance_dims=1)
    f2 = pa_features([y * cs], [g * cs], [s], inputs="scaled", instance_dims=1)
    torch.testing.assert_close(f2, f, rtol=1e-5, atol=1e-6)
    # the step size enters through s g only
    f3 = pa_features([y], [g / 4], [s * 4], inputs="scaled", instance_dims=1)
    torch.testing.assert_close(f3, f, rtol=1e-5, atol=1e-6)


def test_prox_features_by_hand():
    """``"prox"``: the scaled pair and the soft-thresholding step over the same sigma; a
    coordinate inside the threshold at zero has a zero step, one on the support moves by
    ``-s (g + lam sign)``."""
    y, g = _yg(4)
    y[:, :5] = 0.0
    s, lam = 0.3, 0.7
    f = pa_features([y], [g], [s], inputs="prox", instance_dims=1, prox="l1", params={"lam": lam})
    scaled = pa_features([y], [g], [s], inputs="scaled", instance_dims=1)
    torch.testing.assert_close(f[:, :2], scaled)
    sigma = torch.maximum(y.abs(), (s * g).abs()).square().mean(1, keepdim=True).sqrt()
    z = y - s * g
    step = torch.sign(z) * torch.clamp(z.abs() - s * lam, min=0) - y
    torch.testing.assert_close(f[:, 2], (step / sigma).reshape(-1))
    inside = (y == 0) & ((s * g).abs() <= s * lam)
    assert inside.any() and (f[:, 2].reshape(y.shape)[inside] == 0).all()


@given(c=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_prox_features_are_invariant_to_scale(c, seed):
    """``(y, s g, lam) -> c (y, s g, lam)`` per instance (a LASSO's ``b`` and ``lam`` times
    ``c``) leaves all three features unchanged: the threshold scales with the problem."""
    y, g = _yg(seed)
    cs = torch.tensor([[c], [1.0], [1 / c]])
    s = torch.tensor([[0.5], [2.0], [1.0]])
    lam = torch.tensor([[0.3], [0.1], [0.05]])
    f = pa_features([y], [g], [s], inputs="prox", instance_dims=1, prox="l1", params={"lam": lam})
    f2 = pa_features([y * cs], [g * cs], [s], inputs="prox", instance_dims=1, prox="l1", params={"lam": lam * cs})
    torch.testing.assert_close(f2, f, rtol=1e-5, atol=1e-6)


def test_scaled_features_zero_scale_and_several_tensors():
    y, g = _yg(2)
    y[1], g[1] = 0, 0  # an instance already at x = 0 with g = 0
    f = pa_features([y], [g], [1.0], inputs="scaled", instance_dims=1)
    assert torch.isfinite(f).all() and f.reshape(3, 40, 2)[1].abs().sum() == 0
    # several tensors: each scaled by its own instances' sigma, concatenated in order
    y2, g2 = _yg(3, (3, 7))
    both = pa_features([y, y2], [g, g2], [1.0, 0.5], inputs="scaled", instance_dims=1)
    torch.testing.assert_close(both, torch.cat([f, pa_features([y2], [g2], [0.5], inputs="scaled", instance_dims=1)]))
    with pytest.raises(ValueError, match="raw.*scaled.*prox"):
        pa_features([y], [g], [1.0], inputs="log")
    with pytest.raises(ValueError, match="inputs must be"):
        PANet(inputs="log")


@pytest.mark.parametrize("inputs", ["scaled", "prox"])
@pytest.mark.parametrize("Net", [PANet, PAGRUNet, PAMRNet])
def test_scaled_optimizer_is_scale_equivariant(Net, inputs):
    """The whole learned optimizer with scale-free inputs on ``(c b, c lam)`` gives ``c x_k``:
    what it learned at one scale holds at every scale. With raw inputs it does not."""
    torch.manual_seed(0)
    net = Net(inputs=inputs).eval()
    sd = net.state_dict()
    prob = Lasso(m=30, n=60, sparsity=6).sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = prob.step_size()

    def run(c, inputs):
        x = torch.zeros(4, 60, dtype=torch.float64, requires_grad=True)
        opt = torch_l2o.PAMR if Net is PAMRNet else (torch_l2o.PAGRU if Net is PAGRUNet else torch_l2o.PA)
        opt = opt([x], prox="l1", lam=0.1 * c, lr=s, weights=sd, inputs=inputs, instance_dims=1)
        for _ in range(15):
            opt.zero_grad()
            (0.5 * (torch.einsum("bmn,bn->bm", prob.A, x) - c * prob.b).square().sum()).backward()
            opt.step()
        return opt.solution(x).detach()

    # the network computes in float32: equal to its rounding (1e-7), amplified by 15 steps
    base = run(1.0, inputs)
    for c in (1e-3, 50.0):
        torch.testing.assert_close(run(c, inputs), c * base, rtol=1e-4, atol=1e-6 * c * float(base.abs().max()))
    if inputs != "scaled":
        return
    raw = run(1.0, "raw")
    assert (run(50.0, "raw") - 50.0 * raw).abs().max() > 1e-2 * 50.0 * raw.abs().max()


def test_pretrained_weights_keep_raw_inputs():
    opt = torch_l2o.PAMR([torch.zeros(3, requires_grad=True)], lr=0.1)
    assert opt.net.inputs == "raw"  # cards without "inputs" in their config are the papers' networks
    with pytest.raises(ValueError, match="trained with inputs='raw'"):
        torch_l2o.PAMR([torch.zeros(3, requires_grad=True)], lr=0.1, weights="lasso", inputs="scaled")


@pytest.mark.parametrize("cls", [torch_l2o.PAMR, torch_l2o.PAGRU])
@pytest.mark.parametrize("name", ["lasso-mix", "logistic-mix"])
def test_mixture_weights_load_with_their_scaled_inputs(name, cls):
    """The mixture weights' file sets the network option; asking for raw inputs is refused."""
    opt = cls([torch.zeros(3, requires_grad=True)], lr=0.1, weights=name)
    assert opt.net.inputs == "scaled" and opt.weights_info["card"]["family"] == name
    with pytest.raises(ValueError, match="trained with inputs='scaled'"):
        cls([torch.zeros(3, requires_grad=True)], lr=0.1, weights=name, inputs="raw")


@pytest.mark.parametrize("cls", [torch_l2o.PAMR, torch_l2o.PAGRU])
def test_logistic_mixture_weights_are_not_slow_on_an_easy_problem(cls):
    """The log-F meta-loss left the last digits unrewarded, and the first logistic-mix
    weights needed 2x FISTA-restart's iterations to 1e-6 on a well-conditioned problem
    (44 vs 20 on the ood suite's imbalanced set); the gap-loss weights need fewer."""
    import warnings

    from torch_l2o.problems import mean_relative_error, reference_solve
    from torch_l2o.problems.ood import imbalanced_logistic

    p64 = imbalanced_logistic(8, seed=3)
    F_star = reference_solve(p64).F
    p = p64.to(dtype=torch.float32)
    lam, s = p.prox_params["lam"], p.step_size().float()

    def iterations(make):
        x = p.x0().requires_grad_(True)
        opt = make([x])
        for k in range(1, 201):
            opt.zero_grad()
            p.smooth(x).sum().backward()
            opt.step()
            # scored at the prox iterate x_k, as the benchmarks do (the parameter holds y_k)
            if float(mean_relative_error(p64.objective(opt.solution(x).double()), F_star)) <= 1e-6:
                return k
        return None

    fr = iterations(lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, lr=s, restart=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the watchdog must not need to step in
        mix = iterations(lambda ps: cls(ps, prox="l1", lam=lam, lr=s, weights="logistic-mix", instance_dims=1))
    assert fr is not None and mix is not None and mix <= fr, (mix, fr)
