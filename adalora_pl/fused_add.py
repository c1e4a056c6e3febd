"""The adapter branch's scaled residual add, ``result + update * scaling [/ denom]``, in one pass where that is
bitwise the reference's arithmetic (CPU float32/float64), and the plain expressions everywhere else.

Kept apart from :mod:`adalora_pl.layers` because it is an optimization with its own autograd functions; the
layers only call :func:`add_scaled`.
"""

from __future__ import annotations

import torch

_FUSED_DTYPES = (torch.float32, torch.float64)
_ONE = {dtype: torch.ones(1, dtype=dtype) for dtype in _FUSED_DTYPES}  # the divisor of the LoRA form (CPU)


def _add_scaled_setup(ctx, scaling: float, denom: torch.Tensor, divide: bool) -> None:
    ctx.scaling, ctx.divide = scaling, divide
    if divide:
        ctx.save_for_backward(denom)


def _add_scaled_backward(ctx, grad: torch.Tensor):
    grad_update = None
    if ctx.needs_input_grad[1]:
        if ctx.divide:
            (denom,) = ctx.saved_tensors
            grad_update = torch.div(grad, denom).mul_(ctx.scaling)
        else:
            grad_update = grad * ctx.scaling
    return (grad if ctx.needs_input_grad[0] else None), grad_update, None, None, None


class _AddScaled(torch.autograd.Function):
    """``result + update * scaling / denom`` (``divide=False``: ``result + update * scaling``) in ONE pass.

    The unfused expression reads and writes the full (tokens x out_features) activation three times in the
    forward and allocates two temporaries of that size; this does it once. It also leaves the base layer's
    output alone: ``F.linear`` returns a view for 3-D inputs, and adding into it in place
    (``result += ...``, as the reference does) makes autograd's CopySlices copy that activation three times in
    the backward. The rounding is that of the unfused expression, so results are bitwise those of the
    reference (PEFT):

    - forward: ATen's CPU ``addcdiv`` kernel computes ``self + value * t1 / t2`` left to right in the
      tensor's dtype, i.e. ``fl(r + fl(fl(s * u) / d))``, exactly ``r += u * s / d``; with ``d = 1`` (exact)
      it is ``r + u * s``. (``addcmul`` would not do: the compiler contracts its multiply-add into an FMA.)
    - backward: the gradient of ``update`` is ``fl(fl(g / d) * s)`` (``g * s``), the expression autograd's
      DivBackward/MulBackward evaluate for the unfused form (``addcdiv``'s own backward would compute
      ``g * fl(s / d)``); that of ``result`` passes through.

    Only used on CPU for float32/float64 operands of one dtype (see :func:`add_scaled`): the CUDA kernel
    evaluates ``self + value * (t1 / t2)``, and reduced precision rounds once instead of at each op.
    This out-of-place form is the one ``torch.func`` transforms see; eager autograd uses
    :class:`_AddScaledInto`; under ``torch.compile`` the plain expressions are traced instead.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(result, update, scaling, denom, divide):
        return torch.addcdiv(result, update, denom, value=scaling)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, scaling, denom, divide = inputs
        _add_scaled_setup(ctx, scaling, denom, divide)

    backward = staticmethod(_add_scaled_backward)


class _AddScaledInto(torch.autograd.Function):
    """:class:`_AddScaled` writing its result into ``update``'s buffer (eager autograd only).

    Saves the allocation of one activation-sized tensor per adapted layer (with activations above glibc's
    32 MiB mmap limit, e.g. DeBERTa-base at batch 32, that is a fresh mapping and its page faults each time).
    ``update`` is the adapter branch's own temporary: nothing saved it for backward.
    """

    @staticmethod
    def forward(ctx, result, update, scaling, denom, divide):
        _add_scaled_setup(ctx, scaling, denom, divide)
        torch.addcdiv(result, update, denom, value=scaling, out=update)
        ctx.mark_dirty(update)
        return update

    backward = staticmethod(_add_scaled_backward)


def _functorch_active() -> bool:
    # A private torch query; if a torch release drops it, assume a transform is active (the out-of-place path).
    query = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if query is None else bool(query())


def add_scaled(result: torch.Tensor, update: torch.Tensor, scaling: float,
               denom: torch.Tensor | None = None, *, fused: bool = True) -> torch.Tensor:
    """``result + update * scaling [/ denom]``, in one pass where that is bitwise exact.

    ``update`` must be a temporary of the caller (the adapter branch's output): in eager mode its buffer
    may receive the result. Falls back to the plain expressions of the reference implementations (LoRA's
    out of place, AdaLoRA's in place on ``result``) off CPU, for reduced precision, mixed dtypes or
    broadcasting, so that numerics never depend on the path taken, and under ``torch.compile``.

    Args:
        fused: False always evaluates the plain expressions (the same numbers): what the adapter layers pass
            for ``fuse_residual_add = False``, to measure what the one-pass add buys, or to debug.
    """
    fused = (
        fused
        and not torch.compiler.is_compiling()  # a compiler fuses the plain expressions itself
        and result.device.type == "cpu"
        and result.dtype in _FUSED_DTYPES
        and update.dtype == result.dtype
        and update.shape == result.shape
        and (denom is None or (denom.dtype == result.dtype and denom.numel() == 1 and denom.device == result.device))
    )
    if not fused:
        if denom is None:
            return result + update * scaling
        result += update * scaling / denom
        return result
    divide = denom is not None
    if not divide:
        denom = _ONE[result.dtype]  # x / 1 is exact, so addcdiv computes result + update * scaling
    # In place into ``update`` only in plain eager mode, on a tensor autograd lets us overwrite.
    into = (
        not _functorch_active()
        and not update._is_view()
        and not (update.is_leaf and update.requires_grad)
    )
    if torch.is_grad_enabled() and (result.requires_grad or update.requires_grad):
        fn = _AddScaledInto if into else _AddScaled
        return fn.apply(result, update, scaling, denom, divide)
    if into:
        return torch.addcdiv(result, update, denom, value=scaling, out=update)
    return torch.addcdiv(result, update, denom, value=scaling)
