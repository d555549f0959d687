"""torch_l2o: learned optimizers for composite problems, as torch.optim optimizers."""

__version__ = "0.1.0"

from . import baselines, kernels, nets, optim, problems, prox, registry  # noqa: E402
from . import architectures  # noqa: E402,F401  (registers the built-in architectures)
from . import meta  # noqa: E402
from .meta import meta_train  # noqa: E402
from .optim import (FISTA, GSO, ISTA, L2ODM, PA, PAGRU, PAMR, LearnedOptimizer, MathGD,  # noqa: E402
                    OutputLearnedOptimizer, ProxLearnedOptimizer, ProxOptimizer, RNNProp)
from .prox import available_prox, get_prox, register_prox  # noqa: E402
from .solver import ConvergenceWarning, SolveResult, solve  # noqa: E402
from .registry import (Architecture, available_architectures, get_architecture, register_architecture,  # noqa: E402
                       unregister_architecture)

__all__ = [
    "FISTA", "ISTA", "GSO", "MathGD", "PA", "PAGRU", "PAMR", "L2ODM", "RNNProp", "LearnedOptimizer",
    "ProxLearnedOptimizer", "OutputLearnedOptimizer", "ProxOptimizer", "meta_train", "solve", "SolveResult",
    "ConvergenceWarning", "Architecture",
    "register_architecture", "unregister_architecture", "get_architecture", "available_architectures", "available_prox", "get_prox",
    "register_prox", "baselines", "kernels", "meta", "nets", "optim", "problems", "prox", "registry",
]
