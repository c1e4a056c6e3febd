"""What the adapters need to know about quantized base layers (docs/method.md §11).

Supported, recognised by type (never by module name):

- bitsandbytes ``Linear4bit`` (kinds ``nf4`` and ``fp4``, with or without double quantization, any compute dtype);
- bitsandbytes ``Linear8bitLt`` (kind ``int8``, LLM.int8(), int8 weights);
- an ``nn.Linear`` whose weight is torchao's weight-only ``Int8Tensor`` (kind ``torchao_int8``, what
  ``Int8WeightOnlyConfig`` produces).

Anything else that is quantized (HQQ, GPTQ/AWQ/Marlin kernels, torchao's other tensor subclasses, a module whose
class name says it is quantized, an ``nn.Linear`` whose weight is not a floating-point tensor) cannot be adapted:
:func:`check_adaptable` refuses it with its type named.

The module is pure: it changes no layer (except :func:`keep_exact`), and imports bitsandbytes and torchao only when
a layer of theirs is met, so that it works without them. A layer of theirs met without the package importable is a
:class:`QuantizationUnavailable` error, one line naming the ``quant`` extra.
"""

from __future__ import annotations

import copy
import importlib
import re
from types import ModuleType

import torch
from torch import nn

from adalora_pl.errors import ConfigError

__all__ = [
    "QUANT_EXTRA",
    "SUPPORTED_QUANTIZED",
    "QuantizationUnavailable",
    "check_adaptable",
    "compute_dtype",
    "dequantized_linear",
    "dequantized_weight",
    "describe",
    "is_quantized",
    "keep_exact",
    "keep_model_exact",
    "linear_features",
    "plain_dtype",
    "quantization_kind",
    "unsupported_reason",
]

#: What to install for quantized bases.
QUANT_EXTRA = 'pip install "adalora-pl[quant]"'

#: The quantized linears adapters can wrap, for error messages.
SUPPORTED_QUANTIZED = (
    "bitsandbytes Linear4bit (nf4 or fp4, with or without double quantization), bitsandbytes Linear8bitLt (int8 "
    "weights), and nn.Linear with a torchao int8 weight-only weight (Int8WeightOnlyConfig)"
)

# Class or module names of quantized layers from any library (HQQ, GPTQ and AWQ kernels, quanto, EETQ, FP8 ...).
# Only a hint that a layer is quantized; what is supported is decided by type below.
_QUANTIZED_NAME = re.compile(r"quant|4bit|8bit|int4|int8|fp8|nf4|fp4|hqq|gptq|awq|marlin|exllama|eetq|aqlm|bnb",
                             re.IGNORECASE)
# Packages whose layers are quantized whatever their class name.
_QUANTIZATION_PACKAGES = ("bitsandbytes", "torchao", "hqq", "auto_gptq", "gptqmodel", "awq", "quanto", "eetq", "aqlm",
                          "vptq", "compressed_tensors", "fbgemm_gpu")


class QuantizationUnavailable(ConfigError, ImportError):
    """A quantized layer's package (bitsandbytes, torchao) cannot be imported; the message is one line."""


# ====================================================================== lazy imports and type tests
def _package_of(obj: object) -> str:
    """Top-level package of ``obj``'s class or of any class it derives from that comes from a quantization
    package, else of its own class."""
    for cls in type(obj).__mro__:
        root = cls.__module__.partition(".")[0]
        if root in _QUANTIZATION_PACKAGES:
            return root
    return type(obj).__module__.partition(".")[0]


def _import(package: str, needed_for: str) -> ModuleType:
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise QuantizationUnavailable(
            f"{needed_for} needs {package}, which cannot be imported ({type(err).__name__}: {err}); "
            f"install it with: {QUANT_EXTRA}"
        ) from None


