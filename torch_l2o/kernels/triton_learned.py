r"""Fused learned steps in Triton: one launch per parameter tensor does a whole learned step.

Per coordinate the kernel reads ``g``, ``y``, ``x`` and the network's state, runs the
features, the recurrent cells (LSTM or GRU, any depth, hidden size up to 64), PA-MR's
window attention, feed-forward blocks and LayerNorms, the heads, and the prox-gradient
step with extrapolation, and writes ``x``, ``y`` and the state back: each once. The
network's weights are packed once (padded to a power of two, transposed for
``tl.dot``) and read by every program from cache. Matrix products run as three TF32
products (``input_precision="tf32x3"``, float32 accuracy on tensor cores; see ``CONFIG``),
never as one TF32 product, whose 10-bit mantissa would move iterates by ~1e-3 relative
per step.

Served (``kind`` of :mod:`torch_l2o.kernels.fused`):

* ``"pa"``: L2O-PA (LSTM), L2O-PA-GRU (GRU), L2O-PA-MR (GRU + window attention + FFN;
  ``attend="window"``, the network in eval mode or without dropout);
* ``"dm"``: L2O-DM and GSO's blocks (LSTM on the preprocessed gradient, or on
  ``[g, x]``), with the block's prox;
* ``"rnnprop"``: RNNProp, its moments updated in the same pass.

Exactly these network classes (not subclasses, whose forward may differ) on CUDA
tensors of float32, bfloat16 or float16, or on the CPU under ``TRITON_INTERPRET=1``
inside ``use_fused("triton")`` (the tests). Everything else declines to the PyTorch
reference.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from .fused import (input_scales, lr_operands, packed_weights, prox_strengths, register_step_backend, requested,
                    step_constants)
from .triton_step import HAVE_TRITON, KERNEL_DTYPES, interpret_mode

__all__ = ["learned_step_triton", "pack_network"]

# Launch configuration: coordinates per program (tl.dot needs >= 16 rows), warps, and the
# matrix products' precision. "tf32x3" (three TF32 tensor-core products per fp32 product,
# ~1e-6 relative, inside the parity tolerance of 2e-5) is the default because "ieee" (exact
# fp32 FMAs) spills registers: compiled for sm_90 (benchmarks/kernel_registers.py, Triton
# 3.9's ptxas), 64 x 4 warps, spill stores per thread ieee / tf32x3: PA 2204 / 84 B,
# PA-GRU 0 / 0, PA-MR 104 / 0, L2O-DM 2112 / 44, RNNProp 27148 / 236. Parity of tf32x3 on
# a GPU is checked by tests/test_fused.py there and by benchmarks/kernel_sweep.py. Module
# state, so that a benchmark can sweep it.
CONFIG = {"BLOCK": 64, "num_warps": 4, "precision": "tf32x3"}
KINDS = {"pa": 0, "dm": 1, "rnnprop": 2}
MAX_HIDDEN = 64

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_step import prox_apply

    @triton.jit
    def _tanh(x):
        # exp-based: portable to the interpreter; absolute error ~1e-7 near 0, saturates cleanly
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _vec(ptr, HP: tl.constexpr):
        return tl.load(ptr + tl.arange(0, HP))

    @triton.jit
    def _mm(a, w_ptr, HP: tl.constexpr, PREC: tl.constexpr):
        """``a @ W`` for a packed ``(HP, HP)`` matrix ``W`` (row = input, column = output)."""
        r = tl.arange(0, HP)
        w = tl.load(w_ptr + r[:, None] * HP + r[None, :])
        return tl.dot(a, w, input_precision=PREC)

    @triton.jit
    def _pre(inp, f0, f1, h, l: tl.constexpr, k: tl.constexpr, wx0_ptr, wx_ptr, wh_ptr, b_ptr,
             G: tl.constexpr, HP: tl.constexpr, TWO_IN: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
        """Pre-activation of gate ``k`` of layer ``l``: input part (with bias) and hidden part.
        Layer 0 of a two-feature network takes ``f0, f1``; other layers take ``inp``."""
        j = l * G + k
        if l == 0 and TWO_IN:
            xi = f0[:, None] * _vec(wx0_ptr + (2 * k) * HP, HP)[None, :] \
                + f1[:, None] * _vec(wx0_ptr + (2 * k + 1) * HP, HP)[None, :]
        else:
            xi = _mm(inp, wx_ptr + j * HP * HP, HP, PREC)
        xi = xi + _vec(b_ptr + j * HP, HP)[None, :]
        hh = _mm(h, wh_ptr + j * HP * HP, HP, PREC)
        if SPLIT:
            pre = xi
        else:
            pre = xi + hh
        return pre, hh

    @triton.jit
    def _cells(f0, f1, inp, h_ptr, c_ptr, rows, rmask, cols, cmask, stride_l,
               wx0_ptr, wx_ptr, wh_ptr, b_ptr, bhn_ptr,
               LSTM: tl.constexpr, LAYERS: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, TWO_IN: tl.constexpr,
               PREC: tl.constexpr):
        """The recurrent stack, one time step; reads and writes ``h`` (and ``c``) in place."""
        smask = rmask[:, None] & cmask[None, :]
        soffs = rows[:, None] * H + cols[None, :]
        o = inp
        for l in tl.static_range(LAYERS):
            h = tl.load(h_ptr + l * stride_l + soffs, mask=smask, other=0.0).to(tl.float32)
            if LSTM:  # gates i, f, g, o (PyTorch's order); biases b_ih + b_hh pre-summed
                c = tl.load(c_ptr + l * stride_l + soffs, mask=smask, other=0.0).to(tl.float32)
                gi, _ = _pre(o, f0, f1, h, l, 0, wx0_ptr, wx_ptr, wh_ptr, b_ptr, 4, HP, TWO_IN, False, PREC)
                gf, _ = _pre(o, f0, f1, h, l, 1, wx0_ptr, wx_ptr, wh_ptr, b_ptr, 4, HP, TWO_IN, False, PREC)
                gg, _ = _pre(o, f0, f1, h, l, 2, wx0_ptr, wx_ptr, wh_ptr, b_ptr, 4, HP, TWO_IN, False, PREC)
                go, _ = _pre(o, f0, f1, h, l, 3, wx0_ptr, wx_ptr, wh_ptr, b_ptr, 4, HP, TWO_IN, False, PREC)
                c = tl.sigmoid(gf) * c + tl.sigmoid(gi) * _tanh(gg)
                h = tl.sigmoid(go) * _tanh(c)
                tl.store(c_ptr + l * stride_l + soffs, c.to(c_ptr.dtype.element_ty), mask=smask)
            else:  # GRU: r, z, n; n = tanh(W_in x + b_in + r (W_hn h + b_hn))
                gr, _ = _pre(o, f0, f1, h, l, 0, wx0_ptr, wx_ptr, wh_ptr, b_ptr, 3, HP, TWO_IN, False, PREC)
                gz, _ = _pre(o, f0, f1, h, l, 1, wx0_ptr, wx_ptr, wh_ptr, b_ptr, 3, HP, TWO_IN, False, PREC)
                xn, hn = _pre(o, f0, f1, h, l, 2, wx0_ptr, wx_ptr, wh_ptr, b_ptr, 3, HP, TWO_IN, True, PREC)
                r = tl.sigmoid(gr)
                z = tl.sigmoid(gz)
                n = _tanh(xn + r * (hn + _vec(bhn_ptr + l * HP, HP)[None, :]))
                h = (1.0 - z) * n + z * h
            h = tl.where(cmask[None, :], h, 0.0)
            tl.store(h_ptr + l * stride_l + soffs, h.to(h_ptr.dtype.element_ty), mask=smask)
            o = h
        return o

    @triton.jit
    def _layer_norm(v, g_ptr, b_ptr, cmask, H: tl.constexpr, HP: tl.constexpr, eps):
        mean = tl.sum(v, axis=1) / H
        d = tl.where(cmask[None, :], v - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / H
        return d / tl.sqrt(var + eps)[:, None] * _vec(g_ptr, HP)[None, :] + _vec(b_ptr, HP)[None, :]

    @triton.jit
    def _window_attention(o, win_ptr, filled_ptr, rows, rmask, cols, cmask, mr_ptr,
                          W: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr):
        """PA-MR's attention of the current output over the coordinate's last ``W`` outputs;
        shifts the window (oldest dropped, ``o`` appended) in place."""
        MM: tl.constexpr = HP * HP
        q = _mm(o, mr_ptr, HP, PREC) + _vec(mr_ptr + 3 * MM, HP)[None, :]
        # the current output first: it is never masked, so the running max starts finite
        k = _mm(o, mr_ptr + MM, HP, PREC) + _vec(mr_ptr + 3 * MM + HP, HP)[None, :]
        s = _mm(q * k, mr_ptr + 4 * MM, HP, PREC)  # per column: its head's score / sqrt(d_head)
        mx = s
        den = tl.full(s.shape, 1.0, tl.float32)
        acc = _mm(o, mr_ptr + 2 * MM, HP, PREC) + _vec(mr_ptr + 3 * MM + 2 * HP, HP)[None, :]
        if W > 1:
            filled = tl.load(filled_ptr)
            wmask = rmask[:, None] & cmask[None, :]
            woffs = rows[:, None] * ((W - 1) * H) + cols[None, :]
            for j in tl.static_range(W - 1):
                key = tl.load(win_ptr + woffs + j * H, mask=wmask, other=0.0).to(tl.float32)
                if j > 0:  # slot j moves to j - 1 (its old content was read last iteration)
                    tl.store(win_ptr + woffs + (j - 1) * H, key.to(win_ptr.dtype.element_ty), mask=wmask)
                sj = _mm(q * (_mm(key, mr_ptr + MM, HP, PREC) + _vec(mr_ptr + 3 * MM + HP, HP)[None, :]),
                         mr_ptr + 4 * MM, HP, PREC)
                sj = tl.where(j < W - 1 - filled, float("-inf"), sj)
                vj = _mm(key, mr_ptr + 2 * MM, HP, PREC) + _vec(mr_ptr + 3 * MM + 2 * HP, HP)[None, :]
                new_mx = tl.maximum(mx, sj)
                alpha = tl.exp(mx - new_mx)
                e = tl.exp(sj - new_mx)
                den = den * alpha + e
                acc = acc * alpha + e * vj
                mx = new_mx
            tl.store(win_ptr + woffs + (W - 2) * H, o.to(win_ptr.dtype.element_ty), mask=wmask)
        u = acc / den
        return _mm(u, mr_ptr + 5 * MM, HP, PREC) + _vec(mr_ptr + 3 * MM + 3 * HP, HP)[None, :]

    @triton.jit
    def _learned_step_kernel(
        x_ptr, y_ptr, g_ptr, lr_ptr, h_ptr, c_ptr, m_ptr, v_ptr, win_ptr, filled_ptr,
        wx0_ptr, wx_ptr, wh_ptr, b_ptr, bhn_ptr, head_ptr, mr_ptr, fs_ptr, held_ptr, s0_ptr, s1_ptr,
        n, lr_div, t_scale, s0, s1, s0_div, s1_div, stride_l, aux0, aux1, aux2, ln_eps, fs_div,
        KIND: tl.constexpr, LSTM: tl.constexpr, LAYERS: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
        PROX: tl.constexpr, HAS_LR: tl.constexpr, MR: tl.constexpr, W: tl.constexpr, GRAD_X: tl.constexpr,
        SCALED: tl.constexpr, HOLD: tl.constexpr, S0_T: tl.constexpr, S1_T: tl.constexpr,
        BLOCK: tl.constexpr, PREC: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < n
        cols = tl.arange(0, HP)
        cmask = cols < H
        y = tl.load(y_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        if HAS_LR:
            lr = tl.load(lr_ptr + rows // lr_div, mask=rmask, other=0.0).to(tl.float32) * t_scale
        else:
            lr = t_scale + tl.zeros_like(y)
        # prox strengths: numbers, or tensors with one per instance or coordinate (S0_T, S1_T)
        if S0_T:
            s0 = tl.load(s0_ptr + rows // s0_div, mask=rmask, other=0.0).to(tl.float32)
        if S1_T:
            s1 = tl.load(s1_ptr + rows // s1_div, mask=rmask, other=0.0).to(tl.float32)
        MM: tl.constexpr = HP * HP

        if KIND == 0:  # the PA family: features [g, y], or [s g, y] / sigma (1 / sigma per instance: fs_ptr)
            if HOLD:  # held coordinates (held_ptr, the reference's own test): no state, x or y read or written
                rmask = rmask & (tl.load(held_ptr + rows, mask=rmask, other=1) == 0)
            if SCALED:
                inv = tl.load(fs_ptr + rows // fs_div, mask=rmask, other=0.0)
                f0 = (g * lr) * inv
                f1 = y * inv
            else:
                f0 = g
                f1 = y
            o = _cells(f0, f1, tl.zeros((BLOCK, HP), tl.float32), h_ptr, c_ptr, rows, rmask, cols, cmask, stride_l,
                       wx0_ptr, wx_ptr, wh_ptr, b_ptr, bhn_ptr, LSTM, LAYERS, H, HP, True, PREC)
            if MR:
                v = _window_attention(o, win_ptr, filled_ptr, rows, rmask, cols, cmask, mr_ptr, W, H, HP, PREC)
                for i in tl.static_range(2):  # FFN blocks: LN(v + ReLU(W v + b)); dropout off (eval)
                    f = _mm(v, mr_ptr + (6 + i) * MM, HP, PREC) + _vec(mr_ptr + 3 * MM + (4 + i) * HP, HP)[None, :]
                    v = _layer_norm(v + tl.maximum(f, 0.0), mr_ptr + 8 * MM + (2 * i) * HP,
                                    mr_ptr + 8 * MM + (2 * i + 1) * HP, cmask, H, HP, ln_eps)
                o = v
            z = tl.maximum(_mm(o, head_ptr, HP, PREC) + _vec(head_ptr + MM, HP)[None, :], 0.0)
            p = 2.0 * tl.sigmoid(tl.sum(z * _vec(head_ptr + MM + HP, HP)[None, :], axis=1)
                                 + tl.load(head_ptr + MM + 3 * HP))
            a = 2.0 * tl.sigmoid(tl.sum(z * _vec(head_ptr + MM + 2 * HP, HP)[None, :], axis=1)
                                 + tl.load(head_ptr + MM + 3 * HP + 1))
            x = tl.load(x_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            t = lr * p
            xn = prox_apply(y - t * g, t, s0, s1, PROX)
            yn = xn + a * (xn - x)
            tl.store(x_ptr + rows, xn.to(x_ptr.dtype.element_ty), mask=rmask)
            tl.store(y_ptr + rows, yn.to(y_ptr.dtype.element_ty), mask=rmask)
        else:
            if KIND == 1:  # L2O-DM: preprocessed gradient (aux0 = p, aux1 = e^-p, aux2 = e^p), or [g, x]
                if GRAD_X:
                    f0 = g
                    f1 = y
                else:
                    big = tl.abs(g) >= aux1
                    f0 = tl.where(big, tl.log(tl.maximum(tl.abs(g), aux1)) / aux0, -1.0)
                    f1 = tl.where(big, tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)), aux2 * g)
                o = _cells(f0, f1, tl.zeros((BLOCK, HP), tl.float32), h_ptr, c_ptr, rows, rmask, cols, cmask, stride_l,
                           wx0_ptr, wx_ptr, wh_ptr, b_ptr, bhn_ptr, LSTM, LAYERS, H, HP, True, PREC)
                out = 0.1 * (tl.sum(o * _vec(head_ptr, HP)[None, :], axis=1) + tl.load(head_ptr + HP))
                d = -out
            else:  # RNNProp: moments (aux0 = 1 - b1^(k+1), aux1 = 1 - b2^(k+1)), ELU(Linear(2, H)), LSTM, tanh
                m = 0.95 * tl.load(m_ptr + rows, mask=rmask, other=0.0).to(tl.float32) + (1 - 0.95) * g
                v2 = 0.95 * tl.load(v_ptr + rows, mask=rmask, other=0.0).to(tl.float32) + (1 - 0.95) * g * g
                tl.store(m_ptr + rows, m.to(m_ptr.dtype.element_ty), mask=rmask)
                tl.store(v_ptr + rows, v2.to(v_ptr.dtype.element_ty), mask=rmask)
                den = tl.sqrt(v2 / aux1) + 1e-8
                f0 = g / den
                f1 = (m / aux0) / den
                e = f0[:, None] * _vec(head_ptr, HP)[None, :] + f1[:, None] * _vec(head_ptr + HP, HP)[None, :] \
                    + _vec(head_ptr + 2 * HP, HP)[None, :]
                e = tl.where(e > 0, e, tl.exp(e) - 1.0)
                e = tl.where(cmask[None, :], e, 0.0)
                o = _cells(f0, f1, e, h_ptr, c_ptr, rows, rmask, cols, cmask, stride_l,
                           wx0_ptr, wx_ptr, wh_ptr, b_ptr, bhn_ptr, LSTM, LAYERS, H, HP, False, PREC)
                out = _tanh(tl.sum(o * _vec(head_ptr + 3 * HP, HP)[None, :], axis=1) + tl.load(head_ptr + 4 * HP))
                d = (0.1 * out)
            xn = prox_apply(y - lr * d, lr, s0, s1, PROX)
            tl.store(y_ptr + rows, xn.to(y_ptr.dtype.element_ty), mask=rmask)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _pad_t(w: Tensor, hp: int) -> Tensor:
    """``w`` (out, in) as a zero-padded ``(hp, hp)`` matrix indexed [in, out]."""
    out = w.new_zeros(hp, hp)
    out[: w.shape[1], : w.shape[0]] = w.T
    return out


def _pad(v: Tensor, hp: int) -> Tensor:
    out = v.new_zeros(hp)
    out[: v.numel()] = v.reshape(-1)
    return out


def _pack_rnn(rnn: nn.RNNBase, hp: int, two_in: bool) -> dict[str, Tensor]:
    lstm = isinstance(rnn, nn.LSTM)
    G, H = (4 if lstm else 3), rnn.hidden_size
    wx0, wx, wh, b, bhn = [], [], [], [], []
    for l in range(rnn.num_layers):
        w_ih, w_hh = getattr(rnn, f"weight_ih_l{l}"), getattr(rnn, f"weight_hh_l{l}")
        b_ih, b_hh = getattr(rnn, f"bias_ih_l{l}"), getattr(rnn, f"bias_hh_l{l}")
        for k in range(G):
            sl = slice(k * H, (k + 1) * H)
            if l == 0 and two_in:
                wx0 += [_pad(w_ih[sl, 0], hp), _pad(w_ih[sl, 1], hp)]
                wx.append(w_ih.new_zeros(hp, hp))
            else:
                wx.append(_pad_t(w_ih[sl], hp))
            wh.append(_pad_t(w_hh[sl], hp))
            # GRU's n gate keeps b_hn apart: r multiplies (W_hn h + b_hn)
            b.append(_pad(b_ih[sl] + (b_hh[sl] if lstm or k < 2 else 0), hp))
        bhn.append(_pad(b_hh[2 * H:], hp) if not lstm else b_hh.new_zeros(hp))
    z = rnn.weight_hh_l0.new_zeros(1)
    return {"wx0": torch.stack(wx0) if wx0 else z, "wx": torch.stack(wx), "wh": torch.stack(wh),
            "b": torch.stack(b), "bhn": torch.stack(bhn)}


def _pack(net: nn.Module) -> dict[str, Any]:
    from ..nets import DMNet, PAGRUNet, PAMRNet, PANet, RNNPropNet

    rnn = net.rnn
    hp = _pow2(rnn.hidden_size)
    cat = lambda *ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    two_in = not isinstance(net, RNNPropNet)
    packed = _pack_rnn(rnn, hp, two_in)
    if isinstance(net, (PANet, PAGRUNet, PAMRNet)):
        hd = net.heads
        packed["head"] = cat(_pad_t(hd.hidden.weight, hp), _pad(hd.hidden.bias, hp), _pad(hd.p.weight, hp),
                             _pad(hd.a.weight, hp), hd.p.bias, hd.a.bias)
    elif isinstance(net, DMNet):
        packed["head"] = cat(_pad(net.out.weight, hp), net.out.bias)
    else:  # RNNProp
        packed["head"] = cat(_pad(net.inp.weight[:, 0], hp), _pad(net.inp.weight[:, 1], hp), _pad(net.inp.bias, hp),
                             _pad(net.out.weight, hp), net.out.bias)
    if isinstance(net, PAMRNet):
        d, heads = rnn.hidden_size, net.attn.num_heads
        wq, wk, wv = net.attn.in_proj_weight.split(d)
        bq, bk, bv = net.attn.in_proj_bias.split(d)
        same_head = torch.zeros(hp, hp, dtype=wq.dtype, device=wq.device)
        dh = d // heads
        for i in range(heads):
            same_head[i * dh:(i + 1) * dh, i * dh:(i + 1) * dh] = 1 / math.sqrt(dh)
        mats = [_pad_t(wq, hp), _pad_t(wk, hp), _pad_t(wv, hp)]
        vecs = [_pad(bq, hp), _pad(bk, hp), _pad(bv, hp), _pad(net.attn.out_proj.bias, hp),
                _pad(net.ffn[0].bias, hp), _pad(net.ffn[1].bias, hp)]
        ln = [_pad(v, hp) for nrm in net.norms for v in (nrm.weight, nrm.bias)]
        # layout (units of HP*HP): wq wk wv | 6 bias vectors (within one unit) | head-sum | out_proj | ffn0 ffn1 | LN
        packed["mr"] = cat(*mats, cat(*vecs, torch.zeros(hp * hp - 6 * hp, dtype=wq.dtype, device=wq.device)),
                           same_head, _pad_t(net.attn.out_proj.weight, hp), _pad_t(net.ffn[0].weight, hp),
                           _pad_t(net.ffn[1].weight, hp), *ln)
    return {k: v.detach().float().contiguous() for k, v in packed.items()} | {"hp": hp}


_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def pack_network(net: nn.Module) -> dict[str, Any]:
    """The network's weights in the kernel's layout; cached until a parameter changes."""
    return packed_weights(_PACKED, net, _pack)


def _serves(kind: str, net: nn.Module) -> bool:
    """Whether the kernel computes exactly this network's forward."""
    from ..nets import DMNet, PAGRUNet, PAMRNet, PANet, RNNPropNet

    t = type(net)
    if not ((kind == "pa" and t in (PANet, PAGRUNet, PAMRNet)) or (kind == "dm" and t is DMNet)
            or (kind == "rnnprop" and t is RNNPropNet)):
        return False
    # attention across coordinates is not coordinate-wise; dropout is active in training mode
    if t is PAMRNet and (net.attend != "window" or (net.training and net.dropout > 0)):
        return False
    rnn = net.rnn
    plain = rnn.bias and not rnn.bidirectional and getattr(rnn, "proj_size", 0) == 0 and not rnn.batch_first
    # two inputs per coordinate (RNNProp: its input layer's width); a PA network on the
    # three "prox" inputs runs the reference
    width = rnn.hidden_size if t is RNNPropNet else 2
    return plain and rnn.hidden_size <= MAX_HIDDEN and rnn.input_size == width


