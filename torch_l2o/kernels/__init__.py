r"""The fused prox-gradient step: dispatcher, ``torch.library`` op, Triton kernel.

.. math::
    t = \mathrm{lr}\, p,\qquad x^+ = \operatorname{prox}_{t r}(y - t\, g),\qquad
    y^+ = x^+ + a\,(x^+ - x)

:func:`prox_grad_step` is the one entry point every optimizer uses. Out of place it
is the differentiable PyTorch reference (meta-training); in place it runs the Triton
kernel for CUDA tensors whose prox the kernel knows, and the reference otherwise.
The kernel is registered as ``torch.ops.torch_l2o.fused_prox_step`` so
``torch.compile`` traces it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ..prox import KERNEL_PROX, get_prox
from .reference import compute_dtype, prox_grad_step_reference, step_size
from .triton_step import HAVE_TRITON, KERNEL_DTYPES, broadcast_divisor, interpret_mode, launch

__all__ = [
    "prox_grad_step",
    "set_cpu_backend",
    "prox_grad_step_reference",
    "compute_dtype",
    "step_size",
    "kernel_supports",
    "HAVE_TRITON",
    "interpret_mode",
]

_KERNEL_NAMES = tuple(KERNEL_PROX)  # code -> name


def _fused_prox_step(
    x: Tensor, y: Tensor, g: Tensor,
    lr: Optional[Tensor], p: Optional[Tensor], a: Optional[Tensor],
    t_scale: float, a_scale: float, kind: int, strengths: list[float],
) -> None:
    """In place on ``x`` and ``y``; ``t = [lr] * t_scale * [p]``, ``a = [a] or a_scale``.

    ``kind`` is a code of :data:`~torch_l2o.prox.KERNEL_PROX` and ``strengths`` the
    values of that entry's strengths, in the order the table gives.
    """
    if not 0 <= kind < len(_KERNEL_NAMES):
        raise ValueError(f"unknown kernel prox code {kind}; the codes are 0..{len(_KERNEL_NAMES) - 1}")
    name = _KERNEL_NAMES[kind]
    if len(strengths) != len(KERNEL_PROX[name]):
        raise ValueError(f"prox {name!r} takes strengths {KERNEL_PROX[name]}, got {len(strengths)} values")
    # Triton's CPU interpreter needs real data: under tracing CPU tensors take the reference.
    runnable = y.is_cuda or (interpret_mode() and not is_fake(y))
    if HAVE_TRITON and runnable and y.dtype in KERNEL_DTYPES:
        launch(x, y, g, lr, p, a, t_scale, a_scale, kind, strengths, wrap=_wrap)
        return
    params = dict(zip(KERNEL_PROX[name], strengths))
    lr_op = lr if lr is not None else t_scale
    p_op = p if p is not None else (t_scale if lr is not None else 1.0)
    _reference_inplace(y, g, x, lr_op, p_op, a if a is not None else a_scale, name, params)


if HAVE_TRITON:
    from torch.library import triton_op, wrap_triton

    _wrap = wrap_triton
    fused_prox_step_op = triton_op("torch_l2o::fused_prox_step", mutates_args={"x", "y"})(_fused_prox_step)
else:  # pragma: no cover
    _wrap = None
    fused_prox_step_op = torch.library.custom_op(
        "torch_l2o::fused_prox_step", mutates_args={"x", "y"}
    )(_fused_prox_step)


_CPU_BACKEND = "reference"
_COMPILED = None


def set_cpu_backend(backend: str) -> str:
    """Choose how in-place steps on non-CUDA tensors run; returns the previous choice.

    ``"reference"`` (default; ``"eager"`` is the same): the eager PyTorch reference.
    ``"compile"``: the same reference compiled by ``torch.compile`` (Inductor fuses it
    into one loop: 10-20x faster from 10^6 elements on a CPU, at the price of a
    compilation, some seconds, per prox and dtype on first use).
    """
    global _CPU_BACKEND
    if backend not in ("reference", "eager", "compile"):
        raise ValueError(f"cpu backend must be 'reference' (or 'eager') or 'compile', got {backend!r}")
    prev, _CPU_BACKEND = _CPU_BACKEND, "reference" if backend == "eager" else backend
    return prev


def _reference_inplace(y, g, x, lr, p, a, prox, params):
    xn, yn = prox_grad_step_reference(y, g, x, lr, p, a, prox, params)
    x.copy_(xn)
    y.copy_(yn)


def _compiled_inplace():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_reference_inplace, dynamic=True)
    return _COMPILED


def _split(lr: Any, p: Any) -> tuple[Optional[Tensor], Optional[Tensor], float]:
    """Tensor factors of ``t = lr * p`` and the product of the scalar ones."""
    lr_t = lr if isinstance(lr, Tensor) else None
    p_t = p if isinstance(p, Tensor) else None
    scale = (1.0 if lr_t is not None else float(lr)) * (1.0 if p_t is not None else float(p))
    return lr_t, p_t, scale


def kernel_supports(y: Tensor, g: Tensor, x: Tensor, lr: Any, p: Any, a: Any,
                    prox: str, params: Mapping[str, Any] | None) -> bool:
    """Whether the Triton kernel can run this step (else the reference serves it)."""
    spec = get_prox(prox)
    if not HAVE_TRITON or spec.kernel is None or y.dtype not in KERNEL_DTYPES:
        return False
    if not (y.shape == g.shape == x.shape and y.dtype == g.dtype == x.dtype):
        return False
    if not (y.is_contiguous() and g.is_contiguous() and x.is_contiguous()):
        return False
    if any(isinstance(v, Tensor) for v in (params or {}).values()):
        return False
    for v in (lr, p, a):
        if isinstance(v, Tensor) and (v.device != y.device or broadcast_divisor(v, y) is None):
            return False
    return True


def prox_grad_step(
    y: Tensor,
    g: Tensor,
    x: Tensor,
    *,
    lr: float | Tensor,
    p: float | Tensor = 1.0,
    a: float | Tensor = 0.0,
    prox: str = "none",
    params: Mapping[str, Any] | None = None,
    inplace: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One prox-gradient step with extrapolation; returns ``(x_new, y_new)``.

    Args:
        y: the point where the gradient was taken.
        g: the gradient of the smooth loss at ``y``.
        x: the previous prox iterate.
        lr, p: the step is ``t = lr * p``; each a number or a tensor that is
            ``y``'s shape or a leading prefix of it followed by ones (``(B, 1)``).
        a: extrapolation weight, a number or such a tensor.
        prox, params: a registered prox name and its (resolved) strengths.
        inplace: write ``x_new`` into ``x`` and ``y_new`` into ``y`` (no autograd);
            otherwise return new tensors through the differentiable reference.
        backend: ``"auto"`` (the kernel for CUDA tensors it supports, else the CPU
            backend of :func:`set_cpu_backend`), ``"triton"`` (the kernel or an
            error; on CPU it needs ``TRITON_INTERPRET=1``), ``"reference"`` or
            ``"compile"`` (the reference through ``torch.compile``).
    """
    if backend not in ("auto", "triton", "reference", "compile"):
        raise ValueError(f"backend must be 'auto', 'triton', 'reference' or 'compile', got {backend!r}")
    params = dict(params or {})
    if not inplace:
        if backend == "triton":
            raise ValueError("backend='triton' runs in place only; pass inplace=True")
        return prox_grad_step_reference(y, g, x, lr, p, a, prox, params)
    use_kernel = backend in ("auto", "triton") and (backend == "triton" or y.is_cuda) and kernel_supports(
        y, g, x, lr, p, a, prox, params
    )
    if backend == "triton" and not use_kernel:
        raise ValueError(
            f"the Triton kernel cannot run this step (prox {prox!r}, dtype {y.dtype}, "
            f"device {y.device}, triton installed: {HAVE_TRITON}); use backend='auto'"
        )
    if backend == "triton" and not (y.is_cuda or interpret_mode()):
        raise ValueError("the Triton kernel runs on CUDA tensors, or on the CPU with TRITON_INTERPRET=1")
    if use_kernel:
        spec = get_prox(prox)
        lr_t, p_t, scale = _split(lr, p)
        a_t = a if isinstance(a, Tensor) else None
        strengths = [float(params.get(k, spec.defaults[k])) for k in KERNEL_PROX[_KERNEL_NAMES[spec.kernel]]]
        fused_prox_step_op(
            x, y, g, lr_t, p_t, a_t, scale, 0.0 if a_t is not None else float(a), spec.kernel, strengths,
        )
        return x, y
    if backend == "compile" or (backend == "auto" and not y.is_cuda and _CPU_BACKEND == "compile"):
        _compiled_inplace()(y, g, x, lr, p, a, prox, params)
    else:
        _reference_inplace(y, g, x, lr, p, a, prox, params)
    return x, y

from . import triton_learned  # noqa: E402,F401  (registers the Triton fused-step backend)
from . import cpu_step  # noqa: E402,F401  (registers the CPU fused-step backend)
