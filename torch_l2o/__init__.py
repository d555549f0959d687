"""torch_l2o: learned optimizers for composite problems, as torch.optim optimizers."""

__version__ = "0.1.0"

from . import kernels, meta, nets, optim, problems, prox  # noqa: E402
from .meta import meta_train  # noqa: E402
from .optim import (FISTA, GSO, ISTA, L2ODM, PA, PAGRU, PAMR, LearnedOptimizer, MathGD,  # noqa: E402
                    ProxOptimizer, RNNProp)
from .prox import available_prox, get_prox, register_prox  # noqa: E402

__all__ = [
    "FISTA", "ISTA", "GSO", "MathGD", "PA", "PAGRU", "PAMR", "L2ODM", "RNNProp", "LearnedOptimizer", "ProxOptimizer",
    "meta_train", "available_prox", "get_prox", "register_prox", "kernels", "nets", "optim", "problems", "prox",
]
