"""The problem-family protocol: what a learned optimizer is trained and tested on.

A :class:`ProblemFamily` samples a :class:`Problem`, a batch of ``B`` independent
instances of ``min_x f(x) + r(x)`` with ``x`` of shape ``(B, n)``. A problem gives
the per-instance smooth loss ``f`` (what autograd differentiates), the per-instance
Lipschitz constant of its gradient, the prox name and strengths of ``r``, and the
starting point.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from ..prox import get_prox

__all__ = ["TensorFields", "Problem", "ProblemFamily", "mean_relative_error", "optimal_values"]


class TensorFields:
    """For dataclasses of batch-first tensors: cast or move them all, or slice instances."""

    def to(self, *args, **kwargs):
        """A copy with every tensor field moved or cast (``.to(torch.float64)``); integer
        tensors (labels, masks of indices) are only moved."""
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                changes[f.name] = v.to(*args, **kwargs) if v.is_floating_point() else v.to(
                    *[a for a in args if not isinstance(a, torch.dtype)],
                    **{k: w for k, w in kwargs.items() if k != "dtype"},
                )
        return replace(self, **changes)

    def __getitem__(self, idx):
        """The instances ``idx`` (a slice or an index tensor) as a smaller problem."""
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})


@dataclass
class Problem(TensorFields):
    """A batch of instances of ``F(x) = f(x) + r(x)``; subclasses define :meth:`smooth`.

    Tensor fields hold the data, batch first. ``lipschitz`` has shape ``(B,)``.
    """

    prox: str = field(default="none", kw_only=True)
    prox_params: dict[str, Any] = field(default_factory=dict, kw_only=True)

    # -- to define
    def smooth(self, x: Tensor) -> Tensor:
        """``f(x)`` for ``x`` of shape ``(B, n)``: one value per instance, shape ``(B,)``."""
        raise NotImplementedError

    @property
    def lipschitz(self) -> Tensor:
        """The Lipschitz constant of ``grad f``, per instance, shape ``(B,)``."""
        raise NotImplementedError

    @property
    def dim(self) -> int:
        """``n``, the number of unknowns per instance."""
        raise NotImplementedError

    # -- derived
    def _data(self) -> Tensor:
        return next(getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor))

    @property
    def batch(self) -> int:
        return int(self._data().shape[0])

    def x0(self) -> Tensor:
        """The starting point, zeros of shape ``(B, n)``."""
        ref = self._data()
        return torch.zeros(self.batch, self.dim, dtype=ref.dtype, device=ref.device)

    @property
    def dtype(self) -> torch.dtype:
        return self._data().dtype

    def regularizer(self, x: Tensor) -> Tensor:
        """``r(x)`` per instance, shape ``(B,)``."""
        spec = get_prox(self.prox)
        return spec.r(x, 1, **spec.resolve(self.prox_params))

    def objective(self, x: Tensor) -> Tensor:
        """``F(x) = f(x) + r(x)`` per instance, shape ``(B,)``."""
        return self.smooth(x) + self.regularizer(x)

    def grad(self, x: Tensor) -> Tensor:
        """``grad f(x)``, by autograd unless a subclass knows it in closed form."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.smooth(x).sum(), x)
        return g

    def optimal_value(self) -> Tensor | None:
        """``F*`` per instance when it is known in closed form (else ``None``: use
        :func:`~torch_l2o.problems.reference_solve`)."""
        return None

    def step_size(self) -> Tensor:
        """``0.9999 / L`` per instance, shaped ``(B, 1)`` as optimizers take it."""
        return (0.9999 / self.lipschitz).unsqueeze(-1)


class ProblemFamily:
    """A distribution over problems; subclasses define :meth:`sample`."""

    def sample(self, batch: int, *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Problem:
        """``batch`` fresh instances. Drawn on the CPU from ``generator``, so a seed gives
        the same instances on every device, then moved to ``device``."""
        raise NotImplementedError


def mean_relative_error(F: Tensor, F_star: Tensor) -> Tensor:
    """The benchmark metric: mean over instances of ``(F(x_k) - F*) / F*``, in float64;
    where ``F* = 0`` (a consistent least-squares problem, say) the gap ``F(x_k)`` itself."""
    F, F_star = F.double(), F_star.double().to(F.device)
    scale = torch.where(F_star != 0, F_star.abs(), torch.ones_like(F_star))
    return ((F - F_star) / scale).mean()


def optimal_values(problem: Problem) -> Tensor:
    """``F*`` per instance: known in closed form, or from the float64 reference solver."""
    known = problem.optimal_value()
    if known is not None:
        return known.double()
    from .solve import reference_solve

    return reference_solve(problem).F
