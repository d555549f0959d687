"""The problem protocol: what a learned optimizer is trained and tested on.

A :class:`ProblemFamily` samples a :class:`ProblemBase`: a batch of ``B`` independent
instances of ``min F(x_1, ..., x_m) = f(x_1, ..., x_m) + sum_b r_b(x_b)``, each block
``x_b`` a tensor ``(B, ...)`` and each ``r_b`` named by a registered prox. A problem
gives the per-instance smooth loss ``f`` (what autograd differentiates), the starting
point and each block's prox.

:class:`Problem` is the single-block convex case, ``x`` of shape ``(B, n)``, with the
per-instance Lipschitz constant of ``grad f`` that step sizes come from; the
multi-block families subclass :class:`~torch_l2o.problems.BlockProblem`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..prox import prox_value

__all__ = ["TensorFields", "ProblemBase", "Problem", "ProblemFamily", "mean_relative_error", "relative_gap", "matvec",
           "rmatvec"]


def matvec(M: Tensor, x: Tensor) -> Tensor:
    """``M x`` per instance: ``M`` of shape ``(B, m, n)``, ``x`` of ``(B, n)``, result ``(B, m)``.

    Computed as the row vector ``x^T M^T``, not as ``einsum("bmn,bn->bm")`` (a matrix times
    a column): on a CPU torch's batched product of a matrix by a column ran 3-11x slower than
    by a row (MKL on AMD Zen 4, one thread: 9.1 against 3.2 ms at 64 x 250 x 500, 18 against
    4.0 ms at 8 x 1000 x 2000), and autograd's backward of this form is again a row product,
    ``g^T M``. The same numbers up to summation order.
    """
    return torch.bmm(x.unsqueeze(1), M.mT).squeeze(1)


def rmatvec(M: Tensor, r: Tensor) -> Tensor:
    """``M^T r`` per instance: ``M`` of shape ``(B, m, n)``, ``r`` of ``(B, m)``, result ``(B, n)``
    (the row vector ``r^T M``; see :func:`matvec`)."""
    return torch.bmm(r.unsqueeze(1), M).squeeze(1)


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


class ProblemBase(TensorFields):
    """A batch of ``B`` instances of ``F = f(x_1, ..., x_m) + sum_b r_b(x_b)``; subclasses
    (dataclasses of batch-first tensors) define ``blocks``, :meth:`smooth`, :meth:`starts`
    and, where some ``r_b`` is not zero, :meth:`block_prox`."""

    blocks: ClassVar[tuple[str, ...]] = ()

    def smooth(self, *xs: Tensor) -> Tensor:
        """``f(x_1, ..., x_m)``, one value per instance, shape ``(B,)``."""
        raise NotImplementedError

    def starts(self) -> list[Tensor]:
        """The starting point: one tensor ``(B, ...)`` per block."""
        raise NotImplementedError

    def block_prox(self) -> list[tuple[str, dict]]:
        """``(prox name, prox params)`` of each block (default: none)."""
        return [("none", {}) for _ in self.blocks]

    def objective(self, *xs: Tensor) -> Tensor:
        """``F = f + sum_b r_b(x_b)`` per instance, shape ``(B,)``."""
        F = self.smooth(*xs)
        for x, (name, params) in zip(xs, self.block_prox(), strict=True):
            F = F + prox_value(name, x, 1, **params)
        return F

    def _data(self) -> Tensor:
        return next(getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor))

    @property
    def batch(self) -> int:
        return int(self._data().shape[0])


@dataclass
class Problem(ProblemBase):
    """A batch of instances of ``F(x) = f(x) + r(x)``, ``x`` of shape ``(B, n)``;
    subclasses define :meth:`smooth`, ``lipschitz`` and ``dim``.

    Tensor fields hold the data, batch first. ``lipschitz`` has shape ``(B,)`` and is
    computed once per problem object (see :meth:`__init_subclass__`).
    """

    prox: str = field(default="none", kw_only=True)
    prox_params: dict[str, Any] = field(default_factory=dict, kw_only=True)

    blocks = ("x",)

    def __init_subclass__(cls, **kwargs):
        """Make a subclass's ``lipschitz`` property a per-object cache: step sizes read it
        on every step, and it costs a batched SVD (or Hessian-vector products). Objects
        made by ``.to()``, slicing or ``dataclasses.replace`` compute their own; mutating a
        problem's tensors in place leaves a computed constant stale."""
        super().__init_subclass__(**kwargs)
        prop = cls.__dict__.get("lipschitz")
        if isinstance(prop, property) and prop.fset is None:
            cached = functools.cached_property(prop.fget)
            cached.__set_name__(cls, "lipschitz")
            cls.lipschitz = cached

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
    def x0(self) -> Tensor:
        """The starting point, zeros of shape ``(B, n)``."""
        ref = self._data()
        return torch.zeros(self.batch, self.dim, dtype=ref.dtype, device=ref.device)

    def starts(self) -> list[Tensor]:
        return [self.x0()]

    def block_prox(self) -> list[tuple[str, dict]]:
        return [(self.prox, self.prox_params)]

    @property
    def dtype(self) -> torch.dtype:
        return self._data().dtype

    def regularizer(self, x: Tensor) -> Tensor:
        """``r(x)`` per instance, shape ``(B,)``."""
        return prox_value(self.prox, x, 1, **self.prox_params)

    def objective(self, x: Tensor) -> Tensor:
        """``F(x) = f(x) + r(x)`` per instance, shape ``(B,)`` (a subclass's own
        :meth:`regularizer` counts)."""
        return self.smooth(x) + self.regularizer(x)

    def grad(self, x: Tensor) -> Tensor:
        """``grad f(x)``, by autograd unless a subclass knows it in closed form."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.smooth(x).sum(), x)
        return g

    def optimal_value(self) -> Tensor | None:
        """``F*`` per instance when it is known in closed form (else ``None``: use
        :func:`~torch_l2o.problems.optimal_values`)."""
        return None

    def step_size(self) -> Tensor:
        """``0.9999 / L`` per instance, shaped ``(B, 1)`` as optimizers take it."""
        return (0.9999 / self.lipschitz).unsqueeze(-1)


class ProblemFamily:
    """A distribution over problems (single- or multi-block); subclasses define :meth:`sample`."""

    def sample(self, batch: int, *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> ProblemBase:
        """``batch`` fresh instances. Drawn on the CPU from ``generator``, so a seed gives
        the same instances on every device, then moved to ``device``."""
        raise NotImplementedError


def relative_gap(F: Tensor, F_star: Tensor) -> Tensor:
    """Per instance ``(F(x_k) - F*) / |F*|`` in ``F``'s dtype (differentiable); where
    ``F* = 0`` (a consistent least-squares problem, say) the gap ``F(x_k)`` itself."""
    scale = torch.where(F_star != 0, F_star.abs(), torch.ones_like(F_star))
    return (F - F_star) / scale


def mean_relative_error(F: Tensor, F_star: Tensor) -> Tensor:
    """The benchmark metric: mean over instances of :func:`relative_gap`, in float64."""
    return relative_gap(F.double(), F_star.double().to(F.device)).mean()

