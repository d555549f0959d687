"""The prox registry: every non-smooth term ``r`` torch_l2o knows, by name.

A composite objective is ``F(x) = f(x) + r(x)``: ``f`` is the user's smooth loss
(what autograd differentiates) and ``r`` is named here, with its strengths. Each
entry gives

* ``prox(z, t, **params)``: ``argmin_u r(u) + sum_i (u_i - z_i)^2 / (2 t_i)``, where
  the step ``t`` is a scalar or a tensor that broadcasts against ``z`` (per
  coordinate, or per instance such as ``(B, 1)`` for a ``(B, n)`` iterate);
* ``value(x, **params)``: ``r(x)`` summed over the whole tensor (``inf`` outside
  the domain of an indicator);
* ``kernel``: the code of the entry in the fused Triton kernel (its position in
  :data:`KERNEL_PROX`), or ``None`` when only the PyTorch reference path serves it.

Users add their own with :func:`register_prox`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

__all__ = [
    "ProxSpec",
    "register_prox",
    "get_prox",
    "available_prox",
    "prox_value",
]

# The prox terms the fused kernel (torch_l2o.kernels) implements: name -> the
# strengths it reads, in the order of the kernel's strength slots. Declared once
# here: an entry's code is its position, and the built-ins' ``ProxSpec.kernel``,
# the kernel's branch codes and the op's strength slots all derive from this table.
KERNEL_PROX: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "none": (),
    "l1": ("lam",),
    "nonneg": (),
    "nonneg_l1": ("lam",),
    "elastic_net": ("lam", "lam2"),
    "l2sq": ("lam",),
    "box": ("lo", "hi"),
})
KERNEL_CODES: Mapping[str, int] = MappingProxyType({name: code for code, name in enumerate(KERNEL_PROX)})
KERNEL_SLOTS = max(map(len, KERNEL_PROX.values()))  # strength arguments of the kernel


@dataclass(frozen=True)
class ProxSpec:
    """One registered non-smooth term: its prox, its value and its strengths."""

    name: str
    prox: Callable[..., Tensor]
    value: Callable[..., Tensor]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    kernel: int | None = None
    validate: Callable[[dict], None] | None = None
    # Built-ins reduce over trailing dimensions themselves; user values are vmapped.
    batched_value: bool = False
    doc: str = ""

    def resolve(self, params: Mapping[str, Any] | None = None) -> dict:
        """Merge ``params`` with the defaults and check them; returns a new dict."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            accepted = ", ".join(self.defaults) or "none"
            raise ValueError(
                f"prox {self.name!r} takes no parameter {', '.join(map(repr, unknown))}; "
                f"it accepts: {accepted}"
            )
        out = {**self.defaults, **params}
        if self.validate is not None:
            self.validate(out)
        return out

    def __call__(self, z: Tensor, t: float | Tensor, **params: Any) -> Tensor:
        return self.prox(z, t, **params)

    def r(self, x: Tensor, batch_dims: int = 0, **params: Any) -> Tensor:
        """``r(x)``: a scalar, or one value per instance over the first ``batch_dims`` dims."""
        if self.batched_value:
            return self.value(x, batch_dims=batch_dims, **params)
        fn = lambda u: self.value(u, **params)  # noqa: E731
        for _ in range(batch_dims):
            fn = torch.vmap(fn)
        return fn(x)


_REGISTRY: dict[str, ProxSpec] = {}


def available_prox() -> list[str]:
    """Names of every registered prox, built-in and user-registered."""
    return sorted(_REGISTRY)


def get_prox(name: str | ProxSpec) -> ProxSpec:
    """The registered entry ``name``; an unknown name lists the registered ones."""
    if isinstance(name, ProxSpec):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown prox {name!r}; registered: {', '.join(available_prox())}. "
            "Add your own with torch_l2o.register_prox(name, prox, value)."
        ) from None


def prox_value(name: str, x: Tensor, batch_dims: int = 0, **params: Any) -> Tensor:
    """``r(x)`` for the registered prox ``name`` with strengths ``params``."""
    spec = get_prox(name)
    return spec.r(x, batch_dims, **spec.resolve(params))


