"""Convolution followed by a BatchNorm that does not learn, run as one convolution.

A BatchNorm on stored statistics (``FrozenBatchNorm2d``, or ``BatchNorm2d`` in eval mode) is an
affine map per channel, ``y = x * s + t`` with ``s = gamma / sqrt(var + eps)`` and
``t = beta - mean * s``, so ``norm(conv(x))`` is the convolution with weight ``W * s`` (per
output channel) and bias ``b * s + t``.  Running the folded convolution skips one full read and
write of every activation (two with the ReLU done in place), which is most of the time a
ResNet spends outside its convolutions on a CPU.

The module parameters are never changed: the folded weight and bias are computed from them.
Unless a gradient must flow to one of them (``detect`` under ``inference_mode``, or a frozen
layer in training) they are cached on the conv and recomputed only when one of the source
tensors changes (its storage or its version counter: an optimiser step, ``load_state_dict``,
``.to(device)``); when one learns they are recomputed on every call, so gradients flow to the
conv weight exactly as through the unfolded pair (for a FrozenBatchNorm2d through a small
autograd function that keeps no folded copy for backward).

Folding at inference is a choice per module (its ``fold_bn`` attribute; :func:`set_bn_folding`
sets it over a model).  The torchvision-style ResNet folds by default.  The Matterport style does
not: the Keras graph it reproduces runs conv then BN op by op, and the parity fixture's
tolerances sit at float32 noise, which a folded network moves (an RPN probability by 1.1e-4
where 1e-4 is allowed, one mask pixel in 1.6 million); ``set_bn_folding(model, True)`` turns it
on there too.  In training (the conv in training mode) a FrozenBatchNorm2d is folded whatever
the choice: there are no reference outputs to match there, and on a GPU the unfolded pair cost
the Matterport preset a quarter of its training step's kernels (bf16, 2370 against 1755 a step
of 4 images) and a float32 copy of every activation under autocast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .conv import convolve


def is_foldable(norm: nn.Module) -> bool:
    """Whether ``norm`` is a fixed per-channel affine map right now."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.track_running_stats \
        and norm.running_var is not None


def fold(conv: nn.Conv2d, norm: nn.Module, channels_last: bool = False, exact: bool = True):
    """The folded (weight, bias) of ``norm(conv(x))``.

    conv: a Conv2d (weight [Cout, Cin/g, kh, kw]); norm: FrozenBatchNorm2d / eval BatchNorm2d
    over Cout channels.  Returns (weight [Cout, Cin/g, kh, kw], bias [Cout]) in the conv's dtype;
    the weight is in channels-last memory order when ``channels_last`` (what oneDNN runs fastest
    on a CPU).  ``exact``: fold in float64 and round once, so each folded weight is the exact
    product rounded; in float32 the rounding of the scale and of the product add up and move
    near-tied detections of the Matterport fixture (MPS has no float64 and folds in float32).
    """
    dtype = conv.weight.dtype
    acc = torch.float64 if exact and conv.weight.device.type != "mps" else dtype
    scale = norm.weight.to(acc) * (norm.running_var.to(acc) + norm.eps).rsqrt()
    shift = norm.bias.to(acc) - norm.running_mean.to(acc) * scale
    weight = (conv.weight.to(acc) * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))).to(dtype)
    bias = (shift if conv.bias is None else conv.bias.to(acc) * scale + shift).to(dtype)
    if channels_last and weight.dim() == 4:
        weight = weight.contiguous(memory_format=torch.channels_last)
    return weight, bias


def _source_key(tensors, *extra) -> tuple:
    """What a cached function of ``tensors`` depends on: each one's storage, version counter
    and dtype (an optimiser step, ``load_state_dict`` or ``.to()`` changes one of them), whether
    it is computed under ``inference_mode`` (an inference tensor cannot enter autograd), and
    ``extra``."""
    return tuple(None if t is None else (t.data_ptr(), t._version, t.dtype) for t in tensors) + (
        torch.is_inference_mode_enabled(),) + extra


def _cached(owner: nn.Module, name: str, key: tuple, compute):
    """``compute()``, kept in ``owner.__dict__[name]`` until ``key`` changes."""
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, compute())
        owner.__dict__[name] = cached
    return cached[1]


