"""Fused learned steps: one dispatcher, the update functions' PyTorch code as the reference.

A learned update (:mod:`torch_l2o.optim.functional`) run without autograd may be served whole
by a *fused step backend*: features, network, prox-gradient step and extrapolation in
one pass that reads each coordinate's state, ``g``, ``y`` and ``x`` once and writes
them once (the Triton kernels of :mod:`torch_l2o.kernels.triton_learned` on CUDA, a
compiled path on CPU). Backends are tried in order; each may decline a call (return
``None``: a network, device, dtype, prox or shape it does not handle), and the update
function's own PyTorch code, which defines the result, runs it then. Backends step in
place and without autograd: meta-training's differentiable unroll always runs the
reference; out-of-place calls without autograd (the safeguard's proposals,
``meta_train``'s validation through :func:`torch_l2o.meta.evaluate`) are stepped on copies
(:func:`fused_update`).

A backend is ``fn(kind, net, state, ys, gs, xs, *, lr, prox, params, step, instance_dims)
-> state | None`` with ``kind`` the update's name (``"pa"``, ``"dm"``, ``"rnnprop"``) and
``instance_dims`` the leading dims that index instances (per-instance input scales of the
PA networks' ``inputs="scaled"``): it writes ``x_{k+1}``
into ``xs`` and ``y_{k+1}`` into ``ys`` (for ``"dm"`` and ``"rnnprop"``, whose ``xs`` are
the ``ys``, the new iterate into ``ys``) and returns the new network state, which may
reuse the storage of ``state``.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["fused_step", "fused_update", "register_step_backend", "step_backends", "use_fused", "requested", "kernel_prox",
           "lr_operands", "input_scales", "step_constants", "packed_weights"]

State = dict[str, Tensor]
StepBackend = Callable[..., Optional[State]]

_BACKENDS: list[tuple[str, StepBackend]] = []
_ENABLED = True


def register_step_backend(name: str, fn: StepBackend | None) -> None:
    """Add (or with ``fn=None`` remove) a backend, tried before those registered earlier."""
    _BACKENDS[:] = [(n, f) for n, f in _BACKENDS if n != name]
    if fn is not None:
        _BACKENDS.insert(0, (name, fn))


def step_backends() -> list[str]:
    """Registered backends, in the order they are tried (the reference comes last)."""
    return [n for n, _ in _BACKENDS] + ["reference"]


class use_fused:
    """``with use_fused(False):`` runs every learned step through the PyTorch reference
    (parity tests, benchmarks of the unfused path); ``use_fused("triton")`` tries only
    that backend, and lets the Triton one take CPU tensors under ``TRITON_INTERPRET=1``
    (tests: the interpreter is far too slow to be picked by default). Also a plain
    call that sets the default and returns the previous one (``.prev``)."""

    def __init__(self, enabled: bool | str = True) -> None:
        global _ENABLED
        if not isinstance(enabled, (bool, str)):
            raise TypeError(f"use_fused takes True, False or a backend's name, got {enabled!r}")
        if isinstance(enabled, str) and enabled not in step_backends():
            raise ValueError(f"unknown fused-step backend {enabled!r}; registered: {step_backends()}")
        self.prev, _ENABLED = _ENABLED, enabled

    def __enter__(self) -> "use_fused":
        return self

    def __exit__(self, *exc) -> None:
        global _ENABLED
        _ENABLED = self.prev


def requested() -> str | None:
    """The backend named by :class:`use_fused`, if one is."""
    return _ENABLED if isinstance(_ENABLED, str) else None


def fused_update(kind: str, net, state: State, ys: Sequence[Tensor], gs: Sequence[Tensor], xs: Sequence[Tensor],
                 *, inplace: bool, **kw) -> tuple[list[Tensor], list[Tensor], State] | None:
    """``(xs+, ys+, state+)`` if a backend took the step, else ``None``. In place it writes
    ``xs`` and ``ys``; out of place without autograd (the safeguard's proposals, validation
    rollouts) a backend steps copies of ``ys``, ``xs`` and the state (a memory pass each,
    against the reference's network: PA-MR's fused step is 9x faster at 16,000
    coordinates). The copies are made before the backends are asked, so a call they all
    decline (Triton's interpreter, a bf16 state, a prox they do not know) pays them for
    nothing: a pass over the state, small beside the reference's network."""
    extrapolates = kind == "pa"  # the PA kernels write x and y; "dm" and "rnnprop" write ys only
    if not inplace:
        if _ENABLED is False or _ENABLED == "reference" or not _BACKENDS or torch.is_grad_enabled():
            return None
        ys = [y.clone() for y in ys]
        # separate copies even where a caller passes x_k and y_k as one tensor (a rollout's first step)
        xs = [x.clone() for x in xs] if extrapolates else ys
        state = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}
    new = fused_step(kind, net, state, ys, gs, xs, **kw)
    if new is None:
        return None
    return list(xs if extrapolates else ys), list(ys), new


def fused_step(kind: str, net, state: State, ys: Sequence[Tensor], gs: Sequence[Tensor], xs: Sequence[Tensor], *,
               lr: Any, prox: str, params: Mapping[str, Any] | None, step: int, instance_dims: int = 0
               ) -> State | None:
    """The new state if a backend took the in-place step, else ``None`` (run the reference)."""
    if _ENABLED is False or _ENABLED == "reference" or not _BACKENDS:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*ys, *gs, *xs)):
        return None
    for name, fn in _BACKENDS:
        if isinstance(_ENABLED, str) and name != _ENABLED:
            continue
        out = fn(kind, net, state, ys, gs, xs, lr=lr, prox=prox, params=params, step=step,
                 instance_dims=instance_dims)
        if out is not None:
            return out
    return None