def learned_step_triton(kind, net, state, ys, gs, xs, *, lr, prox, params, step, instance_dims=0):
    """The fused step backend (see :mod:`torch_l2o.kernels.fused`); ``None`` declines."""
    if not HAVE_TRITON or kind not in KINDS or not _serves(kind, net):
        return None
    y0 = ys[0]
    if not (y0.is_cuda or (interpret_mode() and requested() == "triton")) or torch.compiler.is_compiling():
        return None
    code = prox_strengths(prox, params, ys)
    if code is None or (kind == "rnnprop" and prox != "none"):
        return None
    wdev = next(net.parameters()).device
    for y, g, x in zip(ys, gs, xs):
        if not (y.dtype in KERNEL_DTYPES and y.shape == g.shape == x.shape and y.dtype == g.dtype == x.dtype
                and y.is_contiguous() and g.is_contiguous() and x.is_contiguous() and y.device == wdev
                and g.device == y.device and x.device == y.device):
            return None
    lr_ops = lr_operands(lr, ys)
    if lr_ops is None:
        return None
    h = state.get("h")
    if h is None or h.dtype not in (torch.float32, torch.bfloat16):
        return None
    # the state is updated in place; a strided one (PA-MR's window after a reference step
    # is a slice) is copied once into its own storage, which the new state then holds
    new = {k: v.contiguous() if k in ("h", "c", "m", "v", "window") else v for k, v in state.items()}
    h, c, win = new["h"], new.get("c", new["h"]), new.get("window")
    if any(t.device != y0.device for t in (h, c) + ((win,) if win is not None else ())):
        return None

    w = pack_network(net)
    rnn = net.rnn
    mr = kind == "pa" and "mr" in w
    W = net.window if mr else 1
    if mr and W > 1 and win is None:
        return None
    prox_code, slots = code
    aux = step_constants(kind, net, step)
    ln_eps = float(net.norms[0].eps) if mr else 1e-5
    m, v = new.get("m"), new.get("v")
    filled = new.get("filled")
    off, block = 0, CONFIG["BLOCK"]
    scales = input_scales(kind, net, ys, gs, lr, instance_dims)
    scaled = any(inv is not None for inv in scales)  # False for an empty tensor list too
    # hold_fixed: the held coordinates come from the reference's own test (a few elementwise
    # passes); computed in the kernel, fused multiply-adds could round a converged
    # coordinate's test otherwise
    held = None
    if kind == "pa" and getattr(net, "hold_fixed", False):
        from ..optim.functional import _lrs, held_coordinates

        held = held_coordinates(ys, gs, xs, _lrs(lr, len(ys)), prox, params).view(torch.uint8)
    for y, g, x, (lr_t, lr_div, lr_s), inv, (st0, st1) in zip(ys, gs, xs, lr_ops, scales, slots):
        n = y.numel()
        if n:
            (s0, s0_t, s0_div), (s1, s1_t, s1_div) = st0, st1
            _learned_step_kernel[(triton.cdiv(n, block),)](
                x, y, g, lr_t if lr_t is not None else y,
                h[:, off:], c[:, off:],
                m[off:] if m is not None else y, v[off:] if v is not None else y,
                win[off:] if win is not None else y, filled if filled is not None else h,
                w["wx0"], w["wx"], w["wh"], w["b"], w["bhn"], w["head"], w.get("mr", w["head"]),
                inv if inv is not None else h, held[off:] if held is not None else h,
                s0_t if s0_t is not None else y, s1_t if s1_t is not None else y,
                n, lr_div, lr_s, s0, s1, s0_div, s1_div,
                h.stride(0), *aux, ln_eps, n // inv.numel() if inv is not None else 1,
                KIND=KINDS[kind], LSTM=isinstance(rnn, nn.LSTM), LAYERS=rnn.num_layers, H=rnn.hidden_size,
                HP=w["hp"], PROX=prox_code, HAS_LR=lr_t is not None, MR=mr, W=W,
                GRAD_X=kind == "dm" and net.inputs == "grad_x", SCALED=scaled, HOLD=held is not None,
                S0_T=s0_t is not None, S1_T=s1_t is not None, BLOCK=block,
                PREC=CONFIG["precision"],
                num_warps=CONFIG["num_warps"],
            )
        off += n
    if mr and W > 1:
        new["filled"] = torch.clamp(filled + 1, max=W - 1)
    return new


register_step_backend("triton", learned_step_triton)
