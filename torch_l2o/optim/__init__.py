"""The optimizers: ``torch.optim.Optimizer`` subclasses for ``F = f + r``."""

from .base import ProxOptimizer
from .gso import GSO
from .learned import L2ODM, PA, PAGRU, PAMR, LearnedOptimizer, MathGD, RNNProp
from .proximal import FISTA, ISTA

__all__ = ["ProxOptimizer", "ISTA", "FISTA", "LearnedOptimizer", "PA", "PAGRU", "PAMR", "L2ODM", "RNNProp", "GSO", "MathGD"]
