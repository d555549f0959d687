"""L2O-PA-FR: FISTA with adaptive restart whose step and momentum a network scales."""

import copy

import torch
from cases import pafr_net

import torch_l2o
from torch_l2o.kernels.fused import use_fused
from torch_l2o.nets import PAFRNet
from torch_l2o.optim.functional import pafr_update
from torch_l2o.problems import Lasso


def _problem(dtype=torch.float64):
    return Lasso(m=40, n=80, sparsity=8).sample(4, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _run(make, prob, steps):
    x = torch.zeros(prob.batch, prob.dim, dtype=prob.dtype, requires_grad=True)
    opt = make([x])
    for _ in range(steps):
        opt.zero_grad()
        prob.smooth(x).sum().backward()
        opt.step()
    return opt, opt.solution(x).detach()


def test_untrained_is_fista_restart():
    """Its output layers start at zero, so p = a = 1: the iterates of FISTA with adaptive
    restart (the same restarts, t_k in float32 against float64). The CPU loop's run:
    ``tests/test_cpu_step.py``."""
    prob = _problem()
    s = prob.step_size()
    cls = torch_l2o.get_architecture("pafr").optimizer
    with use_fused(False):
        _, got = _run(lambda ps: cls(ps, prox="l1", lam=0.1, lr=s, weights="untrained", instance_dims=1,
                                     watchdog=False), prob, 150)
    _, want = _run(lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1, lr=s, restart=True, instance_dims=1), prob, 150)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_restart_sets_y_to_x_and_t_to_one():
    """Per instance: where (y_k - x_{k+1})^T (x_{k+1} - x_k) > 0 the step restarts, y_{k+1} =
    x_{k+1} and t_{k+1} = 1; elsewhere y_{k+1} = x_{k+1} + a (t_k - 1) / t_{k+1} (x_{k+1} - x_k)
    and t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2."""
    net = PAFRNet().eval()  # p = a = 1
    state = net.init_state(6)
    state["t"] = torch.full((6,), 3.0)
    # a step on from x = 1, y = 2 for both instances: no restart
    x = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])
    g = torch.tensor([[-1.0, -1.0, -1.0], [-3.0, -3.0, -3.0]])
    with use_fused(False), torch.no_grad():
        xs, ys, new = pafr_update(net, copy.deepcopy(state), [y], [g], [x], lr=1.0, prox="none", instance_dims=1)
    # x+ = y - g: 3 and 5, (y - x+)(x+ - x) < 0 for both
    assert torch.equal(xs[0], torch.tensor([[3.0] * 3, [5.0] * 3]))
    t1 = (1 + 37 ** 0.5) / 2
    torch.testing.assert_close(ys[0], xs[0] + (2 / t1) * (xs[0] - x))
    # instance 0 now overshoots: x+ = y - g lands behind y, between x and y
    g2 = torch.tensor([[0.5, 0.5, 0.5], [-1.0, -1.0, -1.0]])
    with use_fused(False), torch.no_grad():
        xs2, ys2, new2 = pafr_update(net, copy.deepcopy(state), [y], [g2], [x], lr=1.0, prox="none",
                                     instance_dims=1)
    # instance 0: x+ = 1.5, (y - x+)(x+ - x) = 0.5 * 0.5 > 0: restart; instance 1: x+ = 3, no restart
    assert torch.equal(ys2[0][0], xs2[0][0]) and torch.equal(new2["t"][:3], torch.ones(3))
    torch.testing.assert_close(new2["t"][3:], torch.full((3,), t1))
    torch.testing.assert_close(ys2[0][1], xs2[0][1] + (2 / t1) * (xs2[0][1] - x[1]))


def test_meta_gradient_flows_through_the_update():
    """Out of place under autograd (the meta-training unroll) the heads get gradients."""
    net = pafr_net()
    prob = _problem(torch.float32)
    s = prob.step_size().float()
    x = torch.zeros(4, 80)
    xs, ys, state = [x], [x], net.init_state(320)
    for k in range(5):
        y = ys[0].requires_grad_(True) if not ys[0].requires_grad else ys[0]
        g = torch.autograd.grad(prob.smooth(y).sum(), y, create_graph=False)[0]
        xs, ys, state = pafr_update(net, state, [y], [g], xs, lr=s, prox="l1", params={"lam": 0.1}, step=k,
                                    instance_dims=1)
    prob.objective(xs[0]).sum().backward()
    assert net.heads.p.weight.grad.abs().sum() > 0 and net.heads.a.weight.grad.abs().sum() > 0
