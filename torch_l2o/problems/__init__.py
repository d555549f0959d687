"""Problem families: batches of composite problems (single- or multi-block), their metric and
reference solver."""

from .base import Problem, ProblemBase, ProblemFamily, matvec, mean_relative_error, relative_gap, rmatvec
from .families import (LeastSquares, LeastSquaresProblem, Lasso, LassoProblem, LogisticL1, LogisticProblem, MLPFamily,
                       MLPProblem)
from .mixture import LassoMixture, LogisticMixture
from .multiblock import BlockFamily, BlockProblem, GaussianMixture, GaussianMixtureProblem, MatrixCompletion, MatrixCompletionProblem
from .real import image_patch_lasso, sklearn_logistic, uci_logistic
from .solve import Solution, gradient_mapping, kkt_residual, optimal_values, reference_solve

__all__ = [
    "ProblemBase", "Problem", "ProblemFamily", "mean_relative_error", "relative_gap", "optimal_values", "matvec", "rmatvec",
    "LeastSquares", "LeastSquaresProblem", "Lasso", "LassoProblem", "LogisticL1", "LogisticProblem", "MLPFamily", "MLPProblem",
    "LassoMixture", "LogisticMixture", "Solution", "kkt_residual", "gradient_mapping", "reference_solve",
    "image_patch_lasso", "uci_logistic", "sklearn_logistic",
    "BlockFamily", "BlockProblem", "MatrixCompletion", "MatrixCompletionProblem", "GaussianMixture",
    "GaussianMixtureProblem",
]
