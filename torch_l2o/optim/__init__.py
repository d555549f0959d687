"""The optimizers: ``torch.optim.Optimizer`` subclasses for ``F = f + r``."""

from .base import ProxOptimizer
from .gso import GSO
from .learned import (L2ODM, PA, PAGRU, PAMR, LearnedOptimizer, MathGD, OutputLearnedOptimizer, ProxLearnedOptimizer,
                      RNNProp)
from .proximal import FISTA, ISTA

__all__ = ["ProxOptimizer", "ISTA", "FISTA", "LearnedOptimizer", "ProxLearnedOptimizer", "OutputLearnedOptimizer", "PA",
           "PAGRU", "PAMR", "L2ODM", "RNNProp", "GSO", "MathGD"]