def _type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _bnb_kind(layer: nn.Module) -> str | None:
    """``nf4`` / ``fp4`` / ``int8`` for a bitsandbytes linear, None for any other bitsandbytes module."""
    bnb = _import("bitsandbytes", f"the bitsandbytes layer {type(layer).__name__}")
    if isinstance(layer, bnb.nn.Linear4bit):
        return str(layer.weight.quant_type)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def _torchao_int8(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is torchao's int8 weight-only tensor (no activation quantization or pre-scaling)."""
    torchao_quant = _import("torchao.quantization", f"the torchao weight {type(weight).__name__}")
    int8_tensor = getattr(torchao_quant, "Int8Tensor", None)
    return (
        int8_tensor is not None
        and isinstance(weight, int8_tensor)
        and weight.act_quant_kwargs is None
        and weight.act_pre_scale is None
        and weight.qdata.dim() == 2
    )


# ====================================================================== classification
def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` is a quantized layer that cannot be adapted, or None (a supported quantized linear, or not
    quantized at all).

    Quantized means: its class comes from a quantization package, its class name (or a base class's) says so, or
    it is an ``nn.Linear`` whose weight is an integer tensor or a quantized tensor subclass (from such a package, or
    named so).
    """
    package = _package_of(module)
    weight = getattr(module, "weight", None)
    if package == "bitsandbytes":
        kind = _bnb_kind(module)
        if kind is None:
            return "a bitsandbytes module that is not Linear4bit or Linear8bitLt"
        if kind in ("nf4", "fp4"):
            if getattr(weight, "quant_state", None) is None and getattr(module, "quant_state", None) is None:
                return ("a bitsandbytes Linear4bit that is not quantized yet (bitsandbytes quantizes it when it is "
                        "moved to a device: call .to(device) first)")
            if getattr(_quant_state(module), "packing_format_for_cpu", False):
                return ("a bitsandbytes Linear4bit already repacked for its CPU inference kernel: an eval-mode "
                        "forward on a CPU with AVX512-BF16 rounded its block scales to bfloat16 in place, and that "
                        "kernel passes no gradient to its input; inject the adapters into the model as loaded (before "
                        "evaluating it), or set support_avx512bf16_for_cpu = False on its Linear4bit layers before an "
                        "eval pass")
            return None
        if weight is None or weight.dtype != torch.int8:
            return "a bitsandbytes Linear8bitLt with unquantized weights (has_fp16_weights=True)"
        return None
    if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor):
        weight_package = _package_of(weight)
        if weight_package == "torchao":
            if _torchao_int8(weight):
                return None
            return (f"an nn.Linear with a torchao {type(weight).__name__} weight that is not int8 weight-only "
                    "(activation quantization or another scheme)")
        # Other tensor subclasses (DTensor, say) are fine unless they say they are quantized.
        weight_names = [cls.__name__ for cls in type(weight).__mro__]
        if weight_package in _QUANTIZATION_PACKAGES or any(_QUANTIZED_NAME.search(n) for n in weight_names):
            return f"an nn.Linear whose weight is a {_type_name(weight)}"
        if not weight.is_floating_point():
            return f"an nn.Linear with {weight.dtype} weights"
    names = [cls.__name__ for cls in type(module).__mro__ if cls not in (nn.Module, object)]
    if package in _QUANTIZATION_PACKAGES or any(_QUANTIZED_NAME.search(n) for n in names) or (
            _QUANTIZED_NAME.search(type(module).__module__)):
        return "a quantized layer"
    return None


def check_adaptable(module: nn.Module, path: str = "") -> None:
    """Refuse a quantized ``module`` that adapters cannot wrap.

    Raises:
        ConfigError: naming the module path, its type and the supported quantized layers.
        QuantizationUnavailable: a bitsandbytes / torchao layer whose package cannot be imported.
    """
    reason = unsupported_reason(module)
    if reason is not None:
        where = f"{path!r} is " if path else ""
        raise ConfigError(
            f"{where}{_type_name(module)}: {reason}, which adalora-pl cannot adapt. Supported quantized bases: "
            f"{SUPPORTED_QUANTIZED}"
        )


def quantization_kind(layer: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"``, ``"int8"`` (bitsandbytes) or ``"torchao_int8"`` for a supported quantized linear; None
    for a layer that is not quantized.

    Raises:
        ConfigError: ``layer`` is quantized in a way adapters do not support (see :func:`check_adaptable`).
    """
    check_adaptable(layer)
    if _package_of(layer) == "bitsandbytes":
        return _bnb_kind(layer)
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear) and isinstance(weight, torch.Tensor) and _package_of(weight) == "torchao":
        return "torchao_int8"  # check_adaptable let it through: int8 weight-only
    return None


def is_quantized(layer: nn.Module) -> bool:
    """True for a supported quantized linear (see :func:`quantization_kind`); False for anything else, also for an
    unsupported quantized layer."""
    if unsupported_reason(layer) is not None:
        return False
    return quantization_kind(layer) is not None


# ====================================================================== properties
def _quant_state(layer: nn.Module):
    # The state lives on the weight; bitsandbytes keeps a copy on the module for when the weight was re-wrapped.
    return getattr(layer.weight, "quant_state", None) or getattr(layer, "quant_state", None)


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported quantized linear (its packed weight's shape is not)."""
    return int(layer.in_features), int(layer.out_features)


def double_quant(layer: nn.Module) -> bool:
    """Whether a bitsandbytes 4-bit layer quantizes its block scales too (QLoRA's double quantization)."""
    return bool(getattr(_quant_state(layer), "nested", False))


def plain_dtype(layer: nn.Module) -> torch.dtype | None:
    """The dtype of the weight ``layer`` was quantized from, where the layer records it: bitsandbytes 4-bit keeps
    it in its quantization state, torchao's tensor subclass reports it as its dtype. None for bitsandbytes int8,
    which does not record it (its bias, if any, has the model's dtype)."""
    kind = quantization_kind(layer)
    if kind in ("nf4", "fp4"):
        return _quant_state(layer).dtype
    if kind == "torchao_int8":
        return layer.weight.dtype
    if kind == "int8" and layer.bias is not None:
        return layer.bias.dtype
    return None


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype the quantized layer multiplies in: a bitsandbytes 4-bit layer's ``compute_dtype`` (before one is
    set, the dtype it was quantized from), float16 for bitsandbytes int8 (LLM.int8() casts its input to it), the
    nominal dtype of a torchao weight. For a plain linear, its weight's dtype.

    It only chooses the adapters' dtype with ``autocast_adapter_dtype=False``: each of these layers returns its
    output in its input's dtype.
    """
    kind = quantization_kind(layer)
    if kind in ("nf4", "fp4"):
        return layer.compute_dtype or _quant_state(layer).dtype
    if kind == "int8":
        return torch.float16
    return layer.weight.dtype


def describe(layer: nn.Module) -> str:
    """One line naming the quantization of ``layer`` (for logs and messages)."""
    kind = quantization_kind(layer)
    if kind is None:
        return f"{type(layer).__name__} (not quantized)"
    if kind in ("nf4", "fp4"):
        extra = ", double quantization" if double_quant(layer) else ""
        return f"bitsandbytes Linear4bit ({kind}{extra}, compute {compute_dtype(layer)})"
    if kind == "int8":
        return "bitsandbytes Linear8bitLt (int8)"
    return f"torchao int8 weight-only ({layer.weight.dtype})"


# ====================================================================== dequantization
@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 (out, in) weight a supported quantized linear stands for, exactly as its library dequantizes it.

    - bitsandbytes 4-bit: ``code[q] * absmax`` per block of 64 (with double quantization, ``absmax`` is first
      dequantized from its 8-bit form), bitsandbytes' own ``dequantize_4bit`` evaluated in float32. Its forward uses
      this weight rounded to the compute dtype (bitsandbytes' dequantize-then-matmul path; on GPUs also its fused
      kernels).
    - bitsandbytes int8: ``CB * SCB / 127`` per row (``int8_vectorwise_dequant``). LLM.int8()'s forward also
      quantizes its input, so the layer is not ``x @ W.T`` with this weight, only close to it.
    - torchao int8: ``qdata * scale`` (its ``dequantize``) in float32. Its forward multiplies by the int8 values and
      scales the product, so it equals ``x @ W.T`` up to float rounding.

    A plain ``nn.Linear`` returns a float32 copy of its weight.

    Raises:
        ConfigError: ``layer`` is quantized in an unsupported way.
    """
    kind = quantization_kind(layer)
    if kind is None:
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"dequantized_weight takes a linear layer, got {type(layer).__name__}")
        return layer.weight.detach().float().clone()
    if kind in ("nf4", "fp4"):
        functional = _import("bitsandbytes.functional", "dequantizing a bitsandbytes Linear4bit")
        state = copy.copy(_quant_state(layer))
        state.dtype = torch.float32  # bitsandbytes dequantizes in float32 and then casts to this dtype: skip the cast
        return functional.dequantize_4bit(layer.weight.data, state).reshape(layer.out_features, layer.in_features)
    if kind == "int8":
        functional = _import("bitsandbytes.functional", "dequantizing a bitsandbytes Linear8bitLt")
        # Before its first forward the int8 weight and its row scales sit on the parameter; afterwards on the state.
        data = layer.weight.data if layer.weight.dtype == torch.int8 else layer.state.CB
        scales = getattr(layer.weight, "SCB", None)
        if scales is None:
            scales = layer.state.SCB
        return functional.int8_vectorwise_dequant(data, scales).float()
    return layer.weight.dequantize(torch.float32)


@torch.no_grad()
def dequantized_linear(layer: nn.Module, dtype: torch.dtype, delta: torch.Tensor | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` on ``layer``'s device holding ``dequantized_weight(layer) + delta``, added in
    float32 and rounded once into ``dtype``; the bias is copied (cast to ``dtype``). ``requires_grad`` is False
    (a frozen base stays frozen)."""
    weight = dequantized_weight(layer)
    if delta is not None:
        weight = weight + delta.to(device=weight.device, dtype=torch.float32)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().to(dtype).clone(), requires_grad=False)
    return plain


def keep_exact(layer: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit layer on its dequantize-then-matmul path on CPU.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight on its first forward in eval mode without
    gradients: it rounds the block scales to bfloat16 in place (the weight changes, for good), computes in bfloat16
    whatever the compute dtype, and the repacked path passes no gradient to its input (bitsandbytes 0.50). A
    validation pass would thus change the frozen base and silently cut the gradient of every adapter below it.
    An adapter wrapping the layer turns the repacking off; elsewhere (GPUs, other layers) this does nothing.
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def keep_model_exact(model: nn.Module) -> None:
    """:func:`keep_exact` for every bitsandbytes 4-bit layer of ``model``, adapted or not: a repacked layer that carries
    no adapter still cuts the gradient of every adapter below it. One already repacked is refused.

    Raises:
        ConfigError: a 4-bit layer was repacked already (an eval pass on a CPU with AVX512-BF16 before injection);
            the message names it.
    """
    for path, module in model.named_modules():
        if not hasattr(module, "support_avx512bf16_for_cpu") or _package_of(module) != "bitsandbytes":
            continue
        if getattr(_quant_state(module), "packing_format_for_cpu", False):
            check_adaptable(module, path)  # raises, naming it and why
        keep_exact(module)
