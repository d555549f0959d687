"""Cases shared by several test modules: prox strengths given as tensors (the layouts a user
meets), a PA-FR network away from its start."""

import torch

from torch_l2o.nets import PAFRNet

STRENGTHS = ["l1, lam per instance", "l1, lam per coordinate, an unpenalized one",
             "elastic_net, lam per coordinate, lam2 per instance", "box, bounds per instance"]


def tensor_strengths(variant, shape, dtype, device="cpu"):
    """``(prox, params)`` with the strengths of ``variant`` as tensors for iterates of ``shape``."""
    gen = torch.Generator().manual_seed(8)
    per_instance = lambda lo, hi: (lo + (hi - lo) * torch.rand(shape[0], 1, generator=gen)).to(device, dtype)  # noqa: E731
    per_coordinate = lambda: (0.2 * torch.rand(shape, generator=gen)).to(device, dtype)  # noqa: E731
    if variant == "l1, lam per instance":
        return "l1", {"lam": per_instance(0.02, 0.3)}
    if variant == "l1, lam per coordinate, an unpenalized one":
        lam = per_coordinate()
        lam[:, -1] = 0.0
        return "l1", {"lam": lam}
    if variant == "elastic_net, lam per coordinate, lam2 per instance":
        return "elastic_net", {"lam": per_coordinate(), "lam2": per_instance(0.1, 1.0)}
    if variant == "box, bounds per instance":
        return "box", {"lo": per_instance(-0.8, -0.1), "hi": per_instance(0.1, 0.9)}
    raise AssertionError(variant)


def pafr_net(seed=0):
    """A PA-FR network whose heads are away from their start (p, a not 1)."""
    torch.manual_seed(seed)
    net = PAFRNet().eval()
    for lin in (net.heads.p, net.heads.a):
        torch.nn.init.normal_(lin.weight, std=0.5)
        torch.nn.init.normal_(lin.bias, std=0.3)
    return net