def register_prox(
    name: str,
    prox: Callable[..., Tensor],
    value: Callable[..., Tensor],
    *,
    defaults: Mapping[str, Any] | None = None,
    validate: Callable[[dict], None] | None = None,
    overwrite: bool = False,
) -> ProxSpec:
    """Register a non-smooth term so optimizers accept ``prox=name``.

    Args:
        name: the name users pass as ``prox=``.
        prox: ``prox(z, t, **params) -> Tensor``, the proximal map of ``t * r``
            (``t`` a scalar or a tensor broadcasting against ``z``).
        value: ``value(x, **params) -> Tensor``, ``r(x)`` as a scalar.
        defaults: the strengths it accepts and their defaults; by default read from
            the keyword parameters of ``prox`` after ``(z, t)``.
        validate: called with the resolved strengths; raise ``ValueError`` on bad ones.
        overwrite: replace an existing entry of the same name.

    Registered terms run on the PyTorch reference path (the fused kernel knows only
    the built-in elementwise ones).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"prox name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"prox {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(prox) or not callable(value):
        raise TypeError("register_prox needs callables prox(z, t, **params) and value(x, **params)")
    if defaults is None:
        sig = inspect.signature(prox)
        defaults = {
            k: p.default
            for k, p in list(sig.parameters.items())[2:]
            if p.default is not inspect.Parameter.empty
        }
    spec = ProxSpec(name, prox, value, dict(defaults), None, validate, False, prox.__doc__ or "")
    _REGISTRY[name] = spec
    return spec


def _builtin(name: str, defaults: dict, validate=None):
    kernel = KERNEL_CODES.get(name)
    # The kernel reads exactly its declared strengths: an undeclared one would be ignored.
    if kernel is not None and set(KERNEL_PROX[name]) != set(defaults):
        raise ValueError(f"KERNEL_PROX[{name!r}] is {KERNEL_PROX[name]}, the prox takes {tuple(defaults)}")

    def deco(cls):
        spec = ProxSpec(name, cls.prox, cls.value, defaults, kernel, validate, True, cls.__doc__ or "")
        _REGISTRY[name] = spec
        return cls

    return deco


# ---------------------------------------------------------------- validation


def _check_strength(params: dict, key: str) -> None:
    v = params[key]
    if isinstance(v, Tensor):
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise ValueError(f"{key} must be finite and >= 0 everywhere")
        return
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"{key} must be a number or a tensor, got {type(v).__name__}")
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{key} must be finite and >= 0, got {v}; the strength of r is lam >= 0")


def _check_lam(params: dict) -> None:
    _check_strength(params, "lam")


def _check_elastic(params: dict) -> None:
    _check_strength(params, "lam")
    _check_strength(params, "lam2")


def _check_box(params: dict) -> None:
    lo, hi = params["lo"], params["hi"]
    for k, v in (("lo", lo), ("hi", hi)):
        if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)):
            raise TypeError(f"box bound {k} must be a number or a tensor, got {type(v).__name__}")
        if not isinstance(v, Tensor) and math.isnan(v):
            raise ValueError(f"box bound {k} is NaN")
    bad = (lo > hi) if not isinstance(lo, Tensor) and not isinstance(hi, Tensor) else bool(
        torch.as_tensor(lo > hi).any()
    )
    if bad:
        raise ValueError(f"box needs lo <= hi, got lo={lo}, hi={hi}")


def _check_group(params: dict) -> None:
    _check_strength(params, "lam")
    d = params["dim"]
    if isinstance(d, bool) or not (
        isinstance(d, int) or (isinstance(d, tuple) and d and all(isinstance(i, int) for i in d))
    ):
        raise TypeError(f"group_l1 dim must be an int or a tuple of ints, got {d!r}")


# ---------------------------------------------------------------- helpers


def _weighted_sum(lam: float | Tensor, v: Tensor, batch_dims: int) -> Tensor:
    """``sum(lam * v)`` over the trailing dims: a per-coordinate ``lam`` tensor weighs each
    entry; a number multiplies the sum (as it always did: the same rounding)."""
    if isinstance(lam, Tensor) and lam.numel() > 1:
        return _sum_trailing(lam * v, batch_dims)
    return lam * _sum_trailing(v, batch_dims)


def _sum_trailing(v: Tensor, batch_dims: int) -> Tensor:
    if v.dim() <= batch_dims:
        return v
    return v.sum(dim=tuple(range(batch_dims, v.dim())))


def _indicator(ok: Tensor, x: Tensor, batch_dims: int) -> Tensor:
    """0 where every coordinate (of an instance) satisfies ``ok``, +inf elsewhere."""
    if x.dim() > batch_dims:
        ok = ok.flatten(batch_dims).all(dim=-1) if batch_dims else ok.all()
    zero = torch.zeros(ok.shape, dtype=x.dtype, device=x.device)
    return torch.where(ok, zero, torch.full_like(zero, math.inf))


def soft_threshold(z: Tensor, thr: float | Tensor) -> Tensor:
    """``sign(z) * max(|z| - thr, 0)``, the prox of ``thr * |.|_1``."""
    return torch.sign(z) * torch.clamp(z.abs() - thr, min=0)


# ---------------------------------------------------------------- built-ins


@_builtin("none", {})
class _NoProx:
    """r = 0: plain gradient steps."""

    @staticmethod
    def prox(z, t):
        return z

    @staticmethod
    def value(x, batch_dims=0):
        return x.new_zeros(x.shape[:batch_dims])


@_builtin("l1", {"lam": 0.0}, _check_lam)
class _L1:
    """r(x) = lam * |x|_1; prox: soft-thresholding at t * lam."""

    @staticmethod
    def prox(z, t, lam=0.0):
        return soft_threshold(z, t * lam)

    @staticmethod
    def value(x, batch_dims=0, lam=0.0):
        return _weighted_sum(lam, x.abs(), batch_dims)


@_builtin("nonneg", {})
class _NonNeg:
    """r = indicator of x >= 0; prox: max(z, 0)."""

    @staticmethod
    def prox(z, t):
        return torch.clamp(z, min=0)

    @staticmethod
    def value(x, batch_dims=0):
        return _indicator(x >= 0, x, batch_dims)


@_builtin("nonneg_l1", {"lam": 0.0}, _check_lam)
class _NonNegL1:
    """r(x) = lam * sum(x) + indicator(x >= 0); prox: max(z - t * lam, 0)."""

    @staticmethod
    def prox(z, t, lam=0.0):
        return torch.clamp(z - t * lam, min=0)

    @staticmethod
    def value(x, batch_dims=0, lam=0.0):
        return _weighted_sum(lam, x, batch_dims) + _indicator(x >= 0, x, batch_dims)


@_builtin("elastic_net", {"lam": 0.0, "lam2": 0.0}, _check_elastic)
class _ElasticNet:
    """r(x) = lam * |x|_1 + lam2 / 2 * |x|^2; prox: soft(z, t * lam) / (1 + t * lam2)."""

    @staticmethod
    def prox(z, t, lam=0.0, lam2=0.0):
        return soft_threshold(z, t * lam) / (1 + t * lam2)

    @staticmethod
    def value(x, batch_dims=0, lam=0.0, lam2=0.0):
        return _weighted_sum(lam, x.abs(), batch_dims) + 0.5 * _weighted_sum(lam2, x * x, batch_dims)


@_builtin("l2sq", {"lam": 0.0}, _check_lam)
class _L2Sq:
    """r(x) = lam / 2 * |x|^2 (ridge); prox: z / (1 + t * lam)."""

    @staticmethod
    def prox(z, t, lam=0.0):
        return z / (1 + t * lam)

    @staticmethod
    def value(x, batch_dims=0, lam=0.0):
        return 0.5 * lam * _sum_trailing(x * x, batch_dims)


@_builtin("box", {"lo": -math.inf, "hi": math.inf}, _check_box)
class _Box:
    """r = indicator of lo <= x <= hi; prox: clamp(z, lo, hi)."""

    @staticmethod
    def prox(z, t, lo=-math.inf, hi=math.inf):
        if isinstance(lo, Tensor) or isinstance(hi, Tensor):
            return torch.minimum(torch.maximum(z, torch.as_tensor(lo, dtype=z.dtype, device=z.device)),
                                 torch.as_tensor(hi, dtype=z.dtype, device=z.device))
        return torch.clamp(z, min=lo, max=hi)

    @staticmethod
    def value(x, batch_dims=0, lo=-math.inf, hi=math.inf):
        return _indicator((x >= lo) & (x <= hi), x, batch_dims)


@_builtin("group_l1", {"lam": 0.0, "dim": -1}, _check_group)
class _GroupL1:
    """r(x) = lam * sum over groups of |x_g|_2, a group being a slice along ``dim``.

    With a step ``t`` constant within each group the prox is block soft-thresholding
    ``z * max(1 - t lam / |z_g|, 0)``. With ``t`` varying inside a group (a learned
    per-coordinate step) it is the prox in the metric diag(1/t): ``u = 0`` when
    ``|z/t|_2 <= lam``, else ``u_i = z_i nu / (nu + t_i lam)`` where ``nu = |u|`` is
    the root of ``sum_i z_i^2 / (nu + t_i lam)^2 = 1``, found by Newton's method
    (monotone from ``nu = 0``, the function being convex and decreasing).
    """

    @staticmethod
    def prox(z, t, lam=0.0, dim=-1):
        norm = torch.linalg.vector_norm(z, dim=dim, keepdim=True)
        t_b = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        dims = (dim,) if isinstance(dim, int) else dim
        t_shape = (1,) * (z.dim() - t_b.dim()) + tuple(t_b.shape)
        uniform = all(t_shape[d] == 1 for d in dims)
        if uniform:
            scale = torch.clamp(1 - t_b * lam / torch.clamp(norm, min=torch.finfo(z.dtype).tiny), min=0)
            return z * scale
        t_b = t_b.expand_as(z)
        tl_ = t_b * lam
        zero = torch.linalg.vector_norm(z / t_b, dim=dim, keepdim=True) <= lam
        nu = torch.zeros_like(norm)
        z2 = z * z
        for _ in range(60):
            d = nu + tl_
            h = (z2 / d**2).sum(dim=dim, keepdim=True) - 1
            dh = (-2 * z2 / d**3).sum(dim=dim, keepdim=True)
            step = torch.where(zero, torch.zeros_like(h), h / dh)
            nu = torch.clamp(nu - step, min=0)
        out = z * nu / (nu + tl_)
        return torch.where(zero, torch.zeros_like(out), out)

    @staticmethod
    def value(x, batch_dims=0, lam=0.0, dim=-1):
        return lam * _sum_trailing(torch.linalg.vector_norm(x, dim=dim, keepdim=True), batch_dims)


@_builtin("nuclear", {"lam": 0.0}, _check_lam)
class _Nuclear:
    """r(X) = lam * sum of singular values of each matrix (the last two dims).

    Prox: singular-value soft-thresholding ``U soft(S, t lam) V^T``. The step must be
    uniform per matrix (a scalar, or shaped ``(..., 1, 1)``): with a per-coordinate
    step the prox has no closed form.
    """

    @staticmethod
    def prox(z, t, lam=0.0):
        if z.dim() < 2:
            raise ValueError(f"prox 'nuclear' needs matrices (at least 2-D), got shape {tuple(z.shape)}")
        if isinstance(t, Tensor) and t.dim() >= 2 and (t.shape[-1] != 1 or t.shape[-2] != 1):
            raise ValueError(
                "prox 'nuclear' needs a step that is uniform per matrix (scalar or shaped "
                f"(..., 1, 1)), got a step of shape {tuple(t.shape)}; a per-coordinate step "
                "has no closed-form nuclear prox"
            )
        u, s, vh = torch.linalg.svd(z, full_matrices=False)
        if isinstance(t, Tensor) and t.dim() >= 2:
            t = t[..., 0]  # (..., 1): broadcasts against s
        s = torch.clamp(s - t * lam, min=0)
        return (u * s.unsqueeze(-2)) @ vh

    @staticmethod
    def value(x, batch_dims=0, lam=0.0):
        if x.dim() < 2:
            raise ValueError(f"nuclear norm needs matrices, got shape {tuple(x.shape)}")
        return lam * _sum_trailing(torch.linalg.svdvals(x), batch_dims)


def _check_simplex(params: dict) -> None:
    d = params["dim"]
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"simplex dim must be an int, got {d!r}")
    _check_strength({"radius": params["radius"]}, "radius")
    if params["radius"] == 0:
        raise ValueError("simplex radius must be > 0")


@_builtin("simplex", {"dim": -1, "radius": 1.0}, _check_simplex)
class _Simplex:
    """r = indicator of the simplex {x >= 0, sum x = radius} along ``dim`` (mixture weights).

    Prox: the Euclidean projection (Duchi, Shalev-Shwartz, Singer, Chandra 2008; sort
    based), whatever the step. Its value allows a rounding slack of 1e-6 on the sum.
    """

    @staticmethod
    def prox(z, t, dim=-1, radius=1.0):
        zt = z.movedim(dim, -1)
        u, _ = torch.sort(zt, dim=-1, descending=True)
        css = u.cumsum(-1) - radius
        k = torch.arange(1, zt.shape[-1] + 1, device=z.device, dtype=z.dtype)
        rho = ((u - css / k) > 0).sum(-1, keepdim=True).clamp(min=1)
        theta = css.gather(-1, rho - 1) / rho.to(z.dtype)
        return torch.clamp(zt - theta, min=0).movedim(-1, dim)

    @staticmethod
    def value(x, batch_dims=0, dim=-1, radius=1.0):
        ok = (x >= 0) & ((x.sum(dim, keepdim=True) - radius).abs() <= 1e-6 * max(1.0, radius) * x.shape[dim])
        return _indicator(ok, x, batch_dims)