# ---------------------------------------------------------------- what every backend needs


def kernel_prox(prox: str, params: Mapping[str, Any] | None, tensors: bool = False
                ) -> tuple[int, float | Tensor, float | Tensor] | None:
    """``(code, s0, s1)`` of a prox the kernels know (:data:`~torch_l2o.prox.KERNEL_PROX`)
    with numeric strengths (``tensors``: or tensor strengths, returned as they are, for a
    backend that takes them), unused slots 0; ``None`` for anything else (the reference
    then runs it, and raises its own error for a bad one)."""
    from ..prox import KERNEL_PROX, get_prox

    try:
        spec = get_prox(prox)
    except ValueError:
        return None
    params = dict(params or {})
    if spec.kernel is None or set(params) - set(KERNEL_PROX[spec.name]):
        return None
    strengths = [params.get(k, spec.defaults[k]) for k in KERNEL_PROX[spec.name]]
    if not all((isinstance(v, (int, float)) and not isinstance(v, bool)) or (tensors and isinstance(v, Tensor))
               for v in strengths):
        return None
    s0, s1 = [v if isinstance(v, Tensor) else float(v) for v in strengths] + [0.0] * (2 - len(strengths))
    return spec.kernel, s0, s1


def prox_strengths(prox: str, params: Mapping[str, Any] | None, ys: Sequence[Tensor]
                   ) -> tuple[int, list[list[tuple[float, Tensor | None, int]]]] | None:
    """The kernels' prox code and, per tensor of ``ys``, its two strength slots as
    ``(number, tensor or None, divisor)``: a number, or a tensor of the iterates' dtype and
    device that broadcasts as a prefix of the tensor (one per instance ``(B, 1)``, one per
    coordinate): a LASSO path's ``lam`` per instance, an unpenalized intercept. ``None``
    declines. A strength of another dtype declines: the reference computes in the promoted
    dtype, and holding must round as it does."""
    from .triton_step import broadcast_divisor

    code = kernel_prox(prox, params, tensors=True)
    if code is None:
        return None
    per_tensor = []
    for y in ys:
        slots = []
        for s in code[1:]:
            if not isinstance(s, Tensor):
                slots.append((s, None, 1))
                continue
            if s.device != y.device or s.dtype != y.dtype or s.requires_grad:
                return None
            s = s.contiguous()
            div = broadcast_divisor(s, y)
            if div is None:
                return None
            slots.append((0.0, s, div))
        per_tensor.append(slots)
    return code[0], per_tensor


def lr_operands(lr: Any, ys: Sequence[Tensor], dtype: torch.dtype | None = None
                ) -> list[tuple[Tensor | None, int, float]] | None:
    """Per tensor ``(lr tensor or None, its broadcast divisor, scalar lr)``: a number, or a
    tensor on the tensor's device that broadcasts as a prefix (``(B, 1)``), cast to
    ``dtype`` when given; ``None`` if any cannot be served."""
    from .triton_step import broadcast_divisor

    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(ys)
    if len(lrs) != len(ys):
        return None
    out = []
    for s, y in zip(lrs, ys):
        if isinstance(s, Tensor):
            if s.device != y.device:
                return None
            s = s.detach().to(dtype).contiguous() if dtype is not None else s.detach().contiguous()
            div = broadcast_divisor(s, y)
            if div is None:
                return None
            out.append((s, div, 1.0))
        elif isinstance(s, (int, float)) and not isinstance(s, bool):
            out.append((None, 1, float(s)))
        else:
            return None
    return out


def input_scales(kind: str, net, ys: Sequence[Tensor], gs: Sequence[Tensor], lr: Any,
                 instance_dims: int) -> list[Tensor | None]:
    """Per tensor, ``1 / sigma`` per instance (contiguous float32) for a PA network on
    scale-free inputs, by the reference's own reduction; ``None`` for any other network."""
    if kind != "pa" or getattr(net, "inputs", "raw") != "scaled":
        return [None] * len(ys)
    from ..optim.functional import pa_input_scale

    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(ys)
    return [pa_input_scale(y, g, s, instance_dims).contiguous() for y, g, s in zip(ys, gs, lrs)]


def step_constants(kind: str, net, step: int) -> tuple[float, float, float]:
    """The per-step constants of the update: L2O-DM's preprocessing ``(p, e^-p, e^p)``,
    RNNProp's bias corrections ``1 - 0.95^(k+1)`` (its default betas: ``fused_step`` is
    only asked with those)."""
    if kind == "dm":
        p = float(net.preprocess)
        return p, math.exp(-p), math.exp(p)
    if kind == "rnnprop":
        return 1 - 0.95 ** (step + 1), 1 - 0.95 ** (step + 1), 0.0
    return 0.0, 0.0, 0.0


def packed_weights(cache: "weakref.WeakKeyDictionary", net: nn.Module, build: Callable[[nn.Module], Any],
                   extra: Any = (), params: Sequence[Tensor] | None = None) -> Any:
    """``build(net)``, the weights in a kernel's layout, cached in ``cache`` until a
    parameter changes (storage or in-place version: meta-training, ``load_state_dict``).
    ``params``: ``list(net.parameters())`` if the caller has it (walking the modules costs
    ~50 us a step for PA-MR, a third of a small problem's step)."""
    params = net.parameters() if params is None else params
    key = (extra, tuple((p.data_ptr(), p._version) for p in params))
    hit = cache.get(net)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, build(net))
        cache[net] = hit
    return hit[1]