def _learns(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def folded_params(conv: nn.Conv2d, norm: nn.Module, channels_last: bool = False,
                  dtype: torch.dtype | None = None):
    """:func:`fold`, cached on ``conv`` unless a gradient must flow to one of its sources (see
    the module docstring): a frozen layer in training folds once, not at every step.  When one
    of them learns, the fold runs in the conv's dtype on every call (its cost is per step).
    ``dtype``: the cached pair is kept in it (an autocast dtype: autocast would otherwise cast
    the weight again at every call, as it caches only the casts of weights that learn)."""
    sources = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    if _learns(*sources):
        return fold(conv, norm, channels_last, exact=False)

    def compute():
        weight, bias = fold(conv, norm, channels_last)
        return (weight, bias) if dtype is None else (weight.to(dtype), bias.to(dtype))
    with torch.no_grad():
        return _cached(conv, "_folded_cache", _source_key(sources, channels_last, dtype), compute)


def frozen_affine(norm: FrozenBatchNorm2d, shift_dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [C], shift [C]) of a FrozenBatchNorm2d, ``y = x * scale + shift``; cached on the
    norm while its buffers stay the same (in training that saves a handful of tiny kernels per
    convolution and step, which on a GPU cost their launches).  ``shift_dtype``: the shift in
    that dtype (a conv without bias adds it as its bias, in the convolution's dtype)."""
    sources = (norm.weight, norm.bias, norm.running_mean, norm.running_var)

    def compute():
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        return scale, shift if shift_dtype is None else shift.to(shift_dtype)
    with torch.no_grad():
        return _cached(norm, "_affine_cache", _source_key(sources, shift_dtype), compute)


def _scaled(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale`` per output channel (weight [Cout, ...], scale [Cout]) in ``dtype``,
    computed in the wider of the two dtypes and rounded once, as one kernel (a multiply, then
    a cast, would be two)."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    return torch.mul(weight, scale.reshape(-1, *([1] * (weight.dim() - 1))), out=out)


class _FrozenFoldedConv(torch.autograd.Function):
    """conv2d with weight ``W * scale`` and bias ``b * scale + shift`` (constants ``scale``,
    ``shift`` of a FrozenBatchNorm2d).  In the weight's own dtype it saves ``W`` rather than the
    folded copy for backward, so fp32 training holds no second copy of each trainable weight,
    and recomputes the folded weight in backward; under autocast the folded copy (bf16/fp16,
    half the weight's size) is kept instead, one kernel a convolution fewer.  Each of those
    products is one kernel (on a GPU a training step launches one such set per convolution, so
    their count bounds the step when the convolutions are quick)."""

    @staticmethod
    def forward(ctx, x, weight, conv_bias, scale, shift, stride, padding, dilation, groups):
        # Under autocast F.conv2d would cast x and the folded weight to the autocast dtype, but
        # backward runs outside autocast: convolve in one explicit dtype and keep it for backward
        # (cuDNN refuses a bf16 gradient against an fp32 weight).
        dtype = compute_dtype(x)
        w = _scaled(weight, scale, dtype)
        if conv_bias is None:
            bias = shift if shift.dtype == dtype else shift.to(dtype)
        else:
            bias = torch.addcmul(shift, conv_bias, scale, out=torch.empty(shift.shape, dtype=dtype,
                                                                         device=shift.device))
        ctx.input_dtype = x.dtype
        x = x.to(dtype)
        ctx.keeps_folded = dtype != weight.dtype
        ctx.save_for_backward(x, weight, scale, w if ctx.keeps_folded else None)
        ctx.conv = (stride, padding, dilation, groups, conv_bias is not None)
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale, w = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conv
        if not ctx.keeps_folded:
            w = _scaled(weight, scale, x.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.to(x.dtype), x, w, [w.shape[0]], list(stride), list(padding), list(dilation), False, [0, 0],
            groups, [need_x, need_w, need_b and has_bias])
        # gradients in the parameters' own dtype (fp32 master weights under autocast): a bf16
        # gradient times the fp32 scale is computed in fp32, the cast and product one kernel
        gw = _scaled(gw, scale, weight.dtype) if need_w else None
        gb = _scaled(gb, scale, scale.dtype) if need_b and has_bias else None
        gx = gx.to(ctx.input_dtype) if need_x else None
        return gx, gw, gb, None, None, None, None, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` runs in here: the autocast dtype of x's device when
    autocast is on there (and x is floating point), else x's own dtype."""
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def set_bn_folding(model: nn.Module, enabled: bool = True) -> int:
    """Fold (or stop folding) BatchNorm into the convs of every module of ``model`` that can.
    Returns how many modules were set."""
    count = 0
    for m in model.modules():
        if hasattr(m, "fold_bn"):
            m.fold_bn = enabled
            count += 1
    return count


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor, relu: bool = False,
              fold: bool = True) -> torch.Tensor:
    """``relu(norm(conv(x)))`` (ReLU when ``relu``), as one convolution when the norm is
    foldable and either ``fold`` (the module's choice for inference, see the module docstring)
    or the conv is in training mode with a FrozenBatchNorm2d: training has no reference outputs
    to match, and the unfolded pair costs two elementwise passes over every activation forward
    and one backward, a handful of kernels for the affine map, and under autocast a float32
    activation (float32 scale times bfloat16 output) that the next convolution casts back.

    x: [N, Cin, H, W] (any memory format; channels-last input gives channels-last output, except
    a Winograd convolution's NCHW, see .conv).  Returns [N, Cout, H', W'].
    """
    frozen = isinstance(norm, FrozenBatchNorm2d)
    fold = fold or (frozen and conv.training)
    if isinstance(norm, nn.Identity):
        out = convolve(conv, x)
    elif fold and frozen and torch.is_grad_enabled() and conv.weight.requires_grad \
            and isinstance(conv.padding, tuple):
        scale, shift = frozen_affine(norm, compute_dtype(x) if conv.bias is None else None)
        out = _FrozenFoldedConv.apply(x, conv.weight, conv.bias, scale, shift, conv.stride, conv.padding,
                                      conv.dilation, conv.groups)
    elif fold and is_foldable(norm):
        dtype = compute_dtype(x)
        weight, bias = folded_params(conv, norm, x.is_contiguous(memory_format=torch.channels_last)
                                     and x.dim() == 4 and x.shape[1] > 1,
                                     dtype if dtype != conv.weight.dtype else None)
        out = convolve(conv, x, weight, bias)
    else:
        out = norm(convolve(conv, x))
    return F.relu_(out) if relu else out
