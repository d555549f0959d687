"""The optimizers: ``torch.optim.Optimizer`` subclasses for ``F = f + r``."""

from .base import ProxOptimizer
from .proximal import FISTA, ISTA

__all__ = ["ProxOptimizer", "ISTA", "FISTA"]
