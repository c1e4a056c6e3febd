"""The ``"fused"`` adapter kernel: an adapted linear layer's whole forward and backward in one autograd Function.

An adapted layer computes ``y = x W^T + b + dropout(x) A'^T B'^T`` with ``A' = A`` (LoRA) or ``A diag(E)`` as rows
(AdaLoRA), and ``B' = B * scale``. The low-rank factors are tiny; the cost of the branch is in passes over the
activations. Autograd over the plain expressions (the ``"reference"`` kernel, PEFT's arithmetic) makes about fifteen
(the update ``(tokens, out)`` written and re-read for the scale and the add, its gradient scaled in another pass,
the input gradient of the branch written and then summed with the base layer's). This Function makes about eight:

- forward: one GEMM for ``x W^T + b``, one skinny GEMM ``t = dropout(x) A'^T`` (tokens x r), and ``t B'^T``
  accumulated into the base output by the GEMM itself (``addmm_``, beta 1): no update tensor exists;
- backward: ``g B'`` and ``g^T t`` (reading ``g`` twice), ``g W`` for the input gradient with the branch's
  ``(g B') A'`` accumulated into it by the GEMM, and ``(g B')^T dropout(x)``;
- saved for backward: the input (or its dropped-out copy, and the dropout mask as booleans) and ``t``; the base
  weight is referenced, not copied. The reference saves the same two; it differs in the temporaries of the
  update's size that its forward and backward allocate and pass over.

Numerics: the scale is folded into ``B'`` (rounded once in the compute dtype) and the update is summed into the base
output inside the GEMM, so the result differs from the reference by rounding only: per element, a few units in the
last place of ``|x W^T + b| + |update|``. ``tests/core/test_fused_branch.py`` checks outputs and gradients against the
reference at that tolerance, and trained models (masks, parameters) after several steps. The reference stays the
default, bitwise equal to PEFT; this kernel is opt-in (``AdaLoRAConfig.kernel = "fused"``, docs/method.md §14).

Under autocast the Function runs in the autocast dtype (every operand cast once, as autocast would cast the
matmuls), with autocast off inside; gradients of the float32 factors come back in float32 through the casts.
"""

from __future__ import annotations

import torch


class _AdaptedLinear(torch.autograd.Function):
    """``x W^T + b + dropout(x) A^T B^T`` for a frozen ``W``, ``b`` and trainable ``A`` (r, in), ``B`` (out, r).

    ``weight`` is (out, in), or (in, out) with ``weight_in_out`` (GPT-2's ``Conv1D``). All floating operands share
    one dtype and device. ``x`` may have any number of leading dimensions.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, dropout_p: float, weight_in_out: bool):
        lead, in_features = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, in_features)
        w_t = weight if weight_in_out else weight.t()  # (in, out), a view
        out = torch.mm(x2, w_t) if bias is None else torch.addmm(bias, x2, w_t)
        mask = None
        if dropout_p > 0.0:
            mask = torch.empty(x2.shape, dtype=torch.bool, device=x2.device).bernoulli_(1.0 - dropout_p)
            branch_in = x2 * mask
            branch_in.mul_(1.0 / (1.0 - dropout_p))
        else:
            branch_in = x2
        t = torch.mm(branch_in, lora_a.t())  # (tokens, r)
        out.addmm_(t, lora_b.t())  # the update summed into the base output by the GEMM: no (tokens, out) temporary
        ctx.dropout_p, ctx.weight_in_out, ctx.lead, ctx.in_features = dropout_p, weight_in_out, lead, in_features
        ctx.device_type = x.device.type
        ctx.save_for_backward(branch_in, mask, t, weight, lora_a, lora_b)
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        # A backward called inside an autocast region must not recast the saved operands.
        with torch.autocast(ctx.device_type, enabled=False):
            return _AdaptedLinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        branch_in, mask, t, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        if need_bias or ctx.needs_input_grad[1]:
            raise RuntimeError("the fused adapter kernel keeps the base layer frozen; its weight and bias must not "
                               "require grad")
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_a = grad_b = None
        grad_t = torch.mm(g, lora_b) if (need_x or need_a) else None  # (tokens, r)
        if need_b:
            grad_b = torch.mm(g.t(), t)
        if need_a:
            grad_a = torch.mm(grad_t.t(), branch_in)
        if need_x:
            w = weight.t() if ctx.weight_in_out else weight  # (out, in)
            grad_x = torch.mm(g, w)
            if mask is None:
                grad_x.addmm_(grad_t, lora_a)  # the branch's input gradient summed in by the GEMM
            else:
                branch_grad = torch.mm(grad_t, lora_a)
                branch_grad.mul_(mask)
                grad_x.add_(branch_grad, alpha=1.0 / (1.0 - ctx.dropout_p))
            grad_x = grad_x.view(*ctx.lead, ctx.in_features)
        return grad_x, None, None, grad_a, grad_b, None, None


def fused_adapted_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                         lora_b: torch.Tensor, *, dropout_p: float = 0.0, weight_in_out: bool = False) -> torch.Tensor:
    """``x W^T + b + dropout(x) A^T B^T`` in one autograd Function (see the module docstring).

    Args:
        x: (..., in) input.
        weight: the frozen base weight, (out, in), or (in, out) with ``weight_in_out``.
        bias: the frozen base bias (out,) or None.
        lora_a: (r, in), the branch's first factor (``A * E`` for an SVD adapter).
        lora_b: (out, r), the second factor with the scale folded in (``B * scale``).
        dropout_p: dropout probability on the branch's input (0 outside training).
        weight_in_out: the weight is stored (in, out) (GPT-2's ``Conv1D``).

    Under autocast every operand is cast to the autocast dtype first; otherwise they are cast to the base weight's
    dtype (a float32 adapter on a bfloat16 base computes its branch in bfloat16, summed into the bfloat16 output).
    Returns a tensor of that dtype.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    operands = [None if v is None else v.to(dtype) for v in (x, weight, bias, lora_a, lora_b)]
    with torch.autocast(device_type, enabled=False):
        return _AdaptedLinear.apply(*operands, float(dropout_p), weight_in_out)
