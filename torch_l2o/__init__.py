"""torch_l2o: learned optimizers for composite problems, as torch.optim optimizers."""

from . import kernels, optim, problems, prox
from .optim import FISTA, ISTA, ProxOptimizer
from .prox import available_prox, get_prox, register_prox

__version__ = "0.1.0"

__all__ = ["FISTA", "ISTA", "ProxOptimizer", "available_prox", "get_prox", "register_prox",
           "kernels", "optim", "problems", "prox"]
